"""Environment defaults for Triton and fla-core: autotuning results kept on disk, so a new process reuses them.

fla-core's Triton kernels are autotuned per shape class (its ``key`` arguments: head counts, head sizes, block
sizes, dtypes): every candidate config is compiled and timed, which is nearly all of a first GPU run's time.
Triton (3.4 and later) can store each tuning's timings in its cache (``TRITON_CACHE_DIR``, default
``~/.triton/cache``) under a hash of the Triton version, the GPU target, the kernel's source, the tuning key and the
candidate configs, and read the best config from there in a later process instead of timing again. An autotuner
does that when built with ``cache_results=True`` or when ``TRITON_CACHE_AUTOTUNING=1``; it reads both when the kernel
is defined, i.e. when fla's modules are imported, so these defaults must be in the environment before that:
``kimitune/__init__.py`` applies them, and every kimitune entry point (the CLI, ``torchrun -m kimitune``, the
benchmarks, library use) imports kimitune before it can import fla.

- ``TRITON_CACHE_AUTOTUNING=1``: every ``triton.autotune`` autotuner caches to disk, whatever its decorator passed.
- ``FLA_CACHE_RESULTS=1``: fla-core (0.6) passes ``cache_results`` to its autotuners from this variable; its default
  is already 1, set here so that the two agree and the choice is visible in the environment.
- Across machines: kimitune/ops/tuned_kernels.py seeds the autotuners with shipped and earlier-tuned configs; the
  Triton cache above is keyed by hashes of the Triton build and each kernel's source, so it serves only the
  machine that tuned.

A variable the user has set is never changed, and a user who turned fla's caching off (``FLA_CACHE_RESULTS=0``)
keeps all of it off.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

DEFAULTS: dict[str, str] = {"TRITON_CACHE_AUTOTUNING": "1", "FLA_CACHE_RESULTS": "1"}


def apply_triton_defaults(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Sets each of ``DEFAULTS`` that ``environ`` does not set (see the module docstring); returns what it set."""
    if environ.get("FLA_CACHE_RESULTS") == "0":  # the user wants no tuning results on disk
        return {}
    applied = {key: value for key, value in DEFAULTS.items() if key not in environ}
    environ.update(applied)
    return applied
