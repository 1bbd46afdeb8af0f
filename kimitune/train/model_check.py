"""The model a run starts from, checked before any data is tokenised: a broken folder fails in seconds.

Reads only what is cheap: the config (``config.json`` or ``init_from_config``) and the safetensors headers (names,
dtypes, shapes, byte ranges; no tensor data). The names and shapes must be exactly those the config's model has
(built on the meta device, so no memory is used), which is what loading checks later, tensor by tensor, after the
data is ready. Any problem raises an error whose message starts with the key (``base_model:``) and names the file.
"""

from __future__ import annotations

from pathlib import Path

from kimitune.config import ConfigError, TrainConfig
from kimitune.model.checkpoint import open_checked
from kimitune.model.configuration import KimiLinearConfig


class ModelSourceError(ConfigError):
    """The model a run starts from cannot be loaded; the message names the key, the file and the problem."""


def check_model_folder(folder: Path) -> KimiLinearConfig:
    """Checks a release-layout folder's config and tensor headers against each other; returns its config.

    Raises FileNotFoundError (no folder, no config.json) or a ValueError (``ModelConfigError``, ``CheckpointError``,
    ``SafetensorsError``) naming the file and what is wrong.
    """
    return open_checked(folder).config


def check_model_source(config: TrainConfig, resume_from: Path | None = None) -> None:
    """Checks where the run's weights come from: ``base_model`` (or, resuming a full fine-tune, the checkpoint,
    whose weights replace the base's), else ``init_from_config``'s config file. Errors name the key."""
    if config.base_model is None:
        key, check = "init_from_config", lambda: KimiLinearConfig.from_pretrained(config.init_from_config)
    elif config.adapter is None and resume_from is not None:
        key, check = "resume_from_checkpoint", lambda: check_model_folder(resume_from)
    else:
        key, check = "base_model", lambda: check_model_folder(Path(config.base_model))
    try:
        check()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{key}: {err}") from None
    except ValueError as err:
        raise ModelSourceError(f"{key}: {err}") from None
