"""What ``kimitune plan`` reads besides the training config: the model's config.json and a GPU's memory size."""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError

from kimitune.config import ConfigError, TrainConfig
from kimitune.model.configuration import KimiLinearConfig
from kimitune.plan.parts import GIB


def load_model_config(train: TrainConfig) -> KimiLinearConfig:
    """The model config a run would build, read without any weights: init_from_config, or base_model's
    config.json (a local folder, or a hub id already in the Hugging Face cache); a Kimi-Linear-48B-A3B hub id
    that is not downloaded yet uses the release's config (the ``kimi-linear-48b-a3b`` preset)."""
    source = train.init_from_config or train.base_model
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return KimiLinearConfig.from_pretrained(path)
    try:
        cached = try_to_load_from_cache(source, "config.json")
    except HFValidationError:  # a path, not a repo id
        cached = None
    if isinstance(cached, str):
        return KimiLinearConfig.from_pretrained(cached)
    if "kimi-linear-48b-a3b" in source.lower():
        return KimiLinearConfig.preset("kimi-linear-48b-a3b")
    raise ConfigError(f"kimitune plan reads the model's config.json: {path} is not a file and {source!r} is not in "
                      "the Hugging Face cache (download its config.json, or set init_from_config)")


_UNITS = {"": GIB, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": GIB,
          "tib": 2**40}


def parse_memory(text: str) -> float:
    """'80GiB', '80 GB', '81559MiB', '80' (GiB) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 80GiB, 141GB or 81559MiB")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]
