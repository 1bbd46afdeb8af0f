"""fla-core's Triton kernels behind kimitune's operator API for KDA and the short conv (fla imported lazily; the fused
norms are in kimitune/ops/norm.py).

Used for CUDA tensors: KDA (``fla.ops.kda``) and the short convolution (``fla.modules.causal_conv1d``). The wrappers
pass tensors through untouched (no copies, no host syncs). For packed batches fla needs ``cu_seqlens`` on the GPU
and, to build its chunk tables without a device-to-host sync, a host copy (``cu_seqlens_cpu``): both come from the
batch's ``BatchLayout`` (ops/batch_layout.py). A layout built from bounds on the GPU only has no host copy, and fla
reads them back.

Context parallelism (model/context_parallel.py): :func:`context_parallel_context` builds fla's ``FLACPContext`` for
this rank's share of a row (rank r holds tokens [r * L, (r + 1) * L), fla's 'contiguous' layout), and ``chunk_kda`` and
``causal_conv1d`` given it as ``cp_context`` hand it to fla alone: fla takes the rank's bounds from it and passes the
conv's last inputs and the recurrent state between the ranks itself (no initial or final states here).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import torch

from kimitune.ops import tuned_kernels
from kimitune.ops.batch_layout import BatchLayout
from kimitune.ops.conv import check_conv_inputs
from kimitune.ops.kda.checks import check_kda_inputs

_INSTALL_HINT = (
    "kimitune runs KDA and its short convolution on CUDA tensors through fla-core's Triton kernels, "
    "which could not be imported. Install them with `pip install 'kimitune[gpu]'` (fla-core>=0.6.0)."
)


@functools.cache
def _fla() -> SimpleNamespace:
    try:
        from fla.modules.causal_conv1d import causal_conv1d, causal_conv1d_update
        from fla.ops.kda import chunk_kda, fused_recurrent_kda
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    from fla.ops.utils.index import prepare_chunk_indices

    tuned_kernels.seed_after_import()  # this GPU's kept configs, before the kernels' first launch

    return SimpleNamespace(
        prepare_chunk_indices=prepare_chunk_indices,
        chunk_kda=chunk_kda,
        fused_recurrent_kda=fused_recurrent_kda,
        causal_conv1d=causal_conv1d,
        causal_conv1d_update=causal_conv1d_update,
    )


def _cu_seqlens_args(layout: BatchLayout | None) -> dict[str, torch.Tensor | None]:
    """fla's ``cu_seqlens`` (on the device) and ``cu_seqlens_cpu`` (the host copy, or None) for one call."""
    if layout is None:
        return {"cu_seqlens": None, "cu_seqlens_cpu": None}
    return {"cu_seqlens": layout.cu_seqlens, "cu_seqlens_cpu": layout.cu_seqlens_cpu}


FLA_CHUNK_SIZE = 64  # fla's chunk_kda default, the size its chunk tables are built for


def _chunk_tables_ready(layout: BatchLayout) -> None:
    """Builds fla's chunk table for ``layout`` on a side stream, once per layout, before chunk_kda asks for it (and
    hands it to fla's short conv, whose chunks are of the same 64 tokens).

    fla makes the table on the host and copies it to the GPU from pageable memory, a copy that waits for every kernel
    queued on its stream: on the compute stream, each new batch would stop the host from queuing ahead. Made here on
    an empty side stream, the wait is for that stream alone; fla then finds the table in its cache (keyed by the very
    tensors it is called with, passed the same way as chunk_kda passes them)."""
    if layout.cu_seqlens_cpu is None or not layout.cu_seqlens.is_cuda or "fla_chunk_tables" in layout.__dict__:
        return
    # fla reads only the host bounds (and the device tensor's dtype and device): nothing to wait for on the side stream.
    side = torch.cuda.Stream(device=layout.cu_seqlens.device)
    debug_mode = torch.cuda.get_sync_debug_mode()
    if debug_mode:  # setting it warns that the mode is a prototype: only a run that turned it on hears that
        torch.cuda.set_sync_debug_mode(0)  # the side stream's wait stalls nothing that the compute stream queued
    try:
        with torch.cuda.stream(side):
            table = _fla().prepare_chunk_indices(cu_seqlens=layout.cu_seqlens, chunk_size=FLA_CHUNK_SIZE,
                                                 cu_seqlens_cpu=layout.cu_seqlens_cpu)
    finally:
        if debug_mode:
            torch.cuda.set_sync_debug_mode(debug_mode)
    table.record_stream(torch.cuda.current_stream(table.device))  # copied (synchronously) there, read here
    layout.__dict__["fla_chunk_tables"] = table  # keeps it alive with the layout; the layout is frozen otherwise


def _checked_bounds(layout: BatchLayout | None) -> torch.Tensor | None:
    return None if layout is None else layout.checked_bounds


def kernels_available() -> bool:
    """Whether fla-core's kernels import (without raising: callers that need them word their own error)."""
    try:
        _fla()
    except ImportError:
        return False
    return True


def context_parallel_available() -> bool:
    """Whether fla-core's context parallelism (``fla.ops.cp``) imports, as well as its kernels. Not cached: a
    module already imported is a dictionary look-up, and a missing one is asked after once per row."""
    try:
        import fla.ops.cp  # noqa: F401
    except ImportError:
        return False
    return kernels_available()


def context_parallel_context(layout: BatchLayout | None, total: int, group, conv_kernel_size: int,
                             device: torch.device) -> Any:
    """fla's ``FLACPContext`` for this rank of ``group``'s share of a row of ``total`` tokens: its local bounds (of
    the rank's ``total / ranks`` consecutive tokens, as ``split_into_pieces`` cuts them), where its first and last
    sequences start and end among the ranks, and the short conv's width ``conv_kernel_size`` (fla passes the last
    W - 1 inputs on). ``layout``: the whole row's (its global ``cu_seqlens``), None for an unpacked row (one
    sequence, bounds [0, total]). Every rank of ``group`` builds one for the same row."""
    try:
        from fla.ops.cp import build_cp_context
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    if layout is None:  # one sequence: fla's CP kernels work on packed bounds only
        layout = BatchLayout.of(torch.tensor([0, total], dtype=torch.int32), device, total)
    # The host bounds, so that fla cuts the row without reading the GPU back; the device ones tell it where to put
    # the local bounds.
    return build_cp_context(layout.cu_seqlens, group, conv1d_kernel_size=conv_kernel_size,
                            cu_seqlens_cpu=layout.host_bounds, layout="contiguous")


def _check_cp_call(x: torch.Tensor, initial_state, output_final_state: bool, layout: BatchLayout | None,
                   where: str) -> None:
    """What fla's context-parallel paths refuse (with asserts), refused here with a message: states in or out
    (fla passes them between the ranks itself), bounds other than the context's, a batch of several rows."""
    if initial_state is not None or output_final_state:
        raise ValueError(f"{where}: with cp_context fla passes the states between the ranks itself: no "
                         "initial_state, no output_final_state")
    if layout is not None:
        raise ValueError(f"{where}: with cp_context the bounds are the context's (this rank's tokens): pass "
                         "cu_seqlens=None")
    if x.shape[0] != 1:
        raise ValueError(f"{where}: cp_context takes one row [1, T, ...], got batch size {x.shape[0]}")


def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
              use_qk_l2norm_in_kernel=False, cu_seqlens=None, A_log=None, dt_bias=None, keep_intermediates=False,
              cp_context=None):
    """fla's chunkwise KDA; arguments and results as ``kimitune.ops.chunk_kda``, ``cu_seqlens`` a ``BatchLayout``
    or None (``A_log``: fla's ``use_gate_in_kernel``; ``keep_intermediates``: its ``disable_recompute``).
    ``cp_context``: fla's context parallelism (:func:`context_parallel_context`) for q [1, L, H, K], this rank's
    tokens: the bounds and the state passing are the context's, so no ``cu_seqlens`` and no states."""
    check_kda_inputs(q, k, v, g, beta, initial_state, _checked_bounds(cu_seqlens), "chunk_kda")
    gate = {} if A_log is None else {"use_gate_in_kernel": True, "A_log": A_log.view(-1), "dt_bias": dt_bias}
    if cp_context is not None:  # fla reads the local bounds from the context (and builds their chunk table)
        _check_cp_call(q, initial_state, output_final_state, cu_seqlens, "chunk_kda")
        rows = {"cp_context": cp_context}
    else:
        if cu_seqlens is not None:
            _chunk_tables_ready(cu_seqlens)
        rows = {"initial_state": initial_state, "output_final_state": output_final_state,
                **_cu_seqlens_args(cu_seqlens)}
    return _fla().chunk_kda(
        q, k, v, g, beta,
        scale=scale,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        disable_recompute=keep_intermediates,
        **gate,
        **rows,
    )


def fused_recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                        use_qk_l2norm_in_kernel=False, cu_seqlens=None):
    """fla's token-by-token KDA (forward only); arguments and results as ``kimitune.ops.fused_recurrent_kda``."""
    check_kda_inputs(q, k, v, g, beta, initial_state, _checked_bounds(cu_seqlens), "fused_recurrent_kda")
    return _fla().fused_recurrent_kda(
        q, k, v, g, beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        cu_seqlens=_cu_seqlens_args(cu_seqlens)["cu_seqlens"],
    )


def causal_conv1d(x, weight, bias=None, activation=None, initial_state=None, output_final_state=False,
                  cu_seqlens=None, cp_context=None):
    """fla's packed-aware causal depthwise conv; arguments and results as ``kimitune.ops.causal_conv1d``.
    ``cp_context``: fla's context parallelism for x [1, L, D], this rank's tokens (fla's causal_conv1d_cp: the first
    W - 1 taps of a sequence that began on an earlier rank read that rank's last inputs); no ``cu_seqlens``, no
    states."""
    check_conv_inputs(x, weight, bias, activation, initial_state, _checked_bounds(cu_seqlens), "causal_conv1d")
    if cp_context is not None:
        _check_cp_call(x, initial_state, output_final_state, cu_seqlens, "causal_conv1d")
        return _fla().causal_conv1d(x, weight=weight, bias=bias, activation=activation, cp_context=cp_context)
    tables = {}
    if cu_seqlens is not None:
        # fla's conv would build its table (chunks of 64, as chunk_kda's) on the compute stream, from pageable
        # memory, at every forward: a wait for all the queued kernels. The layout's side-stream table is the same.
        _chunk_tables_ready(cu_seqlens)
        tables["chunk_indices"] = cu_seqlens.__dict__.get("fla_chunk_tables")
    return _fla().causal_conv1d(
        x,
        weight=weight,
        bias=bias,
        initial_state=initial_state,
        output_final_state=output_final_state,
        activation=activation,
        **_cu_seqlens_args(cu_seqlens),
        **tables,
    )


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """fla's decode step; updates ``conv_state`` in place and returns (y, conv_state)."""
    check_conv_inputs(x, weight, bias, activation, conv_state, None, "causal_conv1d_update")
    return _fla().causal_conv1d_update(x, conv_state, weight=weight, bias=bias, activation=activation)
