"""Running a test file's Triton kernels on the CPU: Triton's interpreter executes kernels on CPU tensors (through
NumPy), but only when TRITON_INTERPRET=1 is set before triton is first imported. A file marks its kernel tests
``@interpreted`` and has one ordinary test call ``run_interpreted(__file__)``, which runs them in a pytest subprocess
started with it set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETING, reason="runs in run_interpreted's subprocess")


def run_interpreted(test_file: str) -> None:
    """Runs ``test_file``'s ``interpreted`` tests under the interpreter; fails if any fails or is skipped there."""
    if INTERPRETING:
        pytest.skip("this process is the interpreter run")
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", "interpreted"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
