"""`kimitune train` with rl set: the DPO quickstart learns to rank held-out pairs, every loss trains, a LoRA run writes
a PEFT adapter that merges like a fine-tuned one, a resumed run continues exactly on its kept reference, KTO trains on
unpaired samples and `kimitune eval` scores them, and the keys that cannot work are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kimitune.config import ConfigError, parse_config
from kimitune.train.checkpointing import list_checkpoints
from kimitune.train.trainer import REFERENCE_FILE

from test_trainer import ROOT, run  # noqa: E402
from test_trainer import raw_config as trainer_config


@pytest.fixture(scope="module")
def pairs_data(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("pairs")
    train = (ROOT / "examples/data/dpo_train.jsonl").read_text().splitlines()
    evals = (ROOT / "examples/data/dpo_eval.jsonl").read_text().splitlines()
    (folder / "train.jsonl").write_text("\n".join(train[:48]) + "\n")
    (folder / "eval.jsonl").write_text("\n".join(evals[:8]) + "\n")
    return {"train": str(folder / "train.jsonl"), "eval": str(folder / "eval.jsonl"), "cache": str(folder / "cache")}


def raw_config(data: dict[str, str], output_dir: Path, **overrides) -> dict:
    """test_trainer's tiny run on pairs: DPO, the pairs' own dataset type."""
    pairs = {"datasets": [{"path": data["train"], "type": "chat_template.default"}],
             "test_datasets": [{"path": data["eval"], "type": "chat_template.default"}]}
    return trainer_config(data, output_dir, **({"rl": "dpo"} | pairs | overrides))


def records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_dpo_quickstart_ranks_held_out_pairs(tmp_path):
    """examples/dpo_quickstart.yaml as shipped (the tiny model from random weights, on a CPU): at least 90% of the
    held-out pairs ranked right at the end."""
    raw = yaml.safe_load((ROOT / "examples/dpo_quickstart.yaml").read_text())
    raw = {**raw, "init_from_config": str(ROOT / raw["init_from_config"]), "tokenizer": str(ROOT / raw["tokenizer"]),
           "output_dir": str(tmp_path / "out"), "dataset_prepared_path": str(tmp_path / "cache")}
    for entry in raw["datasets"] + raw["test_datasets"]:
        entry["path"] = str(ROOT / entry["path"])
    summary = run(raw)
    final = [r for r in records(tmp_path / "out") if "eval_rewards/accuracies" in r][-1]
    assert final["step"] == summary.steps and final["eval_rewards/accuracies"] >= 0.9, final
    assert (tmp_path / "out" / REFERENCE_FILE).exists() and (tmp_path / "out" / "loss_curve.png").exists()

    # `kimitune eval` on the same config scores the trained model's eval pairs as the run's last evaluation did.
    from typer.testing import CliRunner

    from kimitune.cli import app

    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "dpo.yaml"), "--device", "cpu",
                                      "--output", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    scored = json.loads((tmp_path / "eval.json").read_text())
    assert scored["pairs"] == 60 and scored["rewards/accuracies"] == pytest.approx(final["eval_rewards/accuracies"])
    assert scored["loss"] == pytest.approx(final["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("kind", ["ipo", "orpo", "simpo"])
def test_every_loss_trains_and_logs_its_rewards(pairs_data, tmp_path, kind):
    run(raw_config(pairs_data, tmp_path, rl=kind, save_steps=None))
    logged = [r for r in records(tmp_path) if "loss" in r]
    assert logged and all(torch.isfinite(torch.tensor(r["loss"])) for r in logged)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(logged[-1])
    assert (tmp_path / REFERENCE_FILE).exists() == (kind == "ipo")  # ORPO and SimPO need no reference


def test_a_resumed_run_continues_exactly_on_its_kept_reference(pairs_data, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    run(raw_config(pairs_data, whole))
    run(raw_config(pairs_data, split))
    assert list_checkpoints(split)[-1].name == "checkpoint-4"
    kept = torch.load(split / REFERENCE_FILE)
    run(raw_config(pairs_data, split, resume_from_checkpoint=True))
    assert torch.equal(torch.load(split / REFERENCE_FILE)["train"], kept["train"])  # read back, not recomputed
    got = [(r["step"], r["loss"]) for r in records(split) if "loss" in r]
    expected = [(r["step"], r["loss"]) for r in records(whole) if "loss" in r]
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-5)

    (split / REFERENCE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="reference"):
        run(raw_config(pairs_data, split, resume_from_checkpoint=True, max_steps=8))


def test_a_lora_dpo_adapter_is_peft_and_merges_onto_its_base(pairs_data, tmp_path):
    from kimitune import KimiLinearForCausalLM
    from kimitune.infer.merge import merge_lora_checkpoint
    from kimitune.model import KimiLinearConfig

    base = tmp_path / "base"
    torch.manual_seed(0)
    KimiLinearForCausalLM(KimiLinearConfig.from_pretrained(ROOT / "examples/models/tiny.json")).save_pretrained(base)
    lora = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True, "learning_rate": 1e-2,
            "init_from_config": None, "base_model": str(base), "save_steps": None}
    run(raw_config(pairs_data, tmp_path / "run", **lora))
    assert (tmp_path / "run" / "adapter_config.json").exists()
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()
    merge_lora_checkpoint(base, tmp_path / "run", tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").exists()


def test_what_cannot_work_is_refused_with_its_reason(pairs_data, tmp_path):
    with pytest.raises(ConfigError, match="grpo is not supported yet"):
        parse_config(raw_config(pairs_data, tmp_path, rl="grpo"))
    with pytest.raises(ConfigError, match="only apply with rl: kto"):
        parse_config(raw_config(pairs_data, tmp_path, kto_undesirable_weight=1.3))
    with pytest.raises(ConfigError, match="sample_packing"):
        parse_config(raw_config(pairs_data, tmp_path, sample_packing=False))
    with pytest.raises(ConfigError, match="preference format"):
        parse_config(raw_config(pairs_data, tmp_path, rl=None))
    with pytest.raises(ConfigError, match="only apply with rl"):
        parse_config(raw_config(pairs_data, tmp_path, rl=None, simpo_gamma=1.0,
                                datasets=[{"path": pairs_data["train"]}], test_datasets=[]))


def test_kimitune_eval_of_a_dpo_config_needs_its_runs_reference(pairs_data, tmp_path):
    from typer.testing import CliRunner

    from kimitune import KimiLinearForCausalLM
    from kimitune.cli import app
    from kimitune.model import KimiLinearConfig

    model = tmp_path / "model"
    KimiLinearForCausalLM(KimiLinearConfig.from_pretrained(ROOT / "examples/models/tiny.json")).save_pretrained(model)
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(raw_config(pairs_data, tmp_path / "never-trained")))
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "dpo.yaml"), "--model", str(model), "--tokenizer",
                                      str(ROOT / "examples/tokenizer"), "--device", "cpu"])
    assert result.exit_code != 0 and "reference_logps.pt is missing" in " ".join(result.output.split())


@pytest.fixture(scope="module")
def unpaired_data(pairs_data, tmp_path_factory) -> dict[str, str]:
    """The pairs as KTO's rows (chat_template.default: messages, completion, label): each pair's chosen reply
    desirable, its rejected one not."""
    folder = tmp_path_factory.mktemp("unpaired")
    out = {"cache": str(folder / "cache")}
    for split in ("train", "eval"):
        rows = []
        for line in Path(pairs_data[split]).read_text().splitlines():
            pair = json.loads(line)
            for key, label in (("chosen", True), ("rejected", False)):
                rows.append(json.dumps({"messages": pair["messages"], "completion": pair[key], "label": label}))
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
        out[split] = str(folder / f"{split}.jsonl")
    return out


def test_kto_trains_on_unpaired_samples_resumes_exactly_and_eval_scores_them(unpaired_data, tmp_path):
    """rl: kto on the pairs' replies as labelled samples (2 micro-batches a step, so the KL estimate spans them):
    the kept reference holds each sample's and its KL sequence's log-probability, the logged figures are KTO's
    (rewards per label, their margin, the KL estimate), the eval loss falls, a resumed run continues exactly, and
    `kimitune eval` gives the run's last eval figures."""
    from typer.testing import CliRunner

    from kimitune.cli import app

    raw = lambda out, **kw: raw_config(unpaired_data, out, **({"rl": "kto", "rl_beta": 0.5,  # noqa: E731
                                                               "kto_undesirable_weight": 1.2, "max_steps": 8,
                                                               "save_steps": 4, "eval_steps": 4} | kw))
    whole, split = tmp_path / "whole", tmp_path / "split"
    run(raw(whole))
    reference = torch.load(whole / REFERENCE_FILE)
    assert reference["train"].shape == (96, 2) and reference["eval"].shape == (16, 2)
    assert torch.isfinite(reference["train"]).all()
    logged = [r for r in records(whole) if "loss" in r]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "kl"} <= set(logged[-1])
    assert "rewards/accuracies" not in logged[-1]
    evals = [r for r in records(whole) if "eval_loss" in r]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] and evals[-1]["eval_kl"] >= 0

    run(raw(split))
    assert list_checkpoints(split)[-1].name == "checkpoint-4"
    run(raw(split, resume_from_checkpoint=True))  # steps 5 to 8 again, from checkpoint-4
    got = [(r["step"], r["loss"], r["kl"]) for r in records(split) if "loss" in r]
    expected = [(r["step"], r["loss"], r["kl"]) for r in logged]
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert [g[1] for g in got] == pytest.approx([e[1] for e in expected], rel=1e-5)
    # the KL estimate is a difference of close sums of log-probabilities: float32 noise across runs is absolute
    assert [g[2] for g in got] == pytest.approx([e[2] for e in expected], abs=1e-4)

    (tmp_path / "kto.yaml").write_text(yaml.safe_dump(raw(whole)))
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "kto.yaml"), "--device", "cpu", "--output",
                                      str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    scored = json.loads((tmp_path / "eval.json").read_text())
    assert scored["samples"] == 16 and scored["loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)
    assert scored["kl"] == pytest.approx(evals[-1]["eval_kl"], rel=1e-4, abs=1e-6)
