"""CE-LoRA through the trainer (``adapter: ce_lora``): it learns the quickstart task about as well as LoRA does.

LoRA on random weights learns little, so the fixture first fully fine-tunes a small model on the user turns of a
slice of the quickstart data (the vocabulary and the format) and saves it; LoRA and CE-LoRA then learn the
assistant replies from it with the same data, seed and steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console

from kimitune import KimiLinearConfig
from kimitune.config import parse_config
from kimitune.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def small_model_config(folder: Path) -> Path:
    """KDA + dense MLP, then MLA + MoE (4 experts, top-2, a shared expert); the tiny tokenizer's 1024 ids."""
    config = KimiLinearConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, kda_layers=[1],
        full_attn_layers=[2], kda_num_heads=2, kda_head_dim=32, num_attention_heads=2, num_key_value_heads=2,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_experts=4,
        num_experts_per_token=2, moe_intermediate_size=32, num_shared_experts=1, bos_token_id=1016,
        eos_token_id=1018, pad_token_id=1023, dtype="float32",
    )
    return config.save_pretrained(folder)


def raw_config(folder: Path, output: str, **overrides) -> dict:
    raw = {
        "tokenizer": str(ROOT / "examples/tokenizer"),
        "datasets": [{"path": str(folder / "train.jsonl"), "type": "chat_template"}],
        "test_datasets": [{"path": str(folder / "eval.jsonl"), "type": "chat_template"}],
        "dataset_prepared_path": str(folder / "cache"),
        "sequence_len": 256,
        "sample_packing": True,
        "micro_batch_size": 4,
        "learning_rate": 3e-3,
        "warmup_steps": 1,
        "output_dir": str(folder / output),
        "seed": 11,
    }
    return raw | overrides


def run(raw: dict):
    config, _ = parse_config(raw)
    return Trainer(config, Console(quiet=True)).train()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A briefly fully fine-tuned small model (release layout), with the data folder it was trained from."""
    folder = tmp_path_factory.mktemp("ce_lora_training")
    lines = (ROOT / "examples/data/quickstart_train.jsonl").read_text().splitlines()
    (folder / "train.jsonl").write_text("\n".join(lines[:96]) + "\n")
    (folder / "eval.jsonl").write_text("\n".join(lines[96:112]) + "\n")
    small_model_config(folder / "init")
    run(raw_config(folder, "base", init_from_config=str(folder / "init/config.json"), max_steps=16,
                   learning_rate=1e-2, warmup_steps=2, roles_to_train=["user"],
                   dataset_prepared_path=str(folder / "user_cache")))
    return folder


def test_ce_lora_learns_like_lora(pretrained):
    adapter = {"base_model": str(pretrained / "base"), "lora_r": 8, "lora_alpha": 16, "lora_target_linear": True,
               "lora_target_experts": True, "max_steps": 6, "learning_rate": 1e-2}
    lora = run(raw_config(pretrained, "lora", adapter="lora", **adapter))
    ce = run(raw_config(pretrained, "ce", adapter="ce_lora", ce_lora_sparsity=0.5, **adapter))
    assert ce.skipped_steps == 0
    assert ce.first_eval_loss == pytest.approx(lora.first_eval_loss, rel=1e-6)  # the same start
    assert ce.final_eval_loss < 0.7 * ce.first_eval_loss  # it learns the replies
    # The paper's claim: CE-LoRA converges as LoRA does; after the same steps the eval loss is within 2%.
    assert ce.first_eval_loss - ce.final_eval_loss > 0.9 * (lora.first_eval_loss - lora.final_eval_loss)
    assert ce.final_eval_loss == pytest.approx(lora.final_eval_loss, rel=0.02)
    assert (pretrained / "ce/adapter_model.safetensors").is_file()
