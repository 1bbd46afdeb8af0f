"""LoRA for Kimi Linear, written in the project (PEFT is never imported): settings, apply, merge, save, load.

    settings = lora_settings(train_config)                  # kimitune.train.settings; or LoraSettings(r=16, alpha=32, target_modules=...)
    names = apply_lora(model, settings)                      # adapters on, everything else frozen
    ...train...
    save_adapter(model, out_dir, settings, base_model=...)  # PEFT format: loads onto transformers' model
    load_adapter(model, out_dir)                             # refuses an adapter that does not fit
    merge_lora(model)                                        # folds the adapters into the base weights

The layers are in ``layers.py``, target matching in ``targets.py``, the file format in ``peft_format.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kimitune.adapters.casts import AdapterCasts
from kimitune.adapters.layers import (
    ExpertsLora,
    LoraLinear,
    fold_into,
    lora_scaling,
)
from kimitune.adapters.peft_format import (
    ADAPTER_WEIGHTS_FILE,
    AdapterMismatchError,
    LoraTensors,
    adapter_config,
    read_config,
    read_tensors,
    write_adapter,
)
from kimitune.adapters.targets import EXPERT_PROJECTIONS, LoraTargets, find_targets, is_stacked_experts



@dataclass
class LoraSettings:
    """Rank, scale, dropout and targets of a LoRA adapter.

    ``target_modules``: a tuple of names (PEFT's suffix rule), a regex string, ``"all-linear"`` or None;
    ``target_linear`` adds all-linear, ``target_experts`` adds both projections of every experts module
    (the exact rules: ``targets.py``).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    target_linear: bool = False
    target_experts: bool = False
    use_rslora: bool = False
    join_shared_input: bool = True  # False: adapted linears of one input run one by one (the joint node's reference)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            self.target_modules = tuple(self.target_modules)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"lora_r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        """The factor on ``B A``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    def targets(self, model: nn.Module) -> LoraTargets:
        """The modules these settings adapt in ``model``; ``LoraTargetError`` for a target that matches none."""
        return find_targets(model, self.target_modules, self.target_linear, self.target_experts)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def has_lora(model: nn.Module) -> bool:
    """True when any module of ``model`` carries a LoRA adapter."""
    return any(isinstance(m, (LoraLinear, ExpertsLora)) for m in model.modules())


def apply_lora(
    model: nn.Module,
    settings: LoraSettings,
    *,
    linear_cls: type[LoraLinear] = LoraLinear,
    experts_lora_cls: type[ExpertsLora] = ExpertsLora,
) -> list[str]:
    """Adds adapters where ``settings`` points, freezes every other parameter; returns the adapted names.

    Names: each linear module's full name and ``<experts module>.<projection>`` for expert stacks, in model
    order. Adapters are float32 on the base weight's device. Raises ``LoraTargetError`` for a target that
    matches nothing, ``ValueError`` when the model already has adapters. ``linear_cls`` / ``experts_lora_cls``
    let a LoRA variant (CE-LoRA) bring its own layers. The adapted linears share one ``AdapterCasts``
    (``casts.py``): their bf16 copies are made together, once per pass with gradients.
    """
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters: merge_lora() them first, or load into them")
    targets = settings.targets(model)
    for param in model.parameters():
        param.requires_grad_(False)
    lora_args = dict(r=settings.r, alpha=settings.alpha, dropout=settings.dropout, use_rslora=settings.use_rslora)
    # New modules take the train/eval mode of the module they extend (dropout must stay off in eval).
    for name in targets.linears:
        base = model.get_submodule(name)
        linear = linear_cls(base, **lora_args, join_shared_input=settings.join_shared_input)
        _set_submodule(model, name, linear.train(base.training))
    for name, proj in targets.experts:
        experts = model.get_submodule(name)
        experts.adapters[proj] = experts_lora_cls(getattr(experts, proj), **lora_args).train(experts.training)
    linears = [m for m in model.modules() if isinstance(m, LoraLinear)]
    casts = AdapterCasts(linears)
    for module in linears:
        module.adapter_casts = casts
    return list(targets.names)


def lora_modules(model: nn.Module) -> dict[str, LoraLinear | ExpertsLora]:
    """Every adapter of ``model`` by adapted name (``<linear>`` or ``<experts>.<projection>``), in model order."""
    found: dict[str, LoraLinear | ExpertsLora] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            found[name] = module
        elif is_stacked_experts(module):
            found.update({f"{name}.{proj}": module.adapters[proj] for proj in EXPERT_PROJECTIONS
                          if proj in module.adapters})
    return found


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters by in-memory name (``<linear>.lora_A``, ``<experts>.adapters.<proj>.lora_B``), detached."""
    return {
        f"{name}.{part}": getattr(module, part).detach()
        for name, module in model.named_modules()
        if isinstance(module, (LoraLinear, ExpertsLora))
        for part in ("lora_A", "lora_B")
    }


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Folds every adapter into its base weight and removes it, leaving the plain model; returns merged names.

    Each sum ``W + s B A`` is formed in float32 (at least) and rounded once to the base weight's dtype. A
    quantised base (QLoRA) is refused: merge the saved adapter onto the float checkpoint (``kimitune merge-lora``).
    """
    from kimitune.quant import is_quantized

    if is_quantized(model):
        raise ValueError("merge_lora: the base weights are quantised (load_in_8bit / load_in_4bit); merge the saved "
                         "adapter onto the unquantised base checkpoint instead: kimitune merge-lora BASE ADAPTER OUT")
    merged = list(lora_modules(model))
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            _set_submodule(model, name, module.merged())
        elif is_stacked_experts(module):
            for proj, adapter in module.adapters.items():
                fold_into(getattr(module, proj), adapter.delta_weight())
            module.adapters.clear()
    return merged


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    settings: LoraSettings,
    base_model: str | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Writes the model's adapters to ``directory`` in PEFT's format (``peft_format.py``); returns the folder.

    ``settings`` must be the ones the adapters were built with (checked). The targets written are the adapted
    modules by exact full name; ``base_model`` is recorded as ``base_model_name_or_path``. ``state``: the adapter
    tensors by parameter name (``lora_state_dict``'s keys), when not the modules' own (a sharded model's gathered
    state).
    """
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters to save")
    for name, module in modules.items():
        if module.r != settings.r or not math.isclose(module.scaling, settings.scaling):
            raise ValueError(
                f"LoRA on {name} has r={module.r}, scaling={module.scaling:g} but the settings say "
                f"r={settings.r}, scaling={settings.scaling:g}"
            )
    config = adapter_config(
        r=settings.r,
        alpha=settings.alpha,
        dropout=settings.dropout,
        use_rslora=settings.use_rslora,
        linears=[name for name, m in modules.items() if isinstance(m, LoraLinear)],
        expert_params=[name for name, m in modules.items() if isinstance(m, ExpertsLora)],
        base_model=base_model,
    )
    tensors = {name: (m.lora_A, m.lora_B) for name, m in modules.items()}
    if state is not None:
        paths = {id(m): path for path, m in model.named_modules()}
        tensors = {name: (state[f"{paths[id(m)]}.lora_A"], state[f"{paths[id(m)]}.lora_B"])
                   for name, m in modules.items()}
    directory = Path(directory)
    write_adapter(directory, config, tensors)
    return directory


@dataclass
class AdapterFile:
    """A PEFT-format LoRA adapter read from disk: its config, settings and tensors in kimitune's layout.

    ``tensors``: adapted name -> ``(A, B)``, [r, in] / [out, r] for linears, [E, r, in] / [E, out, r] for
    experts. ``keys``: adapted name -> the PEFT key of its ``lora_A`` (for messages).
    """

    directory: Path
    config: dict
    settings: LoraSettings
    tensors: LoraTensors
    keys: dict[str, str]

    def parameter_name(self, name: str) -> str:
        """The in-memory base parameter that adapted name ``name`` adds to: ``<linear>.weight`` or
        ``<experts>.<projection>`` itself."""
        return name if self.tensors[name][0].ndim == 3 else f"{name}.weight"

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s B A`` in float32 for adapted name ``name``: [out, in] for a linear, [E, out, in] for experts
        (what merging adds to ``parameter_name(name)``; computed on demand, one at a time)."""
        lora_a, lora_b = (t.float() for t in self.tensors[name])
        product = torch.bmm(lora_b, lora_a) if lora_a.ndim == 3 else lora_b @ lora_a
        return product * self.settings.scaling


def read_adapter(directory: str | Path) -> AdapterFile:
    """Reads and checks a PEFT-format LoRA adapter folder (``AdapterMismatchError`` names what is wrong).

    ``settings.target_modules`` are the exact adapted names, so ``apply_lora(model, settings)`` rebuilds the
    adapter's layers.
    """
    directory = Path(directory)
    config = read_config(directory)
    tensors, keys = read_tensors(directory, config)
    settings = LoraSettings(
        r=config["r"],
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
        target_modules=tuple(tensors),
        use_rslora=bool(config.get("use_rslora", False)),
    )
    return AdapterFile(directory=directory, config=config, settings=settings, tensors=tensors, keys=keys)


def _find_module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _needed_shapes(model: nn.Module, name: str, r: int, key: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ``(A, B)`` shapes that adapted name ``name`` needs in ``model`` (kimitune layout)."""
    parent, _, proj = name.rpartition(".")
    experts = _find_module(model, parent) if proj in EXPERT_PROJECTIONS else None
    if experts is not None and is_stacked_experts(experts):
        num_experts, out_features, in_features = getattr(experts, proj).shape
        return (num_experts, r, in_features), (num_experts, out_features, r)
    module = _find_module(model, name)
    if module is None:
        raise AdapterMismatchError(f"adapter tensor {key!r}: the model has no module {name!r}")
    if not isinstance(module, (nn.Linear, LoraLinear)):
        raise AdapterMismatchError(
            f"adapter tensor {key!r}: {name!r} is a {type(module).__name__}, not a linear layer or experts"
        )
    return (r, module.in_features), (module.out_features, r)


def _check_fits(model: nn.Module, adapter: AdapterFile) -> None:
    """Every adapter tensor names a linear layer or expert stack of ``model`` and has the shape it needs."""
    for name, pair in adapter.tensors.items():
        needed = _needed_shapes(model, name, adapter.settings.r, adapter.keys[name])
        for part, tensor, shape in zip(("lora_A", "lora_B"), pair, needed):
            if tuple(tensor.shape) != shape:
                key = adapter.keys[name].replace(".lora_A.", f".{part}.")
                layout = ("[experts, r, in]", "[experts, out, r]") if len(shape) == 3 else ("[r, in]", "[out, r]")
                raise AdapterMismatchError(
                    f"adapter tensor {key!r}: shape {tuple(tensor.shape)} does not fit {name!r}, which needs "
                    f"{shape} as {layout[part == 'lora_B']}"
                )


def _check_same_adapters(model: nn.Module, adapter: AdapterFile) -> None:
    """The model's existing adapters are exactly the file's, with the same rank and scale."""
    modules = lora_modules(model)
    weights_file = adapter.directory / ADAPTER_WEIGHTS_FILE
    for name, key in adapter.keys.items():
        if name not in modules:
            raise AdapterMismatchError(f"adapter tensor {key!r}: the model has no LoRA on {name!r} to load it into")
    for name in modules:
        if name not in adapter.tensors:
            raise AdapterMismatchError(f"the model's LoRA on {name!r} has no tensors in {weights_file}")
    for name, module in modules.items():
        if module.r != adapter.settings.r:
            raise AdapterMismatchError(
                f"adapter tensor {adapter.keys[name]!r}: rank mismatch, the model's LoRA on {name!r} has "
                f"r={module.r} but the adapter has r={adapter.settings.r}"
            )
        if not math.isclose(module.scaling, adapter.settings.scaling):
            raise AdapterMismatchError(
                f"adapter {adapter.directory}: scale mismatch on {name!r}: the model's LoRA uses "
                f"{module.scaling:g} (alpha={module.alpha:g}, rslora={module.use_rslora}), the adapter "
                f"{adapter.settings.scaling:g} (lora_alpha={adapter.settings.alpha:g}, "
                f"use_rslora={adapter.settings.use_rslora})"
            )


def load_adapter(model: nn.Module, directory: str | Path) -> list[str]:
    """Loads a PEFT-format LoRA adapter into ``model``; returns the adapted names.

    A model without adapters gets them first (targets, r, alpha, rsLoRA and dropout from the adapter). A model
    with adapters (``apply_lora`` from a training config) must carry exactly the adapter's targets with the
    same r and scale. Everything is checked before the model changes; a mismatch raises
    ``AdapterMismatchError`` naming the tensor and why: a target the model lacks, a model adapter the file
    lacks, a rank, scale or shape that differs.
    """
    adapter = read_adapter(directory)
    _check_fits(model, adapter)
    if has_lora(model):
        _check_same_adapters(model, adapter)
    else:
        apply_lora(model, adapter.settings)
    modules = lora_modules(model)
    with torch.no_grad():
        for name, (lora_a, lora_b) in adapter.tensors.items():
            modules[name].lora_A.copy_(lora_a)
            modules[name].lora_B.copy_(lora_b)
    return list(modules)


__all__ = [
    "AdapterFile",
    "AdapterMismatchError",
    "LoraSettings",
    "apply_lora",
    "has_lora",
    "load_adapter",
    "lora_modules",
    "lora_state_dict",
    "merge_lora",
    "read_adapter",
    "save_adapter",
]
