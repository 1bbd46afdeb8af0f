"""What every Triton kernel file in kimitune.ops shares: triton imported on first use, kernels jitted on first
launch, and the block and grid arithmetic of their launches.

A kernel file writes its kernels as plain functions, wraps each in :func:`jit_on_first_use` and launches it as
Triton's own: ``kernel[grid](...)``. triton is imported at the first launch only, so kimitune imports without it
(CPU installs), and TRITON_INTERPRET=1, which Triton reads when it is first imported, can still be set by then (the
tests run the kernels in Triton's CPU interpreter that way, ``tests/ops/triton_interpreter.py``).

Kernel bodies name ``tl`` (triton.language) as a global of their own module, as Triton's compiler and interpreter
resolve it there; a kernel module declares ``tl = None`` and the first launch binds it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

INSTALL_HINT = (
    "kimitune runs its Triton kernels on CUDA tensors, and triton could not be imported. It ships with PyTorch's "
    "CUDA builds (or `pip install triton`). On CPU tensors the kernels run only under Triton's interpreter: set "
    "TRITON_INTERPRET=1 before triton is first imported. kimitune.ops.force_reference(True) (or "
    "KIMITUNE_REFERENCE_OPS=1) runs the PyTorch references instead."
)


@functools.cache
def import_triton() -> tuple[ModuleType, ModuleType]:
    """(triton, triton.language), imported on the first call; an ImportError that says how to install it."""
    try:
        import triton
        import triton.language as language
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return triton, language


class jit_on_first_use:
    """``triton.jit(fn)``, made at the first launch (``kernel[grid](...)``) instead of at import.

    ``fn`` is a kernel written for ``triton.jit`` (its ``tl.constexpr`` annotations postponed by ``from __future__
    import annotations``); the first launch binds ``tl`` in its module and jits it once.
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        self._jitted = None
        functools.update_wrapper(self, fn)

    def jitted(self):
        """The ``triton.jit`` kernel (a ``JITFunction``, or an ``InterpretedFunction`` under TRITON_INTERPRET=1)."""
        if self._jitted is None:
            triton, language = import_triton()
            self.fn.__globals__["tl"] = language
            self._jitted = triton.jit(self.fn)
        return self._jitted

    def __getitem__(self, grid):
        return self.jitted()[grid]


def cdiv(n: int, block: int) -> int:
    """ceil(n / block) in integers: the programs that cover n items, ``block`` each."""
    return -(-n // block)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def block_size(n: int, cap: int, floor: int = 16) -> int:
    """A block for loops over ``n`` items: n rounded up to a power of two, at least ``floor`` and at most ``cap``.

    ``tl.arange`` needs a power of two; the floor keeps tiny widths on whole vectors, the cap bounds registers (a
    wider n is looped over)."""
    return min(cap, max(floor, next_power_of_2(n)))


def dividing_block(block: int, width: int) -> int:
    """``block`` (a power of two) halved until it divides ``width``, so no block straddles two ``width``-wide parts."""
    while width % block:
        block //= 2
    return block


def grid(sizes: tuple[int, ...], blocks: tuple[int, ...]) -> tuple[int, ...]:
    """Programs along each axis to tile ``sizes`` with ``blocks``: (cdiv(size, block), ...)."""
    return tuple(cdiv(size, block) for size, block in zip(sizes, blocks, strict=True))
