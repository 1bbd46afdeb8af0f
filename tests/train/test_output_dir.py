"""One run per output_dir: the lock (held by another process, released when that process is killed), a folder that
already holds a run (refused; resumed; overwritten), and an output_dir that is a file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from test_trainer import ROOT, losses, raw_config, run, small_data  # noqa: F401  (small_data is a fixture)
from typer.testing import CliRunner

from kimitune.cli import app
from kimitune.config import parse_config
from kimitune.train.distributed import World
from kimitune.train.output_dir import LOCK_FILE, OutputDirError, RunLock, claim_output_dir

QUIET = Console(quiet=True)
HOLD_LOCK = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from kimitune.train.output_dir import RunLock, LOCK_FILE\n"
    "lock = RunLock(Path(sys.argv[1]) / LOCK_FILE).acquire()\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)


def config_for(output_dir: Path, **overrides):
    raw = {"init_from_config": str(ROOT / "examples/models/tiny.json"), "tokenizer": str(ROOT / "examples/tokenizer"),
           "datasets": [{"path": "unused.jsonl"}], "output_dir": str(output_dir)} | overrides
    return parse_config(raw)[0]


@pytest.fixture
def holder(tmp_path):
    """A separate process that holds output_dir's lock until it is killed: (output_dir, process)."""
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(output_dir)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout.readline().strip() == "locked"  # blocks until the lock is taken
    yield output_dir, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_run_is_refused_while_another_process_holds_the_lock_and_not_after_it_is_killed(holder, small_data):
    output_dir, proc = holder
    stale = output_dir / ".checkpoint-4.tmp-abc"  # the other run's half-written checkpoint
    stale.mkdir()
    with pytest.raises(OutputDirError, match=rf"output_dir {output_dir} is in use by another kimitune run "
                                             rf"\(pid {proc.pid} on "):
        run(raw_config(small_data, output_dir, max_steps=1, save_steps=None, eval_steps=None))
    assert stale.is_dir(), "a refused run must not touch the running one's files"

    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert (output_dir / LOCK_FILE).is_file()  # the file stays; the kernel dropped the lock with the process
    summary = run(raw_config(small_data, output_dir, max_steps=1, save_steps=None, eval_steps=None))
    assert summary.steps == 1 and not stale.exists()  # now known to be a killed run's leftovers


def test_the_lock_is_exclusive_within_a_process_too_and_released_when_the_run_ends(tmp_path):
    config = config_for(tmp_path / "out")
    with claim_output_dir(tmp_path / "out", config, World(), QUIET):
        with pytest.raises(OutputDirError, match=f"pid {os.getpid()}"):
            claim_output_dir(tmp_path / "out", config, World(), QUIET)
    with claim_output_dir(tmp_path / "out", config, World(), QUIET):
        pass
    with RunLock(tmp_path / "out" / LOCK_FILE).acquire():
        pass


def test_an_output_dir_that_is_a_file_is_named(tmp_path):
    path = tmp_path / "out"
    path.write_text("not a folder")
    with pytest.raises(OutputDirError, match=f"output_dir {path} is a file, not a folder"):
        claim_output_dir(path, config_for(path), World(), QUIET)
    below = path / "run"
    with pytest.raises(OutputDirError, match=f"output_dir {below} cannot be made: a part of that path is a file"):
        claim_output_dir(below, config_for(below), World(), QUIET)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"init_from_config": str(ROOT / "examples/models/tiny.json"),
                                      "tokenizer": str(ROOT / "examples/tokenizer"),
                                      "datasets": [{"path": "unused.jsonl"}], "output_dir": str(path)}))
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 2 and "is a file, not a folder" in result.output and "Traceback" not in result.output


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(small_data, tmp_path):
    out = tmp_path / "out"
    steps = {"max_steps": 3, "save_steps": 2, "eval_steps": None}
    run(raw_config(small_data, out, **steps))
    model_bytes = (out / "model.safetensors").read_bytes()
    (out / "notes.txt").write_text("mine")  # not kimitune's: never deleted

    with pytest.raises(OutputDirError) as refused:
        run(raw_config(small_data, out, **steps))
    message = str(refused.value)
    assert f"output_dir {out} already holds a run (" in message and "checkpoint-2" in message
    assert "--resume-from-checkpoint" in message and "--overwrite-output-dir" in message
    assert (out / "model.safetensors").read_bytes() == model_bytes
    assert [step for step, _ in losses(out)] == [1, 2, 3]  # metrics.jsonl untouched

    with pytest.raises(OutputDirError, match="set only one of them"):
        run(raw_config(small_data, out, **steps, overwrite_output_dir=True, resume_from_checkpoint=True))

    run(raw_config(small_data, out, **steps, resume_from_checkpoint=True))  # resuming is allowed
    assert [step for step, _ in losses(out)] == [1, 2, 3]

    run(raw_config(small_data, out, max_steps=1, save_steps=None, eval_steps=None, overwrite_output_dir=True))
    assert [step for step, _ in losses(out)] == [1]  # metrics.jsonl started afresh
    assert not list(out.glob("checkpoint-*")) and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "final_state.json").read_text()) == {"step": 1}


def test_resume_true_starts_a_new_folder_afresh_but_does_not_overwrite_a_finished_run(small_data, tmp_path):
    out, once = tmp_path / "out", {"max_steps": 1, "save_steps": None, "eval_steps": None}
    assert run(raw_config(small_data, out, **once, resume_from_checkpoint=True)).steps == 1  # nothing to resume
    with pytest.raises(OutputDirError, match="already holds a run .* but no checkpoint to resume from"):
        run(raw_config(small_data, out, **once, resume_from_checkpoint=True))
