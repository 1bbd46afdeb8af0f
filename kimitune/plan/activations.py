"""What a training step keeps for its backward, in bytes per token, by layer kind: the plan's activation terms.

Each function takes one block as the model holds it (``shapes.py``) and ``b``, the activations' bytes per element
(2: bf16), and returns named terms (``Terms``: name -> bytes per token). A term is what some op keeps for its
backward (autograd's saved tensors, a custom Function's ``save_for_backward``), a storage shared by several counted
once. Two kinds:

- the same on every device: what the model's PyTorch code and kimitune's own autograd Functions keep wherever they
  run: LoRA's low-rank products and inputs, the gate's sigmoid, the router's scores and choices, the MoE's sort
  indices, the fused loss's gradient;
- by implementation (``Kernels``): RMS norms and SwiGLU (fla-core's fused kernels keep their inputs, PyTorch's the
  float32 intermediates), KDA's short conv and chunk kernel (kimitune's Triton conv and fla's kernel on CUDA, the
  PyTorch chunk algorithm of ``kimitune.ops.kda.chunk`` elsewhere), the routed experts' SwiGLU (Triton, or its
  float32 PyTorch reference), MLA's attention kernel.

``tests/test_plan_saved_tensors.py`` measures every term of ``CPU`` (the PyTorch paths) with
``torch.autograd.graph.saved_tensors_hooks`` and holds them exact. The ``Kernels()`` (CUDA) terms that differ
follow the kernels' save lists and the GPU memory census (``benchmarks/memory_census.py``; benchmarks/RESULTS.md,
"Peak GPU memory: census and kimitune plan"); no test measures them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kimitune.ops.kda.chunk import CHUNK_SIZE
from kimitune.plan.shapes import AdaptedLinear, KDAShape, LayerShapes, MLAShape, MLPShape, MoEShape

Terms = dict[str, int]
INDEX_BYTES = 8  # int64 indices
FLOAT32 = 4
FLA_CHUNK_SIZE = 64  # fla's KDA chunk: its kept chunk states are one [K, K] per head and 64 tokens


@dataclass(frozen=True)
class Kernels:
    """Which implementation of the device-dependent ops a run takes (each keeps different tensors).

    ``cuda``: fla's KDA kernel, kimitune's Triton short conv and expert SwiGLU, CUDA's sdpa; False: the PyTorch
    paths the CPU runs. ``fused_norms``: fla-core's fused RMSNorm, gated norm and SwiGLU (CUDA with fla-core).
    ``packed``: packed batches, MLA through varlen flash attention (CUDA). ``kda_keep_intermediates``: fla keeps
    what its backward would recompute (``disable_recompute``; CUDA).
    """

    cuda: bool = True
    fused_norms: bool = True
    packed: bool = False
    kda_keep_intermediates: bool = False


CPU = Kernels(cuda=False, fused_norms=False)


def total(terms: Terms) -> int:
    return sum(terms.values())


def rms_norm(width: int, b: int, kernels: Kernels) -> int:
    """One RMS norm over ``width`` channels (one row per token), weight frozen: fla's kernel keeps its input and a
    float32 inverse RMS; PyTorch's the float32 copy of its input and the inverse RMS (the scaled output is not
    kept: only a trained weight's gradient would read it)."""
    return (b * width if kernels.fused_norms else FLOAT32 * width) + FLOAT32


def kda(shape: KDAShape, b: int, kernels: Kernels) -> Terms:
    """A KDA layer besides its adapted linears; x [T, C] -> q, k, v [T, H, K] (D = H * K channels).

    CUDA: the short conv keeps its input (its backward recomputes the pre-activation), fla's kernel q, k, v and the
    forget gate's raw input (it recomputes the decay), and with ``kda_keep_intermediates`` also w, q * exp(g),
    k * exp(g), u and v_new (five [T, H, K]), the chunk states [T / 64, H, K, K] and the decay's float32 cumulative
    sum. PyTorch: the conv keeps its zero-padded input and SiLU's input; ``kda_decay`` softplus's float32 input;
    the chunk algorithm q, k, v, the float32 decay, per chunk of ``CHUNK_SIZE`` T^-1 and the two decayed score
    matrices [C, C] per head, and the chunk-entry states [H, K, K]."""
    H, K = shape.heads, shape.head_dim
    D = shape.channels
    terms = {"beta": b * H}  # sigmoid keeps its output [T, H]
    if kernels.cuda:
        terms["short conv"] = 3 * b * D
        terms["kernel"] = 4 * b * D
        if kernels.kda_keep_intermediates:
            terms["kept intermediates"] = b * (5 * D + D * K // FLA_CHUNK_SIZE) + FLOAT32 * D
    else:
        terms["short conv"] = 6 * b * D
        terms["decay"] = FLOAT32 * D
        chunk = CHUNK_SIZE
        terms["kernel"] = 3 * b * D + FLOAT32 * D + FLOAT32 * (3 * chunk * H + H * K * K // chunk)
    # the gated output norm: fla keeps its input and gate and an inverse RMS per head; PyTorch its float32 input,
    # the weighted normed product and the gate's sigmoid
    terms["output norm"] = (2 * b * D if kernels.fused_norms else 3 * FLOAT32 * D) + FLOAT32 * H
    return terms


def mla(shape: MLAShape, b: int, kernels: Kernels) -> Terms:
    """MLA's attention kernel, per token (its latent norms are the layer's ``attention_norms``).

    CUDA, one sequence: q and k [H, nope + rope] and kv_b's output [H, nope + v], of which v is a view (the
    census's terms). CUDA, packed (flash attention's varlen kernel; not measured): q, k, v padded to the key width
    and the padded output. CPU (sdpa's flash kernel for the CPU, v zero-padded to the key width,
    ``kimitune.ops.attention``): q, k, the padded v and output, and a float32 log-sum-exp per head."""
    H, qk = shape.heads, shape.qk_head_dim
    if not kernels.cuda:
        return {"attention": 4 * b * H * qk + FLOAT32 * H}
    if kernels.packed:
        return {"attention": 4 * b * H * qk}
    return {"attention": 2 * b * H * qk + b * H * (shape.nope_head_dim + shape.v_head_dim)}


def swiglu(shape: MLPShape, b: int, kernels: Kernels) -> int:
    """silu(gate) * up over ``intermediate`` channels: fla keeps gate and up; PyTorch silu's input and output and
    up."""
    return (2 if kernels.fused_norms else 3) * b * shape.intermediate


def moe(shape: MoEShape, b: int, kernels: Kernels, hidden_size: int, aux_loss: bool) -> Terms:
    """A MoE block besides its adapted linears, for ``top_k`` routed copies of each token.

    Per copy: the weighted expert SwiGLU's input (Triton: the gate_up rows in b and the float32 routing weight;
    PyTorch: float32 gate, silu, up, their product and the weight) and the two sort permutations (int64). Per
    token: the router's float32 scores [E] and chosen experts (int64 [top_k]), with renormalisation the weights
    before it and their sum; the balance loss's row sum when the run trains it; the shared expert's SwiGLU. The
    frozen grouped products keep no activation. On CUDA the census measured 4 * C more per token, not attributed
    (the router's tensor-core product keeps its bf16 input, which may be part of it)."""
    k, I = shape.top_k, shape.intermediate
    routed = 2 * b * I + FLOAT32 if kernels.cuda else 4 * FLOAT32 * I + FLOAT32
    router = FLOAT32 * shape.experts + INDEX_BYTES * k + (FLOAT32 * k + FLOAT32 if shape.renormalize else 0)
    terms = {"routed experts": k * routed, "sort indices": k * 2 * INDEX_BYTES, "router": router}
    if kernels.cuda:
        terms["unattributed"] = FLOAT32 * hidden_size
    if aux_loss:
        terms["balance loss"] = FLOAT32
    if shape.shared is not None:
        terms["shared expert"] = swiglu(shape.shared, b, kernels)
    return terms


def lora(adapted: Iterable[AdaptedLinear], b: int, kernels: Kernels, input_needs_grad: bool = True) -> Terms:
    """What LoRA keeps in one block. The low-rank products run in the activations' dtype
    (``adapters.layers.lora_compute_dtype``): each adapted linear keeps its scaled [T, r] product (per copy), and
    the input, a tensor the frozen product alone would let go, once per tensor read (``AdaptedLinear.reads``:
    q, k, v and the gates read one). With dropout each linear keeps its own dropped-out copy and, for the input's
    gradient, the mask: a bool per element on CUDA (``native_dropout``), the scaled mask in the input's dtype on
    the CPU; none for a block input that needs no gradient (``input_needs_grad`` False)."""
    mask = 1 if kernels.cuda else b
    products, inputs, seen = 0, 0, set()
    for linear in adapted:
        products += linear.copies * b * linear.rank
        if linear.dropout > 0:
            kept_mask = mask if input_needs_grad or not linear.reads_block_input else 0
            inputs += linear.copies * (b + kept_mask) * linear.in_features
        elif linear.reads not in seen:
            seen.add(linear.reads)
            inputs += linear.copies * b * linear.in_features
    return {"LoRA products": products, "LoRA inputs": inputs} if products else {}


def attention(layer: LayerShapes, b: int, kernels: Kernels) -> Terms:
    """The attention block of a decoder layer, per token: its kernel terms, latent norms and LoRA."""
    terms = kda(layer.attention, b, kernels) if isinstance(layer.attention, KDAShape) else mla(layer.attention, b,
                                                                                                  kernels)
    if layer.attention_norms:
        terms["latent norms"] = sum(rms_norm(width, b, kernels) for width in layer.attention_norms)
    return terms | lora(layer.attention_adapted, b, kernels, layer.gradient_from == "input")


def feed_forward(layer: LayerShapes, b: int, kernels: Kernels, aux_loss: bool) -> Terms:
    """The feed-forward block of a decoder layer, per token, with its LoRA."""
    shape = layer.feed_forward
    terms = (moe(shape, b, kernels, layer.hidden_size, aux_loss) if isinstance(shape, MoEShape)
             else {"swiglu": swiglu(shape, b, kernels)})
    return terms | lora(layer.feed_forward_adapted, b, kernels, layer.gradient_from in ("input", "attention"))


@dataclass(frozen=True)
class LayerTerms:
    """Bytes per token one decoder layer keeps: its two RMS norms, its attention and feed-forward blocks."""

    norms: int
    attention: Terms
    feed_forward: Terms

    @property
    def total(self) -> int:
        return self.norms + total(self.attention) + total(self.feed_forward)


def layer(shape: LayerShapes, b: int, kernels: Kernels, aux_loss: bool = False) -> LayerTerms:
    """Decoder layer ``shape`` (its output is kept by the next layer's input norm, not counted here). Before the
    first trained parameter (``shape.gradient_from``) nothing is kept: no op there reads a tensor that needs a
    gradient. The block holding it is counted whole (exact when its first op is adapted, as with q, k and v)."""
    start = shape.gradient_from
    input_norm = rms_norm(shape.input_norm, b, kernels) if start == "input" else 0
    post_norm = rms_norm(shape.post_attention_norm, b, kernels) if start in ("input", "attention") else 0
    return LayerTerms(
        norms=input_norm + post_norm,
        attention=attention(shape, b, kernels) if start in ("input", "attention") else {},
        feed_forward=feed_forward(shape, b, kernels, aux_loss) if start != "nothing" else {},
    )


def full_finetune_inputs(shape: LayerShapes, b: int) -> int:
    """Full fine-tuning: each projection keeps its (autocast bf16) input for its weight gradient, a copy per
    linear (autocast casts each linear's input apart). Not measured: the trained norms, router and embeddings keep
    more."""
    return sum(b * p.in_features * p.copies for p in shape.projections)


def loss(hidden_size: int, b: int) -> int:
    """kimitune's fused cross-entropy keeps the gradient of the final hidden states [T, C], computed in the forward
    (its [chunk, V] logits are freed before the backward); the frozen embedding lookup keeps nothing."""
    return b * hidden_size


def forward_working_set(shape: LayerShapes, b: int) -> int:
    """Bytes per token a decoder layer holds for a moment in its forward beyond what it keeps: in a MoE layer the
    expert rows (per routed copy its input, gate_up output and SwiGLU output, C + 3I values), in a dense one the
    MLP's intermediate (benchmarks/RESULTS.md has the measured working sets)."""
    ff = shape.feed_forward
    if isinstance(ff, MoEShape):
        return ff.top_k * b * (shape.hidden_size + 3 * ff.intermediate)
    return b * ff.intermediate


def piece_states(shape: LayerShapes, b: int, tokens: int, piece_len: int) -> int:
    """What a layer computed in pieces (model/pieces.py) keeps between them for the backward, in bytes for a row of
    ``tokens``: a KDA layer's float32 recurrent state [H, K, V] and short-conv state [3HK, 4] at every cut, an MLA
    layer's latents and shared keys for every token."""
    attention = shape.attention
    if isinstance(attention, KDAShape):
        cuts = -(-tokens // piece_len) - 1
        return cuts * (FLOAT32 * attention.heads * attention.head_dim ** 2 + b * 3 * attention.channels * 4)
    return b * attention.latent_and_shared_key * tokens


def piece_attention_keys(shape: LayerShapes, b: int, tokens: int) -> int:
    """An MLA piece recomputed in the backward attends over the earlier tokens of its row one block (an earlier
    piece of ``tokens``) at a time: that block's keys and values expanded from their latents, [H, S, qk + v], and
    their gradients (0 for KDA; kimitune.ops.prefix_attention)."""
    attention = shape.attention
    if isinstance(attention, KDAShape):
        return 0
    return 2 * b * attention.heads * (attention.qk_head_dim + attention.v_head_dim) * tokens