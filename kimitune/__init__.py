"""kimitune: fine-tune Moonshot AI's Kimi Linear models fast, lean and correctly.

``KimiLinearConfig`` and ``KimiLinearForCausalLM`` are imported on first use, so that importing kimitune (the
CLI, the YAML schema) does not load torch.
"""

import os

# OpenMP threads that spin while they wait turn every small CPU op into a stall as soon as another process wants a
# core (benchmarks/RESULTS.md, "OpenMP wait policy"). Sleeping waits cost nothing on an idle machine. Takes effect only
# when kimitune is imported before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Triton keeps fla's autotuning results on disk, so a second process skips the tuning; must precede fla's import.
from kimitune.triton_env import apply_triton_defaults  # noqa: E402

apply_triton_defaults()

__version__ = "0.1.0"

__all__ = ["KimiLinearConfig", "KimiLinearForCausalLM", "__version__"]


def __getattr__(name: str):
    if name in ("KimiLinearConfig", "KimiLinearForCausalLM"):
        from kimitune import model

        return getattr(model, name)
    raise AttributeError(f"module 'kimitune' has no attribute {name!r}")
