"""The model a run starts from, checked before any data is tokenised: a broken folder fails in seconds.

Reads only what is cheap: the config (``config.json`` or ``init_from_config``) and the safetensors headers (names,
dtypes, shapes, byte ranges; no tensor data). The names and shapes must be exactly those the config's model has
(built on the meta device, so no memory is used), which is what loading checks later, tensor by tensor, after the
data is ready. Any problem raises an error whose message starts with the key (``base_model:``) and names the file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kimitune.config import ConfigError, TrainConfig
from kimitune.model.checkpoint import CheckpointError, checkpoint_layout, open_checkpoint_files, resolve_file_names
from kimitune.model.configuration import KimiLinearConfig


class ModelSourceError(ConfigError):
    """The model a run starts from cannot be loaded; the message names the key, the file and the problem."""


def check_model_folder(folder: Path) -> KimiLinearConfig:
    """Checks a release-layout folder's config and tensor headers against each other; returns its config.

    Raises FileNotFoundError (no folder, no config.json) or a ValueError (``ModelConfigError``, ``CheckpointError``,
    ``SafetensorsError``) naming the file and what is wrong.
    """
    from kimitune.model import KimiLinearForCausalLM

    if not folder.is_dir():
        raise FileNotFoundError(f"no model folder at {folder} (kimitune reads local folders in the release layout: "
                                "config.json and safetensors)")
    config = KimiLinearConfig.from_pretrained(folder)
    files = open_checkpoint_files(folder)
    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    layouts = checkpoint_layout(model)
    chosen = resolve_file_names(layouts, files, folder)
    shapes = model.state_dict(keep_vars=True)
    wrong = []
    for layout in layouts:
        for part in layout.parts:
            name = chosen[part.names[0]]
            expected = tuple(shapes[layout.name][part.index].shape)
            found = files[name].tensors[name].shape
            if found != expected:
                wrong.append(f"{name} in {files[name].path.name} is {list(found)}, expected {list(expected)}")
    if wrong:
        shown = "; ".join(wrong[:8]) + (f"; ... and {len(wrong) - 8} more" if len(wrong) > 8 else "")
        raise CheckpointError(f"{folder}: {len(wrong)} tensor(s) with the wrong shape for its config.json: {shown}")
    return config


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
