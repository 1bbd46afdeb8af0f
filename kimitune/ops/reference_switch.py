"""One switch that sends every dispatching op of kimitune.ops down its PyTorch reference path, on every device.

    KIMITUNE_REFERENCE_OPS=1              read once, when kimitune.ops is first imported: the process's default
    kimitune.ops.force_reference(True)    sets it from code (a call: from then on; ``with``: for the block only)
    kimitune.ops.reference_forced()       whether it is on

With it on, no kernel of kimitune's or fla-core's, no cut-cross-entropy, no ``torch._grouped_mm`` and no varlen flash
attention runs: each op computes with its ``*_reference`` function (the naming rule in kimitune/ops/__init__.py),
also on CUDA tensors. That tells a kernel's fault from the model's on a GPU (the references are what the tests hold
the kernels to), and measures what the kernels buy. Every dispatcher reads it at call time, so it also applies to
models already built.
"""

from __future__ import annotations

import os

import torch

ENV_VAR = "KIMITUNE_REFERENCE_OPS"
_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")


def _from_environment() -> bool:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value not in _ON + _OFF:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: use 1 (the PyTorch reference ops everywhere) or 0")
    return value in _ON


_forced = _from_environment()


def reference_forced() -> bool:
    """Whether every op takes its PyTorch reference path (``force_reference`` / KIMITUNE_REFERENCE_OPS)."""
    return _forced


class force_reference:
    """``force_reference(on=True)``: every op of kimitune.ops takes its PyTorch reference path while it is on.

    Called, it sets the switch for the process; as a context manager (``with force_reference():``) it restores the
    previous setting when the block ends, so blocks nest.
    """

    def __init__(self, on: bool = True):
        global _forced
        self.previous = _forced
        _forced = bool(on)

    def __enter__(self) -> force_reference:
        return self

    def __exit__(self, *exc_info) -> None:
        global _forced
        _forced = self.previous


def use_kernels(x: torch.Tensor) -> bool:
    """Whether an op on ``x`` may run a kernel: x is a CUDA tensor and the reference path is not forced (each op
    adds its own conditions: dtypes, fla-core installed)."""
    return x.is_cuda and not _forced
