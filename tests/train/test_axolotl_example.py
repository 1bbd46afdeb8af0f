"""Axolotl's Kimi Linear LoRA example (examples/kimi-48b-lora.yaml) trains end to end: every key of it as written,
with only the model, tokenizer and data pointed at local stand-ins (this machine downloads nothing): a saved tiny
model instead of the 48B hub id, the shipped tokenizer, and the quickstart conversations (OpenAI messages, the
dataset's format) instead of the hub dataset. It loads the base in 8-bit, trains LoRA with packing, evaluates on
the val_set_size split and saves the adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from kimitune import KimiLinearConfig, KimiLinearForCausalLM
from kimitune.config import parse_config
from kimitune.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_axolotl_kimi_example_trains_with_local_stand_ins(tmp_path):
    pytest.importorskip("bitsandbytes")
    raw = yaml.safe_load((ROOT / "examples/kimi-48b-lora.yaml").read_text())
    model_dir = tmp_path / "tiny-base"
    KimiLinearForCausalLM(KimiLinearConfig.from_pretrained(ROOT / "examples/models/tiny.json")).save_pretrained(model_dir)
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join((ROOT / "examples/data/quickstart_train.jsonl").read_text().splitlines()[:60]) + "\n")
    raw |= {
        "base_model": str(model_dir),
        "tokenizer": str(ROOT / "examples/tokenizer"),
        "trust_remote_code": False,
        "datasets": [{**raw["datasets"][0], "path": str(data)}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 256,
        "max_steps": 3,
    }
    config, warnings = parse_config(raw, "kimi-48b-lora.yaml")
    assert config.load_in_8bit and config.adapter == "lora" and config.sample_packing
    assert {w.split("`")[1] for w in warnings} == {"flash_attention", "loss_watchdog_threshold",
                                                 "loss_watchdog_patience"}

    summary = Trainer(config, Console(quiet=True)).train()

    assert summary.steps == 3 and summary.skipped_steps == 0
    assert summary.first_eval_loss is not None and summary.final_eval_loss < summary.first_eval_loss
    out = tmp_path / "out"
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["lora_alpha"] == 32
    adapted = {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}  # full module names, as PEFT takes
    assert adapted == {"gate_proj", "down_proj", "up_proj", "q_proj", "v_proj", "k_proj", "o_proj"}
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
