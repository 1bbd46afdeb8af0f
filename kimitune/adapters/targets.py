"""Which modules a LoRA setting adapts: PEFT's name matching, plus the stacked MoE experts.

Three ways to name targets, as in PEFT's ``target_modules``:

- a list of names: a module is chosen when its full name equals an entry or ends with ``'.' + entry``
  (``q_proj`` chooses every ``...q_proj``; ``layers.3.self_attn.o_proj`` chooses one module);
- a regex string (anything but ``"all-linear"``): chosen when ``re.fullmatch(regex, full_name)``;
- ``"all-linear"`` (or ``lora_target_linear``): every candidate ``nn.Linear``; this is the set PEFT's all-linear
  adapts on transformers' ``KimiLinearForCausalLM`` (every ``nn.Linear`` but the output embeddings).

Candidates are the ``nn.Linear`` modules except the output head ``lm_head`` (kimitune's loss reads its weight
directly, so an adapter there would be skipped; PEFT's all-linear leaves it out too), and the stacked experts.
A name that matches anything else is ignored. The MoE router ``mlp.gate`` holds its float32 routing weight as a
bare parameter (ours and transformers' ``KimiLinearTopkRouter``), so it is never adapted, as in PEFT.

Stacked experts (a module with 3-D parameters ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] and a
``project(name, x, offsets)`` method) hold one adapter per expert for each of the two projections. They are
adapted only when asked for explicitly, because their adapters are E times larger than a linear layer's:

- ``target_experts=True`` (``lora_target_experts``): both projections of every experts module;
- a list entry that matches the experts module by the rule above (``experts``, ``mlp.experts``,
  ``model.layers.1.mlp.experts``): both projections of the matched modules;
- a list entry with a dot that matches the parameter's full name (``experts.gate_up_proj``,
  ``mlp.experts.down_proj``): that projection only. A bare ``down_proj`` keeps its PEFT meaning (the dense and
  shared-expert ``nn.Linear`` layers) and never selects the experts' ``down_proj``;
- a regex that fullmatches the experts module's name: both projections.

``target_linear`` and ``target_experts`` add to what ``target_modules`` chooses. Every list entry and every
regex must choose at least one module, else ``LoraTargetError`` names it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from kimitune.quant.weight import QuantizedWeight

ALL_LINEAR = "all-linear"
EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")
OUTPUT_HEAD = "lm_head"


class LoraTargetError(ValueError):
    """A LoRA target that matches nothing, or a target setting that cannot be used; the message names it."""


@dataclass(frozen=True)
class LoraTargets:
    """What to adapt, in model order: linear modules by full name, experts as (module, projection) pairs."""

    linears: tuple[str, ...]
    experts: tuple[tuple[str, str], ...]
    names: tuple[str, ...]  # both kinds in model order; experts as ``<module>.<projection>``


def is_stacked_experts(module: nn.Module) -> bool:
    """True for a module holding stacked expert weights (Parameters or quantised ``QuantizedWeight``) that computes
    through ``project(name, x, offsets)`` and offers the ``adapters`` hook (``kimitune.model.moe.GroupedExperts``)."""
    return callable(getattr(module, "project", None)) and isinstance(getattr(module, "adapters", None),
                                                                     nn.ModuleDict) and all(
        isinstance(getattr(module, proj, None), (nn.Parameter, QuantizedWeight)) and getattr(module, proj).ndim == 3
        for proj in EXPERT_PROJECTIONS
    )


def name_matches(name: str, entry: str) -> bool:
    """PEFT's rule for a list of target names: the full name, or a suffix that starts after a dot."""
    return name == entry or name.endswith("." + entry)


def find_targets(
    model: nn.Module,
    target_modules: tuple[str, ...] | str | None,
    target_linear: bool = False,
    target_experts: bool = False,
) -> LoraTargets:
    """The modules that the given target setting chooses in ``model`` (see the module docstring for the rules).

    Raises ``LoraTargetError`` when nothing is targeted at all, when a list entry or regex matches nothing, or
    when ``target_experts`` is set on a model without stacked experts.
    """
    linear_names = [
        name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name != OUTPUT_HEAD
    ]
    expert_names = [name for name, module in model.named_modules() if is_stacked_experts(module)]
    all_linear = target_linear or target_modules == ALL_LINEAR
    if not (all_linear or target_experts or target_modules):
        raise LoraTargetError(
            "no LoRA targets: set lora_target_modules (names, a regex or 'all-linear'), lora_target_linear "
            "or lora_target_experts"
        )

    linears: set[str] = set()
    experts: set[tuple[str, str]] = set()
    if all_linear:
        linears.update(linear_names)
        if not linears:
            raise LoraTargetError(f"'all-linear' found no nn.Linear layers to adapt (besides {OUTPUT_HEAD})")
    if target_experts:
        if not expert_names:
            raise LoraTargetError(
                "lora_target_experts is set but the model has no stacked experts "
                "(modules with 3-D gate_up_proj/down_proj and a project() method)"
            )
        experts.update((name, proj) for name in expert_names for proj in EXPERT_PROJECTIONS)

    if isinstance(target_modules, str) and target_modules != ALL_LINEAR:
        try:
            regex = re.compile(target_modules)
        except re.error as err:
            raise LoraTargetError(f"lora_target_modules regex {target_modules!r} is not a valid regex: {err}") from None
        chosen_linears = {name for name in linear_names if regex.fullmatch(name)}
        chosen_experts = {(name, proj) for name in expert_names if regex.fullmatch(name) for proj in EXPERT_PROJECTIONS}
        if not (chosen_linears or chosen_experts):
            raise LoraTargetError(
                f"lora_target_modules regex {target_modules!r} matches no nn.Linear or experts module "
                "(it must match the whole name, e.g. 'model\\.layers\\.\\d+\\.self_attn\\.q_proj')"
            )
        linears |= chosen_linears
        experts |= chosen_experts
    elif isinstance(target_modules, (list, tuple)):
        for entry in target_modules:
            chosen_linears = {name for name in linear_names if name_matches(name, entry)}
            chosen_experts = {
                (name, proj)
                for name in expert_names
                for proj in EXPERT_PROJECTIONS
                if name_matches(name, entry) or ("." in entry and name_matches(f"{name}.{proj}", entry))
            }
            if not (chosen_linears or chosen_experts):
                hint = ""
                if entry in EXPERT_PROJECTIONS and expert_names:
                    hint = f"; the experts' stacked projection is named 'experts.{entry}'"
                elif name_matches(OUTPUT_HEAD, entry):
                    hint = f"; the output head {OUTPUT_HEAD} is never adapted (the loss reads its weight directly)"
                raise LoraTargetError(
                    f"lora_target_modules entry {entry!r} matches no nn.Linear or experts module "
                    f"(a name matches when it equals the full module name or ends with '.{entry}'){hint}"
                )
            linears |= chosen_linears
            experts |= chosen_experts

    ordered: list[str | tuple[str, str]] = []
    for name, module in model.named_modules():
        if name in linears:
            ordered.append(name)
        ordered.extend((name, proj) for proj in EXPERT_PROJECTIONS if (name, proj) in experts)
    return LoraTargets(
        linears=tuple(n for n in ordered if isinstance(n, str)),
        experts=tuple(n for n in ordered if isinstance(n, tuple)),
        names=tuple(n if isinstance(n, str) else ".".join(n) for n in ordered),
    )
