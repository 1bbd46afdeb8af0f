"""Resuming never replaces a finished model with older weights, and a changed step count is announced.

The issue's case, scaled down: a run of 5 steps with checkpoints 2 and 4 (the issue: 15 steps, checkpoints 6, 9,
12), resumed with max_steps 3 (the issue: 11), once printed ``done`` and wrote checkpoint 4's weights over the
step-5 model."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console
from test_trainer import losses, raw_config, run, small_data  # noqa: F401  (small_data is a fixture)

from kimitune.config import parse_config
from kimitune.train.checkpointing import TrainerState, list_checkpoints
from kimitune.train.resume_checks import ResumeError, schedule_change_warning
from kimitune.train.trainer import Trainer

STEPS = {"max_steps": 5, "save_steps": 2, "eval_steps": None}


def test_resuming_below_the_checkpoint_or_the_finished_model_is_refused(small_data, tmp_path):
    run(raw_config(small_data, tmp_path, **STEPS))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    model = (tmp_path / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "final_state.json").read_text()) == {"step": 5}

    for max_steps in (3, 4):  # the latest checkpoint (4) is at or past the end
        with pytest.raises(ResumeError, match=rf"checkpoint-4 is at step 4 and max_steps is {max_steps}: nothing "
                                              "is left to train"):
            run(raw_config(small_data, tmp_path, **STEPS | {"max_steps": max_steps}, resume_from_checkpoint=True))
    earlier = tmp_path / "checkpoint-2"
    with pytest.raises(ResumeError, match="holds a finished model of step 5; resuming from checkpoint-2 .step 2. "
                                          "with max_steps 3 would replace it"):
        run(raw_config(small_data, tmp_path, **STEPS | {"max_steps": 3}, resume_from_checkpoint=str(earlier)))
    assert (tmp_path / "model.safetensors").read_bytes() == model  # the step-5 model is untouched
    assert [step for step, _ in losses(tmp_path)] == [1, 2, 3, 4, 5]


def test_a_changed_step_count_on_resume_warns_that_the_schedule_changes(small_data, tmp_path):
    run(raw_config(small_data, tmp_path, **STEPS))
    out = io.StringIO()
    config, _ = parse_config(raw_config(small_data, tmp_path, **STEPS | {"max_steps": 7},
                                        resume_from_checkpoint=True))
    summary = Trainer(config, Console(file=out, width=200)).train()
    printed = out.getvalue()
    assert summary.steps == 7
    assert ("warning: max_steps changed from 5 (when checkpoint-4 was written) to 7: the learning-rate schedule is "
            "rebuilt for 7 steps, so from step 5 on the learning rate differs") in printed
    assert json.loads((tmp_path / "final_state.json").read_text()) == {"step": 7}
    assert json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())["total_steps"] == 7


def test_the_same_step_count_or_an_older_checkpoint_gives_no_warning(tmp_path):
    assert schedule_change_warning(TrainerState(step=4, total_steps=5), 5, tmp_path / "checkpoint-4") is None
    assert schedule_change_warning(TrainerState(step=4), 7, tmp_path / "checkpoint-4") is None  # not recorded
