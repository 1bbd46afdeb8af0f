"""The two LoRA training set-ups the training benchmarks compare, built from one state dict.

``build_kimitune``: kimitune's ``KimiLinearForCausalLM`` + ``apply_lora``; ``build_peer``: transformers'
``KimiLinearForCausalLM`` + PEFT's LoRA. Both get the same weights (``state``, e.g. from ``random_state``) and
LoRA r=16, alpha=32 on every linear layer (PEFT's ``all-linear``: the LM head excluded). Each returns
``(model, loss_fn, ...)`` where ``loss_fn(input_ids, labels)`` is the mean token loss of the step, computed as each
tool trains: kimitune without full logits (``return_logits=False``, what its trainer does), the peer from the
full logits (what transformers does). ``build_kimitune`` also returns the ``RunOptions`` its passes run with, for a
``kimitune.train.step.TrainStep`` (kimitune's own training step, which the GPU benchmarks time). With ``quant``
(issue 24) kimitune's frozen weights are quantised before the LoRA is added (``kimitune.quant.quantize_model_``:
"fp8" float8 e4m3 or "int8", one scale per row), as ``load_in_fp8`` / ``load_in_8bit`` train; ``TOOL_QUANT`` names
the benchmark rows that do so.

Used by ``train_gpu.py`` (bf16 on CUDA) and ``train_cpu.py`` (float32 on the CPU).
"""

from __future__ import annotations

import torch

from kimitune.model import KimiLinearConfig, KimiLinearForCausalLM

LORA_R, LORA_ALPHA = 16, 32
TOOL_QUANT = {"kimitune+fp8": "fp8", "kimitune+int8": "int8"}  # row tool -> build_kimitune's quant


def random_state(cfg: KimiLinearConfig, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights (kimitune's initialisation) in ``dtype``, as a CPU state dict both tools load."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = KimiLinearForCausalLM(cfg).to(dtype)
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    del model
    return state


def build_kimitune(cfg: KimiLinearConfig, state: dict, device: str, ckpt: bool = False, experts: bool = False,
                   ckpt_layers: int | None = None, quant=None):
    """``ckpt_layers``: with ``ckpt``, how many decoder layers recompute (None: all). ``quant``: a ``QuantSpec`` or
    a name ``QuantSpec.parse`` takes ("fp8", "int8", ...): the frozen weights are quantised first (None: as loaded)."""
    from kimitune.adapters import LoraSettings, apply_lora
    from kimitune.model import RunOptions
    from kimitune.quant import quantize_model_

    with torch.device("meta"):
        model = KimiLinearForCausalLM(cfg)
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, assign=True)
    if quant is not None:
        quantize_model_(model, quant)  # before apply_lora, which adapts the quantised linears
    apply_lora(model, LoraSettings(r=LORA_R, alpha=LORA_ALPHA, target_modules="all-linear", target_experts=experts))
    options = RunOptions(recompute_layers=model.recomputed_layers(ckpt_layers) if ckpt else frozenset())
    model.train()

    def loss_fn(ids, labels=None, cu_seqlens=None):
        labels = ids if labels is None else labels
        return model(ids, labels=labels, cu_seqlens=cu_seqlens, return_logits=False, options=options).loss

    return model, loss_fn, options


def build_peer(cfg: KimiLinearConfig, state: dict, device: str, dtype: torch.dtype, ckpt: bool = False,
               peft: bool = True):
    """transformers' model with ``state``'s weights and (``peft``) PEFT's LoRA -> (model, loss_fn(ids, ...)); without
    ``peft`` the bare model, for a trainer that adds the adapter itself (TRL's)."""
    from peft import LoraConfig, get_peft_model
    from transformers import KimiLinearConfig as HFConfig
    from transformers import KimiLinearForCausalLM as HFModel

    hf_dict = cfg.to_dict()
    hf_dict["num_key_value_heads"] = cfg.num_attention_heads  # transformers' MLA needs it (ours ignores it)
    hf_cfg = HFConfig(**hf_dict)
    with torch.device("meta"):
        model = HFModel._from_config(hf_cfg, torch_dtype=dtype, experts_implementation="grouped_mm")
    missing, unexpected = model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False,
                                                assign=True)
    if missing or unexpected:
        raise RuntimeError(f"peer weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.config.use_cache = False
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if peft:
        model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear",
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()

    def loss_fn(ids, labels=None):
        labels = ids if labels is None else labels
        return model(input_ids=ids, labels=labels, use_cache=False).loss

    return model, loss_fn


@torch.no_grad()
def copy_lora_weights(kimitune_model, peer_model) -> int:
    """Gives the peer kimitune's LoRA matrices (each tool draws its own random ``lora_A``), so that the two
    train the same adapter from the same start; returns how many tensors were copied (all of the peer's)."""
    ours = dict(kimitune_model.named_parameters())
    copied = 0
    for name, param in peer_model.named_parameters():
        if ".lora_A." not in name and ".lora_B." not in name:
            continue
        # base_model.model.<our name>.lora_A.default.weight -> <our name>.lora_A
        key = name.removeprefix("base_model.model.").replace(".default.weight", "")
        param.copy_(ours[key])
        copied += 1
    if copied != sum(1 for n in ours if n.endswith((".lora_A", ".lora_B"))):
        raise RuntimeError(f"copied {copied} LoRA tensors, kimitune holds another number")
    return copied


def planned_peak_gib(cfg: KimiLinearConfig, tool: str, seq: int, ckpt: bool, ckpt_layers: int | None = None) -> float:
    """kimitune.plan's prediction of ``build_kimitune``'s training step (bf16, no autocast, one unpacked
    sequence, fused AdamW; the ``TOOL_QUANT`` rows with their weights quantised), as torch.cuda.max_memory_allocated
    would read it, in GiB; NaN for the peer."""
    if tool == "peer":
        return float("nan")
    experts = tool == "kimitune+experts"
    quant = TOOL_QUANT.get(tool)
    from kimitune.config import parse_config
    from kimitune.plan import predict_peak_memory

    train, _ = parse_config({"base_model": "unused", "adapter": "lora", "lora_r": LORA_R, "lora_alpha": LORA_ALPHA,
                             "lora_target_linear": True, "lora_target_experts": experts, "sequence_len": seq,
                             "gradient_checkpointing": ckpt, "gradient_checkpointing_layers": ckpt_layers,
                             "optimizer": "adamw_torch_fused", "load_in_fp8": quant == "fp8",
                             "load_in_8bit": quant == "int8"})
    return predict_peak_memory(train, cfg, autocast=False, packed=False).peak_allocated_gib


def mlp_shards(tiled_mlp: str | None) -> int | None:
    """A benchmark's ``--tiled-mlp [N]`` as ``RunOptions.mlp_shards``: not given, 1 (whole blocks); given without a
    number ("auto"), None (shards of about hidden_size tokens); else N."""
    if tiled_mlp is None:
        return 1
    return None if tiled_mlp == "auto" else int(tiled_mlp)
