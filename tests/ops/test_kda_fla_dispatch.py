"""The fla-core wrappers (kimitune/ops/kda/fla.py) without a GPU: the message when fla is missing, and what the
wrappers hand to fla (checked with a stand-in fla module)."""

from __future__ import annotations

import importlib.util
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

    y, returned = fla_backend.causal_conv1d_update(x[0, :2], state, weight, None, "silu")
    assert returned is state
    with pytest.raises(ValueError, match="causal_conv1d: unsupported activation"):
        fla_backend.causal_conv1d(x, weight, None, "gelu", None, False, None)
