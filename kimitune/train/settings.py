"""A training config's keys -> the settings objects of the layers below (adapters, quantisation), which never
read the config themselves."""

from __future__ import annotations

from kimitune.adapters.ce_lora import CeLoraSettings
from kimitune.adapters.lora import LoraSettings
from kimitune.config import TrainConfig
from kimitune.model import KimiLinearForCausalLM, RunOptions
from kimitune.quant import QuantSpec


def lora_settings(config: TrainConfig) -> LoraSettings:
    """lora_r, lora_alpha, lora_dropout, lora_target_modules, lora_target_linear, lora_target_experts,
    peft_use_rslora."""
    return LoraSettings(
        r=config.lora_r,
        alpha=float(config.lora_alpha),
        dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        target_linear=config.lora_target_linear,
        target_experts=config.lora_target_experts,
        use_rslora=config.peft_use_rslora,
    )


def ce_lora_settings(config: TrainConfig) -> CeLoraSettings:
    """ce_lora_sparsity, ce_lora_double_rank, ce_lora_refresh_steps, ce_lora_adaptive."""
    return CeLoraSettings(
        sparsity=config.ce_lora_sparsity,
        double_rank=config.ce_lora_double_rank,
        refresh_steps=config.ce_lora_refresh_steps,
        adaptive=config.ce_lora_adaptive,
    )


def quant_spec(config: TrainConfig) -> QuantSpec | None:
    """load_in_8bit / load_in_fp8 / load_in_4bit, bnb_4bit_quant_type, bnb_4bit_use_double_quant; None for float
    weights."""
    if config.load_in_8bit:
        return QuantSpec(8)
    if config.load_in_fp8:
        return QuantSpec(8, float8=True)
    if config.load_in_4bit:
        return QuantSpec(4, config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant)
    return None


def run_options(config: TrainConfig, model: KimiLinearForCausalLM, sharded: bool,
                context_group=None) -> RunOptions:
    """How the training passes run: the recomputed layers (gradient_checkpointing and gradient_checkpointing_layers,
    or FSDP's activation_checkpointing when ``sharded``), kda_keep_intermediates, router_aux_loss_coef,
    sequence_piece_len, recompute_segment_layers, tiled_mlp (its shards), and ``context_group``: the ranks that split
    each row (the ``World``'s, under context_parallel_size) or None."""
    recompute = model.recomputed_layers(config.gradient_checkpointing_layers) \
        if config.recomputes_layers(sharded=sharded) else frozenset()
    return RunOptions(recompute_layers=recompute, kda_keep_intermediates=config.kda_keep_intermediates,
                      router_aux_loss_coef=config.router_aux_loss_coef, sequence_piece_len=config.sequence_piece_len,
                      segment_layers=config.recompute_segment_layers, context_parallel=context_group,
                      mlp_shards=config.tiled_mlp_num_shards if config.tiled_mlp else 1)
