"""kimitune: fine-tune Moonshot AI's Kimi Linear models fast, lean and correctly.

``KimiLinearConfig`` and ``KimiLinearForCausalLM`` are imported on first use, so that importing kimitune (the
CLI, the YAML schema) does not load torch.
"""

import os

# How long torch's OpenMP threads (GNU libgomp) spin before they sleep, waiting for work (benchmarks/RESULTS.md,
# "OpenMP wait policy"). libgomp's default (~3 ms) turns every small CPU op into a stall as soon as another process
# wants a core; sleeping at once (OMP_WAIT_POLICY=PASSIVE) made the tiny model's DPO steps 1.7x slower on an idle
# machine. A short spin (~10 us) keeps most of both. A policy or spin count the user set is left alone. Takes effect
# only when kimitune is imported before torch.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

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
