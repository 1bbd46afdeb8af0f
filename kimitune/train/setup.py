"""Everything a run needs before its first step: device, tokenizer, data, model and adapter.

Kept apart from the loop so that the loop reads as a loop, and so that `kimitune eval` and the benchmarks can
build the same model and data the way training does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch import nn

from kimitune.config import ConfigError, TrainConfig
from kimitune.model.context_parallel import row_multiple
from kimitune.train.preference import PreferenceSettings, preference_settings


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(config: TrainConfig) -> torch.device:
    """The device of ``config.device`` (auto, cpu or cuda); a bad choice is a ConfigError."""
    from kimitune.infer.loading import pick_device as pick

    try:
        return pick(config.device)
    except ValueError as error:
        raise ConfigError(f"device: {error}") from None


def apply_tf32(config: TrainConfig) -> None:
    """``tf32``: float32 matmuls on TF32 tensor cores (true) or exact (false); unset leaves PyTorch's setting."""
    if config.tf32 is not None:
        torch.set_float32_matmul_precision("high" if config.tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = config.tf32


def uses_bf16(config: TrainConfig, device: torch.device) -> bool:
    """bf16 on a GPU that supports it (bf16: auto or true); float32 on CPU."""
    if device.type != "cuda" or config.bf16 is False:
        return False
    return torch.cuda.is_bf16_supported()


@dataclass
class TrainingSetup:
    """The built pieces of a run, and how to save what it trains."""

    config: TrainConfig
    device: torch.device
    model: nn.Module
    tokenizer: object
    train_samples: list
    eval_batches: list
    bf16: bool  # the run computes in bf16 (a GPU that has it)
    autocast_bf16: bool  # its forwards run under bf16 autocast: full fine-tuning's float32 weights only
    adapter_settings: object | None = None
    preference: PreferenceSettings | None = None  # a preference run (rl): train_samples and eval_pairs are pairs
    # (KTO: unpaired samples with their KL sequences)
    eval_pairs: list = field(default_factory=list)
    _epoch_cache: dict = field(default_factory=dict)
    _batches_per_epoch: int | None = None

    @property
    def row_capacity(self) -> int:
        return self.config.micro_batch_size * self.config.sequence_len

    def train_batches(self, epoch: int) -> list:
        """The micro-batches of one epoch, in training order (deterministic for seed and epoch)."""
        if epoch not in self._epoch_cache and self.preference is not None:
            from kimitune.data.preference import make_example_batches

            self._epoch_cache = {epoch: make_example_batches(self.train_samples, self.row_capacity,
                                                             self.config.seed, epoch,
                                                             row_multiple(self.config.context_parallel_size),
                                                             self.config.rl_shared_prompt)}
        if epoch not in self._epoch_cache:
            from kimitune.data import make_batches

            self._epoch_cache = {epoch: make_batches(
                self.train_samples,
                sequence_len=self.config.sequence_len,
                micro_batch_size=self.config.micro_batch_size,
                sample_packing=self.config.sample_packing,
                seed=self.config.seed,
                epoch=epoch,
                pad_id=self.pad_id,
                pad_to_sequence_len=self.config.pad_to_sequence_len,
                row_multiple=row_multiple(self.config.context_parallel_size),
            )}
        return self._epoch_cache[epoch]

    @property
    def batches_per_epoch(self) -> int:
        # Packing fills the same bins every epoch (only their order changes), so epoch 0's count holds for all.
        if self._batches_per_epoch is None:
            self._batches_per_epoch = len(self.train_batches(0))
        return self._batches_per_epoch

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def save_trainable(self, directory: Path) -> None:
        """Writes what training changes: the adapter (PEFT format) or the whole model (release layout).

        A sharded model (several processes) is gathered to rank 0, which writes the same files one process would;
        every rank must call this.
        """
        from kimitune.train.distributed import full_state_dict, is_main_process

        adapter = self.adapter_settings is not None
        state = full_state_dict(self.model, trainable_only=adapter)  # None when the model is not sharded
        if not is_main_process():
            return
        if adapter:
            from kimitune.adapters.lora import save_adapter

            save_adapter(self.model, directory, self.adapter_settings, base_model=self.config.base_model, state=state)
        else:
            from kimitune.model.checkpoint import save_pretrained

            save_pretrained(self.model, directory, state=state)

    def save_final(self, output_dir: Path) -> Path:
        """The result of the run, in output_dir, with the tokenizer beside it (every rank calls it)."""
        from kimitune.train.distributed import is_main_process

        self.save_trainable(output_dir)
        if is_main_process() and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(output_dir)
        return output_dir


def _build_model(config: TrainConfig, device: torch.device, dtype: torch.dtype, weights_from: str | None):
    """The model in ``dtype`` on ``device``; with load_in_8bit / load_in_fp8 / load_in_4bit its frozen linears and
    experts are quantised layer by layer while it is built (``kimitune.quant``), computing in ``dtype``."""
    from kimitune.model import KimiLinearConfig, KimiLinearForCausalLM
    from kimitune.quant import init_quantized, load_quantized
    from kimitune.train.settings import quant_spec

    quantization = quant_spec(config)  # TrainConfig refuses quantisation with full fine-tuning
    if weights_from is not None and quantization is not None:
        return load_quantized(weights_from, quantization, dtype=dtype, device=device)
    if weights_from is not None:
        return KimiLinearForCausalLM.from_pretrained(weights_from, dtype=dtype, device=device)
    model_config = KimiLinearConfig.from_pretrained(config.init_from_config)
    if quantization is not None:
        return init_quantized(model_config, quantization, device=device, dtype=dtype)  # from the global seed
    model = KimiLinearForCausalLM(model_config)  # initialised from the global seed
    return model.to(device=device, dtype=dtype)


def builds_on_meta(config: TrainConfig) -> bool:
    """Whether a sharded run can build this model without weights on ranks > 0 (rank 0 then sends them): not with
    quantised weights or CE-LoRA, whose buffers are computed from the weights as the model is built."""
    return not (config.quantizes_weights or config.adapter == "ce_lora")


def build_training_setup(
    config: TrainConfig,
    console: Console,
    resume_from: Path | None = None,
    *,
    model_device: torch.device | None = None,
    model_config=None,
) -> TrainingSetup:
    """Builds device, tokenizer, data, model and adapter in a fixed order (so the RNG draws are the same).

    ``model_device``: where the model is built, the run's device by default. A sharded run builds it on rank 0's
    CPU (``torch.device("cpu")``) and on the meta device elsewhere (``torch.device("meta")``, with
    ``model_config``: the structure only, adapters included, no weights read or drawn); ``distributed`` then
    shards it and sends every rank its part of rank 0's weights.
    """
    from kimitune.data import load_tokenizer, make_batches, prepare_datasets

    seed_everything(config.seed)
    device = pick_device(config)
    apply_tf32(config)
    bf16 = uses_bf16(config, device)
    tokenizer = load_tokenizer(config.tokenizer_path, trust_remote_code=config.trust_remote_code)
    prepared = prepare_datasets(config, tokenizer)
    console.print(prepared.report)

    full_finetune = config.adapter is None
    # Adapters train in float32 on top of frozen bf16 weights, and the model casts them to bf16 where they are
    # multiplied (kimitune.adapters.casts): such a run needs no autocast, whose dispatch costs host time on every op
    # (benchmarks/RESULTS.md, issue 20). Full fine-tuning keeps float32 master weights and computes under autocast.
    dtype = torch.bfloat16 if (bf16 and not full_finetune) else torch.float32
    autocast_bf16 = bf16 and full_finetune
    weights_from = config.base_model
    if full_finetune and resume_from is not None:
        weights_from = str(resume_from)
    seed_everything(config.seed)
    if model_device is not None and model_device.type == "meta":
        from kimitune.model import KimiLinearForCausalLM

        with torch.device("meta"):
            model = KimiLinearForCausalLM(model_config).to(dtype)
    else:
        model = _build_model(config, model_device or device, dtype, weights_from)
    if config.gradient_checkpointing_layers is not None:
        model.recomputed_layers(config.gradient_checkpointing_layers)  # a count the model cannot take fails here

    settings = None
    if not full_finetune:
        settings = _attach_adapter(model, config, resume_from, console)
    preference, train_samples, eval_pairs = None, prepared.train, []
    eval_batches = []
    if config.rl is not None:
        from kimitune.data.preference import make_example_batches, preference_examples

        preference = preference_settings(config)
        desirable = prepared.desirable or {}
        train_samples = preference_examples(prepared.train, desirable.get("train"), config.sequence_len)
        eval_pairs = preference_examples(prepared.eval, desirable.get("eval"), config.sequence_len)
        if eval_pairs:
            eval_batches = make_example_batches(eval_pairs, config.micro_batch_size * config.sequence_len,
                                                config.seed, 0, row_multiple(config.context_parallel_size),
                                                config.rl_shared_prompt)
    elif prepared.eval:
        eval_batches = make_batches(
            prepared.eval,
            sequence_len=config.sequence_len,
            micro_batch_size=config.micro_batch_size,
            sample_packing=config.sample_packing,
            seed=config.seed,
            epoch=0,
            pad_id=getattr(tokenizer, "pad_token_id", None) or 0,
            pad_to_sequence_len=config.pad_to_sequence_len,
            row_multiple=row_multiple(config.context_parallel_size),
        )
    return TrainingSetup(
        config=config,
        device=device,
        model=model,
        tokenizer=tokenizer,
        train_samples=train_samples,
        eval_batches=eval_batches,
        bf16=bf16,
        autocast_bf16=autocast_bf16,
        adapter_settings=settings,
        preference=preference,
        eval_pairs=eval_pairs,
    )


def _attach_adapter(model: nn.Module, config: TrainConfig, resume_from: Path | None, console: Console):
    from kimitune.adapters.lora import apply_lora, load_adapter
    from kimitune.train.settings import ce_lora_settings, lora_settings

    for param in model.parameters():
        param.requires_grad_(False)
    settings = lora_settings(config)
    if config.adapter == "ce_lora":
        from kimitune.adapters.ce_lora import apply_ce_lora

        adapted = apply_ce_lora(model, settings, ce_lora_settings(config))
    else:
        adapted = apply_lora(model, settings)
    from kimitune.quant.convert import quantized_weights

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Quantised weights are buffers, not Parameters: count the weights they stand for.
    total = sum(p.numel() for p in model.parameters()) + sum(w.shape.numel() for w in quantized_weights(model).values())
    console.print(
        f"{'CE-LoRA' if config.adapter == 'ce_lora' else 'LoRA'} r={settings.r} alpha={settings.alpha} on "
        f"{len(adapted)} modules: "
        f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"
    )
    start_from = resume_from or (Path(config.lora_model_dir) if config.lora_model_dir else None)
    on_meta = next(model.parameters()).is_meta  # a sharded run's rank > 0: rank 0 loads it and sends it
    if start_from is not None and not on_meta:
        load_adapter(model, start_from)
    return settings
