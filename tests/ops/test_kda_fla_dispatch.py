"""The fla-core wrappers (kimitune/ops/kda/fla.py) without a GPU: the message when fla is missing, and what the
wrappers hand to fla (checked with a stand-in fla module)."""

from __future__ import annotations

import importlib.util
import inspect
import sys
import types

import pytest
import torch

from kimitune.ops.batch_layout import BatchLayout
from kimitune.ops.kda import fla as fla_backend


@pytest.fixture
def fake_fla(monkeypatch):
    """Installs stand-in fla modules that record their calls."""
    calls = {}

    def recorder(name, result):
        def fn(*args, **kwargs):
            calls[name] = (args, kwargs)
            return result(*args)
        return fn

    kda = types.ModuleType("fla.ops.kda")
    kda.chunk_kda = recorder("chunk_kda", lambda q, *rest: (q, None))
    kda.fused_recurrent_kda = recorder("fused_recurrent_kda", lambda q, *rest: (q, None))
    conv = types.ModuleType("fla.modules.causal_conv1d")
    conv.causal_conv1d = recorder("causal_conv1d", lambda x: (x, None))
    conv.causal_conv1d_update = recorder("causal_conv1d_update", lambda x, state: (x, state))
    index = types.ModuleType("fla.ops.utils.index")
    index.prepare_chunk_indices = recorder("prepare_chunk_indices", lambda *args: None)
    for name in ("fla", "fla.ops", "fla.modules", "fla.ops.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.utils.index", index)
    monkeypatch.setitem(sys.modules, "fla.ops.kda", kda)
    monkeypatch.setitem(sys.modules, "fla.modules.causal_conv1d", conv)
    fla_backend._fla.cache_clear()
    yield calls
    fla_backend._fla.cache_clear()


def kda_inputs(T=12, N=None):
    q = torch.randn(1, T, 2, 4)
    return [q, torch.randn_like(q), torch.randn(1, T, 2, 3), -torch.rand_like(q), torch.rand(1, T, 2)]


def test_missing_fla_names_the_install_command():
    if importlib.util.find_spec("fla") is not None:
        pytest.skip("fla-core is installed here")
    fla_backend._fla.cache_clear()
    with pytest.raises(ImportError, match=r"pip install 'kimitune\[gpu\]'"):
        fla_backend.chunk_kda(*kda_inputs())


def test_chunk_kda_passes_tensors_through_and_both_cu_seqlens(fake_fla):
    q, k, v, g, beta = kda_inputs()
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    h0 = torch.zeros(2, 2, 4, 3)
    fla_backend.chunk_kda(q, k, v, g, beta, 0.5, h0, True, True, BatchLayout.of(cu, "cpu"))
    args, kwargs = fake_fla["chunk_kda"]
    assert all(a is b for a, b in zip(args, (q, k, v, g, beta)))  # no copies
    assert kwargs["initial_state"] is h0 and kwargs["scale"] == 0.5
    assert kwargs["output_final_state"] is True and kwargs["use_qk_l2norm_in_kernel"] is True
    assert kwargs["cu_seqlens_cpu"] is cu  # host copy: fla builds its chunk tables without a device sync
    assert torch.equal(kwargs["cu_seqlens"], cu)


def test_chunk_kda_hands_the_gate_parameters_to_fla(fake_fla):
    q, k, v, f, beta = kda_inputs()
    A_log, dt_bias = torch.zeros(1, 1, 2, 1), torch.zeros(8)
    fla_backend.chunk_kda(q, k, v, f, beta, A_log=A_log, dt_bias=dt_bias)
    kwargs = fake_fla["chunk_kda"][1]
    assert kwargs["use_gate_in_kernel"] is True and kwargs["dt_bias"] is dt_bias
    assert kwargs["A_log"].shape == (2,) and kwargs["A_log"].data_ptr() == A_log.data_ptr()  # fla takes A_log [H]
    fla_backend.chunk_kda(q, k, v, f, beta)
    assert "use_gate_in_kernel" not in fake_fla["chunk_kda"][1]


def test_keeping_intermediates_is_flas_disable_recompute(fake_fla):
    fla_backend.chunk_kda(*kda_inputs())
    assert fake_fla["chunk_kda"][1]["disable_recompute"] is False
    fla_backend.chunk_kda(*kda_inputs(), keep_intermediates=True)
    assert fake_fla["chunk_kda"][1]["disable_recompute"] is True


def test_a_layout_gives_fla_its_device_bounds_and_the_host_copy(fake_fla):
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    layout = BatchLayout.of(cu, "meta")
    args = fla_backend._cu_seqlens_args(layout)
    assert args["cu_seqlens"] is layout.cu_seqlens and args["cu_seqlens"].device.type == "meta"
    assert args["cu_seqlens_cpu"] is cu
    assert fla_backend._cu_seqlens_args(None) == {"cu_seqlens": None, "cu_seqlens_cpu": None}


def test_bounds_given_on_the_device_have_no_host_copy(fake_fla):
    cu = torch.tensor([0, 5, 12], device="meta")
    layout = BatchLayout.of(cu, "meta", total=12)
    assert fla_backend._cu_seqlens_args(layout) == {"cu_seqlens": cu, "cu_seqlens_cpu": None}


def test_recurrent_and_conv_wrappers(fake_fla):
    q, k, v, g, beta = kda_inputs()
    fla_backend.fused_recurrent_kda(q, k, v, g, beta, None, None, False, False,
                                    BatchLayout.of(torch.tensor([0, 12]), "cpu"))
    assert "cu_seqlens_cpu" not in fake_fla["fused_recurrent_kda"][1]  # fla's recurrent kernel takes no host copy

    x, weight, state = torch.randn(1, 12, 6), torch.randn(6, 4), torch.zeros(2, 6, 4)
    fla_backend.causal_conv1d(x, weight, None, "silu", state, True, BatchLayout.of(torch.tensor([0, 7, 12]), "cpu"))
    args, kwargs = fake_fla["causal_conv1d"]
    assert args[0] is x and kwargs["weight"] is weight and kwargs["initial_state"] is state
    assert kwargs["activation"] == "silu" and kwargs["cu_seqlens_cpu"] is not None
    assert kwargs["chunk_indices"] is None  # no table on a CPU layout: fla would build its own

    y, returned = fla_backend.causal_conv1d_update(x[0, :2], state, weight, None, "silu")
    assert returned is state
    with pytest.raises(ValueError, match="causal_conv1d: unsupported activation"):
        fla_backend.causal_conv1d(x, weight, None, "gelu", None, False, None)


def test_the_conv_reads_the_layouts_chunk_table(fake_fla):
    """A layout's chunk table (built once on a side stream, as for chunk_kda) goes to fla's conv, which would
    otherwise build it on the compute stream at every forward (layers in pieces, preference rows), waiting for the
    GPU each time; the conv's chunks are chunk_kda's 64 tokens."""
    x, weight, state = torch.randn(1, 12, 6), torch.randn(6, 4), torch.zeros(2, 6, 4)
    layout = BatchLayout.of(torch.tensor([0, 7, 12], dtype=torch.int32), "cpu")
    table = torch.tensor([[0, 0], [1, 0]], dtype=torch.int32)
    layout.__dict__["fla_chunk_tables"] = table  # as _chunk_tables_ready leaves it on a CUDA layout
    fla_backend.causal_conv1d(x, weight, None, "silu", state, True, layout)
    assert fake_fla["causal_conv1d"][1]["chunk_indices"] is table


def test_flas_conv_chunks_are_chunk_kdas():
    """The shared table holds for the fla installed: its conv's chunk size is the one the table is built for."""
    ops = pytest.importorskip("fla.modules.causal_conv1d.ops", reason="fla-core is not installed here")
    assert inspect.signature(ops.CausalConv1dFunction.forward).parameters["chunk_size"].default == \
        fla_backend.FLA_CHUNK_SIZE


CP_CONTEXT = object()  # stands for fla's FLACPContext: the wrappers pass it on untouched


def test_a_cp_context_goes_to_fla_alone(fake_fla):
    """With ``cp_context`` fla takes the rank's bounds from it and passes the states itself: no cu_seqlens, no
    states reach fla's chunk_kda or causal_conv1d."""
    q, k, v, f, beta = kda_inputs()
    A_log, dt_bias = torch.zeros(1, 1, 2, 1), torch.zeros(8)
    fla_backend.chunk_kda(q, k, v, f, beta, 0.5, use_qk_l2norm_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
                          keep_intermediates=True, cp_context=CP_CONTEXT)
    args, kwargs = fake_fla["chunk_kda"]
    assert all(a is b for a, b in zip(args, (q, k, v, f, beta)))
    assert kwargs["cp_context"] is CP_CONTEXT and kwargs["use_gate_in_kernel"] is True
    assert kwargs["scale"] == 0.5 and kwargs["use_qk_l2norm_in_kernel"] is True and kwargs["disable_recompute"]
    assert not {"cu_seqlens", "cu_seqlens_cpu", "initial_state", "output_final_state"} & kwargs.keys()
    assert "prepare_chunk_indices" not in fake_fla  # fla builds the local chunk table from the context's bounds

    x, weight = torch.randn(1, 12, 6), torch.randn(6, 4)
    fla_backend.causal_conv1d(x, weight, None, "silu", cp_context=CP_CONTEXT)
    args, kwargs = fake_fla["causal_conv1d"]
    assert args[0] is x and kwargs["weight"] is weight and kwargs["activation"] == "silu"
    assert kwargs["cp_context"] is CP_CONTEXT
    assert not {"cu_seqlens", "cu_seqlens_cpu", "initial_state", "output_final_state"} & kwargs.keys()


def test_a_cp_context_refuses_states_bounds_and_several_rows(fake_fla):
    q, k, v, g, beta = kda_inputs()
    with pytest.raises(ValueError, match="no initial_state, no output_final_state"):
        fla_backend.chunk_kda(q, k, v, g, beta, output_final_state=True, cp_context=CP_CONTEXT)
    with pytest.raises(ValueError, match="pass cu_seqlens=None"):
        fla_backend.chunk_kda(q, k, v, g, beta, cu_seqlens=BatchLayout.of(torch.tensor([0, 12]), "cpu"),
                              cp_context=CP_CONTEXT)
    x, weight = torch.randn(2, 12, 6), torch.randn(6, 4)
    with pytest.raises(ValueError, match="one row"):
        fla_backend.causal_conv1d(x, weight, None, "silu", cp_context=CP_CONTEXT)
    with pytest.raises(ValueError, match="no initial_state"):
        fla_backend.causal_conv1d(x[:1], weight, None, "silu", torch.zeros(1, 6, 4), cp_context=CP_CONTEXT)
    assert "chunk_kda" not in fake_fla and "causal_conv1d" not in fake_fla


def test_the_dispatchers_refuse_a_cp_context_without_kernels():
    """fla's context parallelism has no PyTorch path: CPU tensors (or forced references) with a cp_context fail."""
    import kimitune.ops as ops

    q, k, v, g, beta = kda_inputs()
    with pytest.raises(ValueError, match=r"chunk_kda: cp_context .* needs CUDA tensors and fla-core's kernels"):
        ops.chunk_kda(q, k, v, g, beta, cp_context=CP_CONTEXT)
    with pytest.raises(ValueError, match=r"causal_conv1d: cp_context .* needs CUDA tensors and fla-core's kernels"):
        ops.causal_conv1d(torch.randn(1, 12, 6), torch.randn(6, 4), activation="silu", cp_context=CP_CONTEXT)


def test_the_dispatchers_send_a_cp_context_to_fla_also_for_silu(fake_fla, monkeypatch):
    """Where kimitune's own conv kernel would take SiLU without states, a cp_context still goes to fla's conv (it
    reads the previous rank's inputs); the parts are cut from fla's output."""
    import kimitune.ops as ops

    monkeypatch.setattr(ops, "use_kernels", lambda x: True)  # as on CUDA tensors
    monkeypatch.setattr(ops, "conv_silu", lambda *args: pytest.fail("kimitune's conv kernel ran with a cp_context"))
    x, weight = torch.randn(1, 12, 6), torch.randn(6, 4)
    parts, state = ops.causal_conv1d(x, weight, activation="silu", parts=3, cp_context=CP_CONTEXT)
    assert fake_fla["causal_conv1d"][1]["cp_context"] is CP_CONTEXT and state is None
    assert len(parts) == 3 and torch.equal(torch.cat(parts, dim=-1), x)

    q, k, v, g, beta = kda_inputs()
    o, final = ops.chunk_kda(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, cp_context=CP_CONTEXT)
    assert o is q and final is None and fake_fla["chunk_kda"][1]["cp_context"] is CP_CONTEXT


def test_the_context_is_built_from_the_rows_global_bounds(fake_fla, monkeypatch):
    """context_parallel_context hands fla the whole row's bounds (device and host): an unpacked row's are [0, T]."""
    cp = types.ModuleType("fla.ops.cp")
    built = []
    cp.build_cp_context = lambda cu_seqlens, group, **kwargs: built.append((cu_seqlens, group, kwargs)) or "ctx"
    monkeypatch.setitem(sys.modules, "fla.ops.cp", cp)
    group = object()
    assert fla_backend.context_parallel_context(None, 48, group, 4, torch.device("cpu")) == "ctx"
    cu_seqlens, given_group, kwargs = built[-1]
    assert given_group is group and torch.equal(cu_seqlens, torch.tensor([0, 48], dtype=torch.int32))
    assert kwargs == {"conv1d_kernel_size": 4, "cu_seqlens_cpu": kwargs["cu_seqlens_cpu"], "layout": "contiguous"}
    assert kwargs["cu_seqlens_cpu"].tolist() == [0, 48]

    bounds = torch.tensor([0, 3, 17, 48], dtype=torch.int32)
    layout = BatchLayout.of(bounds, "cpu")
    fla_backend.context_parallel_context(layout, 48, group, 4, torch.device("cpu"))
    cu_seqlens, _, kwargs = built[-1]
    assert cu_seqlens is layout.cu_seqlens and kwargs["cu_seqlens_cpu"] is bounds  # no read-back of the GPU
    assert fla_backend.context_parallel_available()
