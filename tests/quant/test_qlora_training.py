"""QLoRA through the trainer: a YAML like examples/quickstart.yaml with load_in_4bit + adapter: qlora.

The base is the tiny model (random weights) saved in float32; the run loads it straight into NF4, trains LoRA
(all-linear + experts) for a few steps, and saves a PEFT-format adapter that loads onto the float model and onto a
quantised one, and that ``kimitune merge-lora`` merges onto the float base checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from kimitune import KimiLinearConfig, KimiLinearForCausalLM
from kimitune.adapters import load_adapter, lora_modules
from kimitune.config import ConfigError, load_config, parse_config
from kimitune.quant import QuantizedWeight, load_quantized
from kimitune.train.settings import quant_spec
from kimitune.train.trainer import Trainer
from quant_helpers import quickstart_like

pytest.importorskip("bitsandbytes")
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def train(folder: Path, raw: dict):
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    config, _ = load_config(path)  # what `kimitune train config.yaml` does
    return Trainer(config, Console(quiet=True)).train()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qlora") / "base"
    torch.manual_seed(0)
    KimiLinearForCausalLM(KimiLinearConfig.from_pretrained(ROOT / "examples/models/tiny.json")).save_pretrained(folder)
    return folder


def test_qlora_run_learns_and_saves_a_peft_adapter(base, tmp_path):
    summary = train(tmp_path, quickstart_like(tmp_path, base_model=str(base), load_in_4bit=True, adapter="qlora",
                                              bnb_4bit_use_double_quant=True, max_steps=6, eval_steps=6))
    assert summary.final_eval_loss < summary.first_eval_loss - 0.5, (summary.first_eval_loss, summary.final_eval_loss)
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()  # the quantised base is never written

    # The adapter loads onto the float base and onto a freshly quantised one; both give the trained behaviour.
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    on_float = KimiLinearForCausalLM.from_pretrained(base)
    load_adapter(on_float, out)
    on_4bit = load_quantized(base, "4bit")
    load_adapter(on_4bit, out)
    assert isinstance(on_4bit.model.layers[0].self_attn.q_proj.weight, QuantizedWeight)
    assert any(module.lora_B.abs().max() > 0 for module in lora_modules(on_float).values())
    with torch.no_grad():
        float_logits, quant_logits = on_float(ids).logits, on_4bit(ids).logits
    assert (float_logits.argmax(-1) == quant_logits.argmax(-1)).float().mean() > 0.5

    # merge-lora merges onto the unquantised base checkpoint, as for a LoRA adapter.
    from kimitune.infer import merge_lora_checkpoint

    merge_lora_checkpoint(base, out, tmp_path / "merged")
    merged = KimiLinearForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, float_logits, rtol=1e-4, atol=1e-4)


def test_8bit_lora_from_a_config_runs(tmp_path):
    """load_in_8bit + adapter: lora on a randomly initialised model (init_from_config: quantised layer by layer)."""
    summary = train(tmp_path, quickstart_like(tmp_path, init_from_config=str(ROOT / "examples/models/tiny.json"),
                                              load_in_8bit=True, adapter="lora", max_steps=2,
                                              gradient_checkpointing=True))
    assert summary.saved is not None and (tmp_path / "out/adapter_model.safetensors").is_file()


@pytest.mark.parametrize("overrides,message", [
    ({"load_in_4bit": True}, "full fine-tuning"),
    ({"load_in_8bit": True}, "full fine-tuning"),
    ({"load_in_8bit": True, "adapter": "qlora"}, "4-bit base"),
    ({"adapter": "qlora"}, "4-bit base"),
    ({"adapter": "lora", "bnb_4bit_quant_type": "fp4"}, "only apply with load_in_4bit"),
    ({"load_in_4bit": True, "adapter": "qlora", "bnb_4bit_quant_type": "int3"}, "bnb_4bit_quant_type"),
])
def test_config_errors(tmp_path, overrides, message):
    raw = quickstart_like(tmp_path, init_from_config=str(ROOT / "examples/models/tiny.json"), **overrides)
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_quantised_keys_parse(tmp_path):
    raw = quickstart_like(tmp_path, init_from_config="x.json", load_in_4bit=True, adapter="qlora",
                          bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True)
    config, _ = parse_config(raw)
    from kimitune.quant import QuantSpec

    assert quant_spec(config) == QuantSpec(4, "fp4", True)
