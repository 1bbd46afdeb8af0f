"""Every config key with its type, default and meaning, read from the schema (``kimitune config keys``).

The text comes from the pydantic fields of ``kimitune.config`` (their annotations, defaults and descriptions), so
the listing cannot drift from what ``load_config`` accepts. Entries of ``datasets:`` / ``test_datasets:`` are
listed as ``datasets[].KEY``, and ``fsdp_config:`` as ``fsdp_config.KEY``; Axolotl's keys that are accepted but
change nothing follow, each with the reason. ``resolved_config`` is what ``kimitune config show`` prints.
"""

from __future__ import annotations

import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from kimitune.config import FSDP_INERT_KEYS, INERT_KEYS, DatasetConfig, FsdpConfig, TrainConfig

WIDTH = 80


@dataclass(frozen=True)
class KeyInfo:
    """One key: its name as written in the YAML, its type, its default and what it does."""

    name: str
    type: str
    default: str
    description: str


def type_name(annotation: Any) -> str:
    """A YAML reader's name for a type: ``int | null``, ``cosine | linear | constant``, ``list of str``."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(str(yaml_scalar(value)) for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        return f"list of {type_name(item)}"
    if origin is dict:
        key, value = typing.get_args(annotation)
        return f"mapping {type_name(key)} -> {type_name(value)}"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def yaml_scalar(value: Any) -> str:
    """``value`` as YAML writes it in flow style: true, null, 0.0002, [assistant], {role: role}."""
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    return yaml_scalar(value.model_dump() if isinstance(value, BaseModel) else value)


def _constraints(field) -> str:
    """Bounds such as ``> 0`` from the field's metadata (Field(gt=0, le=1) ...)."""
    signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    parts = [f"{signs[name]} {getattr(item, name)}" for item in field.metadata for name in signs
             if getattr(item, name, None) is not None]
    return f" ({', '.join(parts)})" if parts else ""


def model_keys(model: type[BaseModel], prefix: str = "") -> list[KeyInfo]:
    """The keys of one schema class, in declaration order, nested classes after the key that holds them."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(KeyInfo(prefix + name, type_name(field.annotation) + _constraints(field), _default(field),
                            field.description or ""))
        if model is TrainConfig and name == "datasets":  # test_datasets entries take the same keys
            keys += model_keys(DatasetConfig, "datasets[].")
        if model is TrainConfig and name == "fsdp_config":
            keys += model_keys(FsdpConfig, "fsdp_config.")
    return keys


def config_keys() -> list[KeyInfo]:
    """Every key of the training YAML (``datasets[].`` keys also apply to ``test_datasets``)."""
    return model_keys(TrainConfig)


def render_keys(keys: list[KeyInfo], inert: bool = True, width: int = WIDTH) -> str:
    """The listing ``kimitune config keys`` prints: per key a line ``name: type = default`` and its meaning
    indented below, wrapped to ``width`` columns; with ``inert`` the accepted Axolotl keys that do nothing."""
    lines = []
    for key in keys:
        lines.append(textwrap.fill(f"{key.name}: {key.type} = {key.default}", width, subsequent_indent="      "))
        if key.description:
            lines.append(textwrap.fill(key.description, width, initial_indent="    ", subsequent_indent="    "))
    if inert:
        lines.append("")
        lines.append("Accepted from Axolotl configs, no effect here (a warning when set):")
        for name, reason in list(INERT_KEYS.items()) + [(f"fsdp_config.{k}", v) for k, v in FSDP_INERT_KEYS.items()]:
            lines.append(textwrap.fill(f"{name}: {reason}", width, initial_indent="  ", subsequent_indent="      "))
    return "\n".join(lines)


def resolved_config(config: TrainConfig) -> dict[str, Any]:
    """Every key of ``config`` with its value, defaults included, as YAML values; loading the result gives the same
    config. Left out are the keys of a feature that is off (``bnb_4bit_*`` without load_in_4bit, ``ce_lora_*``
    without adapter: ce_lora): they change nothing then, and a config that sets them is refused."""
    off = [prefix for prefix, on in (("bnb_4bit_", config.load_in_4bit), ("ce_lora_", config.adapter == "ce_lora"))
           if not on]
    return {key: value for key, value in config.model_dump(mode="json").items()
            if not any(key.startswith(prefix) for prefix in off)}
