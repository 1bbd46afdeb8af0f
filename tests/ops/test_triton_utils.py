"""kimitune.ops.triton_utils: the block arithmetic (against the expressions the kernel files used before it), and
the first-launch import and jit (with a stand-in triton, so without one here)."""

from __future__ import annotations

import sys
import types

import pytest

from kimitune.ops import triton_utils
from kimitune.ops.triton_utils import block_size, cdiv, dividing_block, grid, jit_on_first_use, next_power_of_2

tl = None  # bound by the stand-in's first launch, as in a kernel module


def test_cdiv_and_next_power_of_2():
    assert [cdiv(n, 16) for n in (0, 1, 16, 17, 33)] == [0, 1, 1, 2, 3]
    assert [next_power_of_2(n) for n in (0, 1, 2, 3, 4, 5, 1000, 1024, 1025)] == [1, 1, 2, 4, 4, 8, 1024, 1024, 2048]


@pytest.mark.parametrize("cap", [16, 256, 1024, 4096])
def test_block_size_is_what_each_kernel_file_computed(cap):
    for n in range(0, 5000):
        # expert_combine.py and expert_swiglu.py
        assert block_size(n, cap) == min(cap, 1 << max(4, (n - 1).bit_length()))
        if n:  # softmax_grad.py (V >= 1)
            assert block_size(n, cap) == min(cap, max(16, 1 << (n - 1).bit_length()))


def test_dividing_block_and_grid_are_short_convs_tiling():
    for D in (0, 192, 200, 4096 * 3, 12288, 96 * 3):
        for parts in (1, 3):
            if D % parts:
                continue
            block_d = 128
            while parts > 1 and (D // parts) % block_d:  # short_conv.py's loop
                block_d //= 2
            expected = (block_d, (-(-150 // 16), -(-D // block_d)))
            got = dividing_block(128, D // parts) if parts > 1 else 128
            assert (got, grid((150, D), (16, got))) == expected


@pytest.fixture
def fake_triton(monkeypatch):
    """A stand-in triton whose jit records the kernels it was given."""
    jitted = []

    class Jitted:
        def __init__(self, fn):
            self.fn, self.grids = fn, []

        def __getitem__(self, grid):
            self.grids.append(grid)
            return lambda *args, **kwargs: (self.fn.__name__, grid, args, kwargs)

    def jit(fn):
        jitted.append(fn)
        return Jitted(fn)

    triton = types.ModuleType("triton")
    triton.jit = jit
    language = types.ModuleType("triton.language")
    triton.language = language
    monkeypatch.setitem(sys.modules, "triton", triton)
    monkeypatch.setitem(sys.modules, "triton.language", language)
    triton_utils.import_triton.cache_clear()
    yield jitted, language
    triton_utils.import_triton.cache_clear()
    globals()["tl"] = None


def _kernel(x_ptr, N):
    return tl


def test_first_launch_binds_tl_and_jits_once(fake_triton):
    jitted, language = fake_triton
    kernel = jit_on_first_use(_kernel)
    assert jitted == [] and tl is None  # nothing imported or jitted before the first launch
    assert kernel[(3,)]("x", 7) == ("_kernel", (3,), ("x", 7), {})
    assert kernel[(4, 2)]("y", 8)[1] == (4, 2)
    assert jitted == [_kernel]
    assert tl is language
    assert kernel.jitted().grids == [(3,), (4, 2)]


def test_missing_triton_says_how_to_install_it_and_how_to_interpret(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    triton_utils.import_triton.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install triton") as error:
            jit_on_first_use(_kernel)[(1,)]
        assert "TRITON_INTERPRET=1" in str(error.value) and "KIMITUNE_REFERENCE_OPS=1" in str(error.value)
    finally:
        triton_utils.import_triton.cache_clear()
