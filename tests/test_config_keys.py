"""`kimitune config keys` lists every key of the schema with its type, default and meaning; `kimitune config show`
prints the config a YAML file resolves to, overrides applied."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from kimitune.cli import app
from kimitune.config import INERT_KEYS, DatasetConfig, FsdpConfig, TrainConfig, load_config, parse_config
from kimitune.config_keys import config_keys, render_keys, type_name

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples/quickstart.yaml"


def test_every_key_has_a_meaning_in_the_schema():
    missing = [f"{model.__name__}.{name}" for model in (TrainConfig, DatasetConfig, FsdpConfig)
               for name, field in model.model_fields.items() if not field.description]
    assert missing == []


def test_the_listing_covers_the_schema_with_types_and_defaults():
    keys = {key.name: key for key in config_keys()}
    expected = (set(TrainConfig.model_fields) | {f"datasets[].{name}" for name in DatasetConfig.model_fields}
                | {f"fsdp_config.{name}" for name in FsdpConfig.model_fields})
    assert set(keys) == expected
    assert (keys["learning_rate"].type, keys["learning_rate"].default) == ("float (> 0)", "0.0002")
    assert (keys["lr_scheduler"].type, keys["lr_scheduler"].default) == ("cosine | linear | constant", "cosine")
    assert (keys["max_steps"].type, keys["max_steps"].default) == ("int | null (> 0)", "null")
    assert (keys["roles_to_train"].type, keys["roles_to_train"].default) == ("list of str", "[assistant]")
    assert keys["datasets[].path"].default == "required"
    assert keys["overwrite_output_dir"].description == TrainConfig.model_fields["overwrite_output_dir"].description
    assert type_name(dict[str, list[str]] | None) == "mapping str -> list of str | null"


def test_the_listing_fits_80_columns_and_names_the_inert_keys():
    text = render_keys(config_keys())
    assert max(len(line) for line in text.splitlines()) <= 80
    assert all(f"  {name}: " in text for name in INERT_KEYS)


def test_config_keys_command_lists_all_or_those_matching():
    everything = CliRunner().invoke(app, ["config", "keys"])
    assert everything.exit_code == 0, everything.output
    assert all(f"{key.name}: " in everything.output for key in config_keys())
    lora = CliRunner().invoke(app, ["config", "keys", "lora-r"])
    assert lora.exit_code == 0 and lora.output.startswith("lora_r: int = 8\n    LoRA rank.\n")
    unknown = CliRunner().invoke(app, ["config", "keys", "no-such-key"])
    assert unknown.exit_code == 2 and "no config key contains 'no-such-key'" in unknown.output


def test_config_show_prints_the_resolved_config_and_echoes_the_overrides():
    result = CliRunner().invoke(app, ["config", "show", str(QUICKSTART), "--learning-rate", "1e-4",
                                      "--max-steps", "20"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    expected, _ = load_config(QUICKSTART, {"learning_rate": 1e-4, "max_steps": 20})
    assert shown["max_steps"] == 20 and shown["learning_rate"] == 1e-4 and shown["lr_scheduler"] == "cosine"
    assert set(shown) == set(TrainConfig.model_fields) - {k for k in TrainConfig.model_fields
                                                          if k.startswith(("bnb_4bit_", "ce_lora_"))}
    assert parse_config(shown)[0] == expected  # what it prints is a config that loads back to the same run
    assert "overrides from the command line: learning_rate: 1e-4, max_steps: 20" in result.stderr
    bad = CliRunner().invoke(app, ["config", "show", str(QUICKSTART), "--learning-rat", "1"])
    assert bad.exit_code == 2 and "unknown key `learning_rat`; did you mean `learning_rate`?" in bad.output
