"""The storage formats of a frozen weight, as plain tensors: quantise and dequantise (no modules, no autograd).

A weight is ``W`` [out, in] or an expert stack [E, out, in]. Two formats, both from bitsandbytes' papers:

int8: LLM.int8's vectorwise quantisation (Dettmers et al. 2022), one scale per output row (per expert and row
for a stack), the numbers ``bitsandbytes.functional.int8_vectorwise_quant`` gives (checked in the tests):

    scale[..., r] = max_j |W[..., r, j]|                    float32 [..., out]
    q[..., r, j]  = round(127 * W[..., r, j] / scale[r])    int8    [..., out, in]
    W ~= q * scale / 127                                    |error| <= scale[r] / 254 (half a step)

Written in torch rather than calling bitsandbytes because its CUDA kernel takes float16 only, and our weights are
bf16 (a detour through float16 would add a rounding and clip values above 65504).

fp8: float8 e4m3 (OCP's E4M3FN: 3 mantissa bits, finite up to 448) with one float32 scale per output row, the
format of Hopper's FP8 matrix products (issue 24):

    scale[..., r] = max_j |W[..., r, j]| / 448             float32 [..., out]
    q[..., r, j]  = e4m3(W[..., r, j] / scale[r])           float8_e4m3fn [..., out, in] (stored as uint8 bits)
    W ~= q * scale                                          relative error <= 2^-4 (half an ulp of 3 bits)

4-bit: QLoRA's NF4 (or FP4) (Dettmers et al. 2023) in bitsandbytes' blockwise format, through
``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit`` (CPU and CUDA kernels). ``W`` is read flat in
blocks of ``BLOCKSIZE`` = 64 consecutive entries; each block keeps its absmax and every entry the index of the
nearest of 16 code values (two indices per byte):

    data    uint8   [numel / 2]
    absmax  float32 [numel / 64]; with double quantisation uint8 [numel / 64] (8-bit blockwise, 256 per block)
            plus absmax2 float32 [numel / 64 / 256], code2 float32 [256] and offset float32 []
    code    float32 [16] (the NF4 or FP4 values in [-1, 1])
    |error| <= absmax_block * (largest half-gap of the code): 0.152 for NF4 (between -1 and -0.696)

With ``in`` a multiple of 64 (every Kimi Linear matrix), a block never straddles two rows, so quantising a stack
in one call is quantising each expert (and each row) on its own.

Every float tensor of a quantised weight is stored as an int32 view (see ``QuantizedWeight``), so these
functions take and return the float views; bitsandbytes is imported here only, lazily.
"""

from __future__ import annotations

import torch

BLOCKSIZE = 64  # bitsandbytes' 4-bit block (QLoRA's); the only one its CPU and CUDA kernels share
DOUBLE_QUANT_BLOCKSIZE = 256  # bitsandbytes' block for the absmax values themselves (compress_statistics)
FOUR_BIT_TYPES = ("nf4", "fp4")
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
_INT8_CHUNK_BYTES = 1 << 28  # float32 temporaries of int8 quantisation, per chunk of experts (256 MiB)


def bitsandbytes_functional():
    """``bitsandbytes.functional``, with a clear message when it is missing (the one import of it here)."""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as err:
        raise ImportError(
            "load_in_4bit / 4-bit quantisation needs bitsandbytes: pip install 'bitsandbytes>=0.45' "
            "(or kimitune[gpu])"
        ) from err
    return bnb_functional


def _quantize_per_row(weight: torch.Tensor, dtype: torch.dtype, encode) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., out, in] -> (q [..., out, in] in ``dtype``, scale float32 [..., out]), ``encode(part float32
    [n, out, in]) -> (q, scale [n, out])`` applied a few matrices at a time, so that the float32 temporaries of a
    stack stay near 256 MiB."""
    q = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    scale = torch.empty(weight.shape[:-1], dtype=torch.float32, device=weight.device)
    flat_w, flat_q = weight.reshape(-1, *weight.shape[-2:]), q.view(-1, *q.shape[-2:])
    flat_s = scale.view(-1, scale.shape[-1])
    step = max(1, _INT8_CHUNK_BYTES // (4 * weight.shape[-2] * weight.shape[-1]))
    for start in range(0, flat_w.shape[0], step):
        flat_q[start:start + step], flat_s[start:start + step] = encode(flat_w[start:start + step].float())
    return q, scale


def _encode_int8(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    absmax = part.abs().amax(-1)
    # All-zero rows: any scale works; 1 avoids 0/0 (bitsandbytes leaves them at 0 too).
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return torch.round(part * (127.0 / safe).unsqueeze(-1)).to(torch.int8), absmax


@torch.no_grad()
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., out, in] -> (q int8 [..., out, in], scale float32 [..., out]), on W's device."""
    return _quantize_per_row(weight, torch.int8, _encode_int8)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(q int8 [..., out, in], scale float32 [..., out]) -> W [..., out, in] in ``dtype``.

    One multiply written straight into a ``dtype`` tensor (computed in float32, rounded once): no float32 copy
    of the whole weight is made."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    return torch.mul(q, (scale / 127.0).unsqueeze(-1), out=out)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 [..., K], float32 scale [..., 1]), one scale per row (rows of zeros: scale 1, and they
    stay zero): a weight's rows, or activations as ``torch._scaled_mm`` takes them ([N, K], scale [N, 1])."""
    scale = x.float().abs().amax(-1, keepdim=True) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


@torch.no_grad()
def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., out, in] -> (q float8_e4m3fn [..., out, in], scale float32 [..., out]), on W's device."""
    def encode(part):
        q, scale = quantize_rows_fp8(part)
        return q, scale.squeeze(-1)

    return _quantize_per_row(weight, torch.float8_e4m3fn, encode)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(q float8_e4m3fn [..., out, in], scale float32 [..., out]) -> W [..., out, in] in ``dtype`` (computed in
    float32, rounded once)."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


@torch.no_grad()
def quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = False) -> dict[str, torch.Tensor]:
    """W (any shape, float32 / bf16 / fp16) -> the 4-bit tensors named as in the module docstring (float ones as
    floats here): data, absmax, code, and with ``double_quant`` absmax2, code2, offset."""
    if quant_type not in FOUR_BIT_TYPES:
        raise ValueError(f"4-bit quant_type must be one of {FOUR_BIT_TYPES}, got {quant_type!r}")
    bnb_functional = bitsandbytes_functional()
    data, state = bnb_functional.quantize_4bit(
        weight.contiguous(), blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type=quant_type
    )
    tensors = {"data": data.reshape(-1), "absmax": state.absmax, "code": state.code.float()}
    if double_quant:
        tensors |= {
            "absmax2": state.state2.absmax,
            "code2": state.state2.code.float(),
            "offset": torch.as_tensor(state.offset, dtype=torch.float32, device=weight.device).reshape(()),
        }
    return tensors


def dequantize_4bit(
    tensors: dict[str, torch.Tensor], shape: torch.Size, quant_type: str, dtype: torch.dtype
) -> torch.Tensor:
    """The 4-bit tensors of ``quantize_4bit`` (float ones as floats) -> W of ``shape`` in ``dtype``."""
    bnb_functional = bitsandbytes_functional()
    state2 = None
    if "absmax2" in tensors:
        state2 = bnb_functional.QuantState(
            absmax=tensors["absmax2"], code=tensors["code2"], blocksize=DOUBLE_QUANT_BLOCKSIZE, dtype=torch.float32
        )
    state = bnb_functional.QuantState(
        absmax=tensors["absmax"],
        shape=torch.Size(shape),
        code=tensors["code"],
        blocksize=BLOCKSIZE,
        quant_type=quant_type,
        dtype=dtype,
        offset=tensors.get("offset"),
        state2=state2,
    )
    return bnb_functional.dequantize_4bit(tensors["data"].view(-1, 1), state)
