"""Checkpoints are atomic, rotated, and restore optimizer, RNG and position exactly."""

import random
import shutil

import pytest
import torch

from kimitune.train.checkpointing import (
    TrainerState,
    list_checkpoints,
    load_training_state,
    remove_stale_temporaries,
    resolve_resume,
    save_checkpoint,
)


def make_optimizer():
    model = torch.nn.Linear(4, 1, bias=False)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.weight.grad = torch.ones(1, 4)
    opt.step()
    return model, opt


def write_weights(directory):
    (directory / "weights.txt").write_text("w")


def test_save_rotate_and_resume(tmp_path):
    model, opt = make_optimizer()
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, TrainerState(step=step, epoch=1, batch_index=step), write_weights, model, opt,
                        save_total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert resolve_resume(tmp_path, True).name == "checkpoint-6"
    assert resolve_resume(tmp_path, None) is None

    expected_draw = (random.random(), torch.rand(3))  # the RNG saved with checkpoint-6 was before these draws
    model2 = torch.nn.Linear(4, 1, bias=False)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    state = load_training_state(tmp_path / "checkpoint-6", model2, opt2)
    assert (state.step, state.epoch, state.batch_index) == (6, 1, 6)
    assert opt2.param_groups[0]["lr"] == 0.1
    saved, loaded = opt.state[model.weight], opt2.state[model2.weight]
    assert torch.equal(saved["exp_avg"], loaded["exp_avg"]) and torch.equal(saved["step"], loaded["step"])
    assert random.random() == expected_draw[0]
    assert torch.equal(torch.rand(3), expected_draw[1])


def test_failed_save_leaves_previous_checkpoints_and_no_temporary(tmp_path):
    model, opt = make_optimizer()
    save_checkpoint(tmp_path, TrainerState(step=1), write_weights, model, opt)

    def broken(directory):
        (directory / "partial").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, TrainerState(step=2), broken, model, opt)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


def test_stale_temporaries_are_ignored_and_removed(tmp_path):
    (tmp_path / ".checkpoint-9.tmp-abc").mkdir()
    (tmp_path / "checkpoint-8").mkdir()  # no trainer_state.json: incomplete, never listed
    assert list_checkpoints(tmp_path) == []
    assert remove_stale_temporaries(tmp_path) == 1
    assert not (tmp_path / ".checkpoint-9.tmp-abc").exists()


def test_resume_from_a_path_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete kimitune checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "missing"))


def test_checkpoint_of_an_older_version_is_refused_with_what_to_do(tmp_path):
    model, opt = make_optimizer()
    path = save_checkpoint(tmp_path, TrainerState(step=2), write_weights, model, opt)
    shutil.rmtree(path / "optimizer")
    torch.save(opt.state_dict(), path / "optimizer.pt")  # the single-file format of earlier versions
    with pytest.raises(FileNotFoundError, match="older kimitune .*lora_model_dir for an adapter"):
        load_training_state(path, model, opt)
    (path / "optimizer.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no optimizer state \(optimizer/\)$"):
        load_training_state(path, model, opt)
