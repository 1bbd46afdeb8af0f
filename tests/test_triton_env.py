"""kimitune's Triton / fla-core environment defaults: set before fla can be imported, never over the user's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kimitune.triton_env import DEFAULTS, apply_triton_defaults

ROOT = Path(__file__).resolve().parents[1]
SHOW = "import json, os, sys, kimitune.cli; print(json.dumps({k: os.environ.get(k) for k in sys.argv[1:]}))"


def environment_after_import(**env: str) -> dict[str, str | None]:
    """The variables as a fresh process sees them after importing kimitune's CLI, started with ``env``."""
    base = {k: v for k, v in os.environ.items() if k not in DEFAULTS} | {"PYTHONPATH": str(ROOT)} | env
    out = subprocess.run([sys.executable, "-c", SHOW, *DEFAULTS], env=base, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


def test_defaults_are_set_when_kimitune_is_imported():
    assert environment_after_import() == {"TRITON_CACHE_AUTOTUNING": "1", "FLA_CACHE_RESULTS": "1"}


@pytest.mark.parametrize("given, expected", [
    ({"TRITON_CACHE_AUTOTUNING": "0"}, {"TRITON_CACHE_AUTOTUNING": "0", "FLA_CACHE_RESULTS": "1"}),
    ({"FLA_CACHE_RESULTS": "1", "TRITON_CACHE_AUTOTUNING": ""},
     {"TRITON_CACHE_AUTOTUNING": "", "FLA_CACHE_RESULTS": "1"}),
    ({"FLA_CACHE_RESULTS": "0"}, {"TRITON_CACHE_AUTOTUNING": None, "FLA_CACHE_RESULTS": "0"}),
])
def test_the_users_values_are_kept(given, expected):
    assert environment_after_import(**given) == expected


def test_apply_returns_what_it_set():
    environ = {"TRITON_CACHE_AUTOTUNING": "0"}
    assert apply_triton_defaults(environ) == {"FLA_CACHE_RESULTS": "1"}
    assert environ == {"TRITON_CACHE_AUTOTUNING": "0", "FLA_CACHE_RESULTS": "1"}
    assert apply_triton_defaults(environ) == {}
