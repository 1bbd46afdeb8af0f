"""The training loop: it learns, resumes exactly (also after SIGKILL), and survives non-finite steps."""

from __future__ import annotations

import gc
import math
import json
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from kimitune.config import parse_config
from kimitune.train.checkpointing import list_checkpoints
from kimitune.train import trainer as trainer_module
from kimitune.train.trainer import Trainer, TrainingDiverged, frozen_startup_objects

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> dict[str, str]:
    """A slice of the quickstart data, so a run takes seconds."""
    folder = tmp_path_factory.mktemp("data")
    lines = (ROOT / "examples/data/quickstart_train.jsonl").read_text().splitlines()
    (folder / "train.jsonl").write_text("\n".join(lines[:48]) + "\n")
    (folder / "eval.jsonl").write_text("\n".join(lines[48:56]) + "\n")
    return {"train": str(folder / "train.jsonl"), "eval": str(folder / "eval.jsonl"), "cache": str(folder / "cache")}


def raw_config(data: dict[str, str], output_dir: Path, **overrides) -> dict:
    raw = {
        "init_from_config": str(ROOT / "examples/models/tiny.json"),
        "tokenizer": str(ROOT / "examples/tokenizer"),
        "datasets": [{"path": data["train"], "type": "chat_template"}],
        "test_datasets": [{"path": data["eval"], "type": "chat_template"}],
        "dataset_prepared_path": data["cache"],
        "sequence_len": 256,
        "sample_packing": True,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 6,
        "learning_rate": 3e-3,
        "warmup_steps": 2,
        "save_steps": 2,
        "eval_steps": 3,
        "output_dir": str(output_dir),
        "seed": 7,
    }
    raw.update(overrides)
    return raw


def run(raw: dict) -> object:
    config, _ = parse_config(raw)
    return Trainer(config, Console(quiet=True)).train()


def losses(output_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def assert_same_losses(resumed: Path, whole: Path) -> None:
    """The same steps with the same losses. Not to the last bit: on a loaded machine some of PyTorch's multi-threaded
    CPU kernels round differently (one thread gives equal bits; measured: 1e-7 relative by step 3). A resume that
    went wrong (other batches, other dropout masks, a lost optimizer state) moves the loss by far more."""
    got, expected = losses(resumed), losses(whole)
    assert [step for step, _ in got] == [step for step, _ in expected]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-5)


def test_full_finetune_learns_and_writes_everything(small_data, tmp_path):
    summary = run(raw_config(small_data, tmp_path, max_steps=8, save_total_limit=2))
    assert summary.steps == 8 and summary.skipped_steps == 0
    assert summary.final_eval_loss < summary.first_eval_loss
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "loss_curve.png").is_file()
    steps = [s for s, _ in losses(tmp_path)]
    assert steps == list(range(1, 9))


def test_recomputing_some_layers_trains_as_without(small_data, tmp_path):
    plain = tmp_path / "plain"
    run(raw_config(small_data, plain, max_steps=3, save_steps=None, eval_steps=None))
    some = tmp_path / "some"
    run(raw_config(small_data, some, max_steps=3, save_steps=None, eval_steps=None, gradient_checkpointing=True,
                   gradient_checkpointing_layers=1))
    assert [loss for _, loss in losses(some)] == pytest.approx([loss for _, loss in losses(plain)], rel=1e-5)
    with pytest.raises(ValueError, match="gradient_checkpointing_layers: 99 is not between 1 and the model's"):
        run(raw_config(small_data, tmp_path / "bad", gradient_checkpointing=True, gradient_checkpointing_layers=99))


def test_layers_in_pieces_train_and_evaluate_as_whole_layers(small_data, tmp_path):
    """sequence_piece_len: 50 cuts the packed rows (up to 512 tokens) into pieces, sequences across the cuts."""
    common = dict(max_steps=3, save_steps=None, eval_steps=3, gradient_checkpointing=True)
    run(raw_config(small_data, tmp_path / "whole", **common))
    run(raw_config(small_data, tmp_path / "pieces", sequence_piece_len=50, **common))
    assert [loss for _, loss in losses(tmp_path / "pieces")] == \
        pytest.approx([loss for _, loss in losses(tmp_path / "whole")], rel=1e-5)
    evals = [[r["eval_loss"] for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
              if "eval_loss" in r] for name in ("whole", "pieces")]
    assert len(evals[0]) == 2 and evals[1] == pytest.approx(evals[0], rel=1e-5)
    with pytest.raises(ValueError, match="sequence_piece_len only applies with gradient_checkpointing"):
        run(raw_config(small_data, tmp_path / "bad", sequence_piece_len=50))


def test_tiled_mlp_trains_as_whole_blocks(small_data, tmp_path):
    """tiled_mlp (Axolotl's key): every layer's MLP / MoE in shards of the row's tokens, recomputed one at a time in
    the backward: the same losses, with and without recomputed layers, a given shard count or Axolotl's default."""
    common = dict(max_steps=3, save_steps=None, eval_steps=None)
    run(raw_config(small_data, tmp_path / "whole", **common))
    run(raw_config(small_data, tmp_path / "tiled", tiled_mlp=True, tiled_mlp_num_shards=3, **common))
    run(raw_config(small_data, tmp_path / "both", tiled_mlp=True, gradient_checkpointing=True, **common))
    whole = [loss for _, loss in losses(tmp_path / "whole")]
    assert len(whole) == 3
    for name in ("tiled", "both"):
        assert [loss for _, loss in losses(tmp_path / name)] == pytest.approx(whole, rel=1e-5)


def test_kda_keep_intermediates_reaches_the_model(small_data, tmp_path, monkeypatch):
    from kimitune.model import KimiLinearForCausalLM

    flags = []
    real = KimiLinearForCausalLM.forward
    monkeypatch.setattr(KimiLinearForCausalLM, "forward", lambda model, *args, options=None, **kwargs: (
        flags.append(options and options.kda_keep_intermediates), real(model, *args, options=options, **kwargs))[1])
    run(raw_config(small_data, tmp_path, max_steps=1, save_steps=None, eval_steps=None, kda_keep_intermediates=True))
    assert flags == [False, True, True, False]  # evaluation, the 2 micro-batches of the step, evaluation


def test_resume_continues_exactly(small_data, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    run(raw_config(small_data, whole))
    run(raw_config(small_data, split))
    # The last step is never checkpointed (the final save covers it): resuming restarts from checkpoint-4.
    assert list_checkpoints(split)[-1].name == "checkpoint-4"
    run(raw_config(small_data, split, resume_from_checkpoint=True))
    assert_same_losses(split, whole)


def test_lora_with_dropout_resumes_exactly_after_sigkill(small_data, tmp_path):
    lora = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "lora_target_linear": True,
            "max_steps": 8, "learning_rate": 1e-2}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run(raw_config(small_data, whole, **lora))

    config_path = tmp_path / "killed.yaml"
    config_path.write_text(yaml.safe_dump(raw_config(small_data, killed, **lora)))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "kimitune", "train", str(config_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint-2").is_dir():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert list_checkpoints(killed), "the checkpoint written before the kill must survive"

    run(raw_config(small_data, killed, resume_from_checkpoint=True, **lora))
    assert_same_losses(killed, whole)
    assert (killed / "adapter_model.safetensors").is_file() and (killed / "adapter_config.json").is_file()


def test_non_finite_steps_are_skipped_then_the_run_stops(small_data, tmp_path, monkeypatch):
    from kimitune.model import KimiLinearForCausalLM

    real_forward = KimiLinearForCausalLM.forward
    calls = {"n": 0}
    # 2 micro-batches per step: calls 5-6 poison step 3; calls 11 onwards poison every step from step 6.
    poisoned = {5, 6} | set(range(11, 100))

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] in poisoned:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(KimiLinearForCausalLM, "forward", forward)
    with pytest.raises(TrainingDiverged, match="3 steps in a row had a non-finite loss"):
        run(raw_config(small_data, tmp_path, max_steps=20, max_bad_steps=3, save_steps=1, eval_steps=None))
    # Steps 6, 7 and 8 were bad; the checkpoints before them are complete and loadable.
    assert list_checkpoints(tmp_path)[-1].name == "checkpoint-7"
    logged = dict(losses(tmp_path))
    assert logged[3] != logged[3]  # NaN: the bad step is logged, not hidden
    assert all(v == v for s, v in logged.items() if s not in (3, 6, 7, 8))


def test_skipped_step_does_not_change_the_weights(small_data, tmp_path, monkeypatch):
    from kimitune.model import KimiLinearForCausalLM

    real_forward = KimiLinearForCausalLM.forward
    snapshots = []

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training:
            snapshots.append(self.lm_head.weight.detach().clone())
            out.loss = out.loss * float("inf")
        return out

    monkeypatch.setattr(KimiLinearForCausalLM, "forward", forward)
    with pytest.raises(TrainingDiverged):
        run(raw_config(small_data, tmp_path, max_steps=5, max_bad_steps=2, eval_steps=None, save_steps=None))
    assert all(torch.equal(snapshots[0], s) for s in snapshots)


def test_the_steps_run_with_the_built_objects_frozen_out_of_the_collector(small_data, tmp_path, monkeypatch):
    frozen_during_steps = []
    original_take = trainer_module.BatchStream.take
    monkeypatch.setattr(trainer_module.BatchStream, "take",
                        lambda self, n: frozen_during_steps.append(gc.get_freeze_count()) or original_take(self, n))
    assert gc.get_freeze_count() == 0
    run(raw_config(small_data, tmp_path, max_steps=2, save_steps=None, eval_steps=None))
    assert len(frozen_during_steps) == 2 and min(frozen_during_steps) > 1000  # the model's objects among them
    assert gc.get_freeze_count() == 0  # released when the run ends


def test_a_run_leaves_nothing_frozen_even_after_an_earlier_freeze():
    # Objects frozen before entry are released too: leaving the run's own objects frozen kept a finished run's model
    # (held in reference cycles) alive when something had frozen a few objects first.
    gc.freeze()
    assert gc.get_freeze_count() > 0
    model = torch.nn.Linear(2, 2)
    model.cycle = model  # collectable only by the collector
    with frozen_startup_objects():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_pad_to_sequence_len_gives_every_batch_one_shape_and_the_same_losses(small_data, tmp_path, monkeypatch):
    from kimitune.model import KimiLinearForCausalLM

    shapes = []
    real_forward = KimiLinearForCausalLM.forward
    monkeypatch.setattr(KimiLinearForCausalLM, "forward",
                        lambda self, input_ids, *a, **kw: (shapes.append(tuple(input_ids.shape)),
                                                           real_forward(self, input_ids, *a, **kw))[1])
    short = dict(max_steps=2, save_steps=None, eval_steps=None)
    run(raw_config(small_data, tmp_path / "padded", pad_to_sequence_len=True, **short))
    assert set(shapes) == {(1, 2 * 256)}  # micro_batch_size * sequence_len, packed
    run(raw_config(small_data, tmp_path / "plain", **short))
    # The padding is a sequence of its own with no loss: the steps optimise the same thing.
    assert [loss for _, loss in losses(tmp_path / "padded")] == pytest.approx(
        [loss for _, loss in losses(tmp_path / "plain")], rel=1e-4)


def test_only_full_fine_tuning_runs_under_autocast(small_data, tmp_path, monkeypatch):
    """On a bf16 GPU (faked here) an adapter run has bf16 frozen weights and no autocast (the model casts its float32
    adapters where they multiply); full fine-tuning keeps float32 weights and computes under bf16 autocast."""
    from kimitune.train import setup as setup_module

    monkeypatch.setattr(setup_module, "uses_bf16", lambda config, device: True)
    built = {}
    for adapter in ("lora", None):
        lora = {"lora_r": 4, "lora_alpha": 8, "lora_target_linear": True} if adapter else {}
        config, _ = parse_config(raw_config(small_data, tmp_path / str(adapter), adapter=adapter, **lora))
        setup = setup_module.build_training_setup(config, Console(quiet=True))
        built[adapter] = (setup.bf16, setup.autocast_bf16, {p.dtype for p in setup.model.parameters()
                                                           if not p.requires_grad})
    assert built["lora"] == (True, False, {torch.bfloat16})
    assert built[None] == (True, True, set())


@pytest.mark.parametrize("adapter", ["lora", "ce_lora"])
def test_adapter_runs_train_in_bf16_without_autocast(small_data, tmp_path, monkeypatch, adapter):
    """An adapter run on a bf16 device (faked here, in bf16 on the CPU): bf16 frozen weights, float32 adapters and
    no autocast anywhere: its steps run and their losses are finite."""
    from kimitune.train import setup as setup_module

    monkeypatch.setattr(setup_module, "uses_bf16", lambda config, device: True)
    lora = {"adapter": adapter, "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True, "max_steps": 2,
            "save_steps": None, "eval_steps": None}
    run(raw_config(small_data, tmp_path, **lora))
    logged = [loss for _, loss in losses(tmp_path)]
    assert logged and all(math.isfinite(loss) for loss in logged)
