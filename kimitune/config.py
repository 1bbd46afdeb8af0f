"""The training YAML schema: one place that knows every key, its default and its meaning.

Keys are flat, as in Axolotl, so that a config written for Axolotl's Kimi Linear example runs here. Keys that
Axolotl knows but that have no effect in kimitune are accepted and listed in ``INERT_KEYS``; ``load_config``
returns a warning for each one that is set. Any other unknown key is an error that names the closest known key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

TrainOnEos = Literal["turn", "last", "none"]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and, for files, the path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class DatasetConfig(_Strict):
    """One entry of ``datasets:`` / ``test_datasets:``: where the rows are and how to read their messages."""

    path: str = Field(description="Local .jsonl/.json/.parquet file or folder, or a hub dataset id.")
    type: str = Field(
        default="chat_template", description="How rows become samples. Fine-tuning: chat_template renders each "
        "row's messages with the chat template. Preference tuning (rl): chat_template.default (messages + chosen / "
        "rejected replies) or an Axolotl row layout (chatml.intel, chatml.prompt_pairs, chatml.argilla, "
        "chatml.argilla_chat, chatml.ultra, chatml.icr, and their llama3. twins); KTO (rl: kto): chat_template.default "
        "(messages + completion + label) or chatml.intel, chatml.prompt_pairs, chatml.argilla, chatml.ultra and "
        "their llama3. twins; always rendered with the tokenizer's own chat template."
    )
    split: str = Field(default="train", description="Split of a hub dataset or data folder to read.")
    name: str | None = Field(default=None, description="Hub dataset configuration name.")
    data_files: str | list[str] | None = Field(
        default=None, description="Files (or glob patterns) to read within a folder or hub dataset."
    )
    ds_type: Literal["json", "parquet"] | None = Field(
        default=None, description="File format when it cannot be told from the path's suffix."
    )
    field_messages: str = Field(default="messages", description="The row key that holds the list of messages.")
    message_property_mappings: dict[str, str] = Field(
        default_factory=lambda: {"role": "role", "content": "content"},
        description="Maps our message keys (role, content) to the keys the rows use.",
    )
    roles: dict[str, list[str]] | None = Field(
        default=None, description="Role aliases: {'user': ['human'], 'assistant': ['gpt']}."
    )
    roles_to_train: list[str] | None = Field(default=None, description="Overrides the top-level roles_to_train.")
    train_on_eos: TrainOnEos | None = Field(default=None, description="Overrides the top-level train_on_eos.")
    message_field_training: str = Field(
        default="train",
        description="Per-message key whose true/false (or 0/1) overrides the role rule for that message; "
        "a message's `weight` (0/1) is read too, and so are `train`/`weight` on content parts.",
    )
    field_tools: str = Field(default="tools", description="The row key that holds the tool definitions, if any.")
    field_chosen: str = Field(default="chosen", description="Preference tuning: the row key of the chosen reply.")
    field_rejected: str = Field(default="rejected", description="Preference tuning: the row key of the rejected "
                                "reply.")
    # Axolotl keys for datasets that have no effect here.
    shards: int | None = Field(default=None, description="Axolotl's key; no effect: every row is read.")
    chat_template: str | None = Field(
        default=None, description="Axolotl's key; no effect: the top-level chat_template applies to every entry."
    )
    field: str | None = Field(default=None, description="Axolotl's key; no effect: use field_messages.")


class FsdpConfig(_Strict):
    """``fsdp_config:``: how ``torchrun ... -m kimitune train`` shards the model (FSDP2; Axolotl's keys, which may
    also carry Axolotl's older ``fsdp_`` prefix). Without torchrun these have no effect."""

    offload_params: bool = Field(default=False, description="Keep sharded weights, gradients and optimizer "
                                 "state in CPU memory (CPUOffloadPolicy); the optimizer steps on the CPU.")
    cpu_offload_pin_memory: bool = Field(default=True, description="Pin the offloaded CPU memory.")
    reshard_after_forward: bool = Field(default=True, description="Free each layer's gathered weights after its "
                                        "forward (gather again in the backward); false keeps them, faster.")
    activation_checkpointing: bool = Field(default=False, description="Recompute each decoder layer's "
                                           "activations in the backward (as gradient_checkpointing).")


# Axolotl's fsdp_config keys that kimitune accepts but that change nothing here.
FSDP_INERT_KEYS: dict[str, str] = {
    "auto_wrap_policy": "kimitune always shards per decoder layer",
    "transformer_layer_cls_to_wrap": "kimitune always shards per decoder layer",
    "state_dict_type": "checkpoints hold whole weights (PEFT / release layout) and a sharded optimizer state",
    "sharding_strategy": "kimitune always shards fully (FSDP2)",
    "cpu_ram_efficient_loading": "every rank loads the weights, then shards them",
    "sync_module_states": "every rank builds the same weights",
    "use_orig_params": "FSDP2 always keeps the original parameters",
    "limit_all_gathers": "FSDP2 needs no rate limiting",
    "forward_prefetch": "FSDP2 prefetches the next layer itself",
    "backward_prefetch": "FSDP2 prefetches the next layer itself",
    "version": "set fsdp_version at the top level",
}


class TrainConfig(_Strict):
    """Everything a `kimitune train` run reads from its YAML file."""

    # --- model -----------------------------------------------------------------------------------------
    base_model: str | None = Field(default=None, description="Checkpoint folder or hub id (release layout).")
    init_from_config: str | None = Field(
        default=None, description="A model config.json: train a randomly initialised model of that shape."
    )
    tokenizer: str | None = Field(default=None, description="Tokenizer folder or hub id; defaults to base_model.")
    trust_remote_code: bool = Field(
        default=False, description="Lets the tokenizer's own code run (the Kimi tokenizer needs it)."
    )
    # Quantised frozen weights (kimitune.quant): every linear and the experts; embeddings, norms, router, head kept.
    load_in_8bit: bool = Field(default=False, description="Frozen weights in int8, one scale per row (LLM.int8).")
    load_in_4bit: bool = Field(default=False, description="Frozen weights in 4-bit, blocks of 64 (QLoRA).")
    load_in_fp8: bool = Field(default=False, description="Frozen weights in float8 e4m3, one scale per row: on a "
                              "GPU the linear layers multiply in FP8 (forward and input gradient), the expert "
                              "stacks dequantise to bf16 as 8-bit's do.")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="The 4-bit number format.")
    bnb_4bit_use_double_quant: bool = Field(default=False, description="Also quantise the 4-bit block scales.")
    bf16: bool | Literal["auto"] = Field(
        default="auto", description="Compute in bf16 on a GPU that supports it (auto or true); false computes in "
        "float32. The CPU always computes in float32."
    )
    fp16: bool | None = Field(default=None, description="Accepted for Axolotl configs; kimitune trains in bf16 (see bf16) "
                              "or float32, so fp16: true only warns.")
    tf32: bool | None = Field(default=None, description="float32 matmuls on TF32 tensor cores (true) or in full "
                              "float32 (false); unset: PyTorch's default. Matters for float32 weights on a GPU.")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Where to train: auto takes a GPU "
                                                   "when there is one.")
    seed: int = Field(default=42, description="Seed of the initial weights, the data order, the eval split and "
                      "dropout.")

    # --- adapter ---------------------------------------------------------------------------------------
    adapter: Literal["lora", "qlora", "ce_lora"] | None = Field(
        default=None, description="lora, qlora (LoRA on a 4-bit base), ce_lora (docs/ce_lora.md), or null for full "
        "fine-tuning of every weight."
    )
    lora_model_dir: str | None = Field(default=None, description="Start from this saved adapter.")
    lora_r: int = Field(default=8, description="LoRA rank.")
    lora_alpha: float = Field(default=16, description="LoRA scale numerator: updates are scaled by lora_alpha / "
                              "lora_r (lora_alpha / sqrt(lora_r) with peft_use_rslora).")
    lora_dropout: float = Field(default=0.0, description="Dropout on the LoRA branch's input while training.")
    lora_target_modules: list[str] | str | None = Field(
        default=None, description="Module names (PEFT's suffix rule), 'all-linear', or one regex string (PEFT's rule)."
    )
    lora_target_linear: bool = Field(default=False, description="Target every linear layer (PEFT's all-linear).")
    lora_target_experts: bool = Field(default=False, description="Also adapt the stacked MoE experts.")
    peft_use_rslora: bool = Field(default=False, description="Rank-stabilised LoRA: scale by lora_alpha / "
                                  "sqrt(lora_r).")
    # CE-LoRA (adapter: ce_lora; Chen et al., arXiv 2502.01378; docs/ce_lora.md has the paper's settings).
    ce_lora_sparsity: float | dict[str, float] = Field(
        default=0.5,
        description="Fraction of each frozen weight's output rows left out of the backward's input-gradient "
        "product (0 = exact); or {module name: sparsity}, unmatched adapted modules exact.",
    )
    ce_lora_double_rank: int | None = Field(
        default=None, ge=0, description="Rank of the fixed Double-LoRA (SVD) pair; null = 7/8 * lora_r; 0 = off."
    )
    ce_lora_refresh_steps: int = Field(
        default=200, gt=0, description="Backward passes between two choices of the kept rows (paper: 200)."
    )
    ce_lora_adaptive: bool = Field(
        default=False, description="Layer-wise adaptive sparsity: each layer keeps the fewest rows holding "
        "1 - ce_lora_sparsity of its importance."
    )

    # --- data ------------------------------------------------------------------------------------------
    datasets: list[DatasetConfig] = Field(
        default_factory=list, description="The training data: a list of entries, each with the datasets[] keys."
    )
    test_datasets: list[DatasetConfig] = Field(
        default_factory=list, description="The eval data, entries with the datasets[] keys; unset, val_set_size "
        "holds out part of the training data."
    )
    val_set_size: float = Field(default=0.0, ge=0.0, description="Fraction (<1) or count (>=1) held out.")
    chat_template: str | None = Field(
        default=None, description="'tokenizer_default' (or unset) uses the tokenizer's template; else a jinja string."
    )
    sequence_len: int = Field(default=2048, gt=0, description="The most tokens of one sample (longer ones follow "
                              "excess_length_strategy).")
    sample_packing: bool = Field(
        default=False, description="Pack samples end to end into rows of micro_batch_size * sequence_len tokens, "
        "each sample attending only to itself, instead of padding each to the longest of its batch."
    )
    pad_to_sequence_len: bool = Field(
        default=False, description="Every batch the same shape: packed rows padded to micro_batch_size * "
        "sequence_len tokens (the padding a sequence of its own, with no loss), padded batches to sequence_len."
    )
    train_on_inputs: bool = Field(default=False, description="Train on the tokens of every message, not only "
                                  "those of roles_to_train.")
    roles_to_train: list[str] = Field(
        default_factory=lambda: ["assistant"], description="Roles whose messages are trained; a message's own "
        "`train: true/false` overrides its role."
    )
    train_on_eos: TrainOnEos = Field(
        default="turn", description="Which end-of-turn tokens are trained: turn (every trained message's), last "
        "(only the last trained message's), none."
    )
    excess_length_strategy: Literal["drop", "truncate"] = Field(
        default="drop", description="Samples longer than sequence_len are dropped or truncated (both are counted "
        "in the data report)."
    )
    dataset_prepared_path: str | None = Field(default=None, description="Tokenised-data cache folder.")
    shuffle_merged_datasets: bool = Field(default=True, description="Shuffle the training samples (with seed) "
                                          "after the datasets are joined.")

    # --- preference tuning (kimitune.train.preference) ------------------------------------------------
    rl: Literal["dpo", "ipo", "orpo", "simpo", "kto"] | None = Field(
        default=None, description="Preference tuning instead of fine-tuning: on chosen / rejected pairs dpo, ipo "
        "(both against the model as it starts, the reference), orpo or simpo (no reference), each pair's two "
        "sequences packed into one row; on replies labelled desirable or not (KTO's unpaired data) kto, against "
        "the reference too."
    )
    rl_beta: float | None = Field(default=None, gt=0, description="The preference loss's beta (TRL's): 0.1 "
                                  "unless set. ORPO reads orpo_alpha.")
    orpo_alpha: float | None = Field(default=None, gt=0, description="ORPO's weight of the odds-ratio term "
                                     "(TRL's ORPOConfig beta): 0.1 unless set.")
    simpo_gamma: float = Field(default=0.5, description="SimPO's target reward margin (TRL's CPOConfig).")
    cpo_alpha: float = Field(default=1.0, ge=0, description="SimPO: the weight of the chosen replies' NLL "
                             "(TRL's CPOConfig; 0 for the SimPO paper's loss).")
    rl_label_smoothing: float = Field(default=0.0, ge=0, lt=0.5, description="SimPO: label smoothing of the "
                                      "pair loss (TRL's CPOConfig label_smoothing).")
    rl_shared_prompt: bool = Field(default=False, description="DPO, IPO, SimPO: each pair's prompt computed once "
                                   "and both replies continued from its states (kimitune/model/shared_prompts.py): "
                                   "the same losses, the prompt's compute and activations once instead of twice.")
    kto_desirable_weight: float = Field(default=1.0, gt=0, description="KTO: the weight of the desirable "
                                        "samples' losses (TRL's KTOConfig desirable_weight).")
    kto_undesirable_weight: float = Field(default=1.0, gt=0, description="KTO: the weight of the undesirable "
                                          "samples' losses (TRL's KTOConfig undesirable_weight).")

    # --- optimisation ----------------------------------------------------------------------------------
    micro_batch_size: int = Field(default=1, gt=0, description="Samples per forward pass (packed: rows of "
                                  "sequence_len tokens per forward pass).")
    gradient_accumulation_steps: int = Field(default=1, gt=0, description="Micro-batches per optimizer step "
                                             "(per GPU under torchrun).")
    num_epochs: float = Field(default=1, gt=0, description="Passes over the training data (fractions allowed); "
                              "max_steps, when set, decides instead.")
    max_steps: int | None = Field(default=None, gt=0, description="Optimizer steps of the run; overrides "
                                  "num_epochs. The learning-rate schedule spans them.")
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw", "adamw_8bit"] = Field(
        default="adamw_torch", description="AdamW (fused on a GPU; the first three names are the same), or "
        "adamw_8bit (bitsandbytes' 8-bit states, GPU only)."
    )
    learning_rate: float = Field(default=2e-4, gt=0, description="The peak learning rate, reached after warmup.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="The learning rate's course after warmup, over the run's steps."
    )
    cosine_min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0, description="Where cosine and linear decay "
                                       "end, as a fraction of learning_rate.")
    warmup_steps: int | None = Field(default=None, ge=0, description="Steps of linear warmup from near 0 to "
                                     "learning_rate.")
    warmup_ratio: float | None = Field(default=None, ge=0.0, le=1.0, description="Warmup as a fraction of the "
                                       "run's steps (instead of warmup_steps).")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW's decoupled weight decay, on matrices "
                                "only (not on norms, biases, gates).")
    adam_beta1: float = Field(default=0.9, description="AdamW's first-moment decay.")
    adam_beta2: float = Field(default=0.999, description="AdamW's second-moment decay.")
    adam_epsilon: float = Field(default=1e-8, description="AdamW's epsilon.")
    max_grad_norm: float | None = Field(default=1.0, description="Clip the gradient's global norm to this; null "
                                        "or 0: no clipping (the norm is still logged).")
    gradient_checkpointing: bool = Field(default=False, description="Recompute decoder layers' activations in "
                                         "the backward: less memory, slower.")
    gradient_checkpointing_layers: int | None = Field(
        default=None, ge=1, description="How many decoder layers recompute, spread evenly over the stack (unset: "
        "all). Fewer is faster and holds more activations; `kimitune plan` suggests the fewest that fit."
    )
    tiled_mlp: bool = Field(
        default=False, description="Axolotl's tiled MLP: every decoder layer's MLP or MoE runs in shards of tokens, "
        "each recomputed on its own in the backward, so one shard's expert activations are alive at a time instead "
        "of the whole row's (inside a recomputed layer, or a piece of one, too), for one more forward of the block. "
        "The result is the same."
    )
    tiled_mlp_num_shards: int | None = Field(
        default=None, ge=1, description="With tiled_mlp: the shards of each layer call's tokens (a row, or a piece "
        "of one with sequence_piece_len). Unset: shards of about hidden_size tokens (ceil(tokens / hidden_size), "
        "Axolotl's default)."
    )
    activation_offloading: bool = Field(
        default=False, description="Keep what the forward saves for the backward (with gradient_checkpointing: "
        "each recomputed layer's input and the states between pieces) in pinned CPU memory, copied out while the "
        "forward computes and back when the backward needs it: GPU memory for host memory and PCIe traffic. "
        "`gradient_checkpointing: offload` (Axolotl's) sets both."
    )
    sequence_piece_len: int | None = Field(
        default=None, ge=1, description="Long context: each recomputed decoder layer runs in pieces of this many "
        "tokens along the sequence, recomputed one at a time in the backward (KDA and conv states and MLA latents "
        "pass between pieces; the result is the same). Activations then grow with this length, not the sequence's. "
        "Needs gradient_checkpointing. Unset: whole layers."
    )
    recompute_segment_layers: int = Field(
        default=1, ge=1, description="Two levels of recomputation for the longest rows: runs of this many decoder "
        "layers are recomputed together from their first input, the only one kept (1 / N of the layer inputs, plus "
        "one segment's while the backward rebuilds it), for one more forward pass of every layer. Needs every layer "
        "recomputed (gradient_checkpointing: true, gradient_checkpointing_layers unset). 1: each layer keeps its input."
    )
    context_parallel_size: int = Field(
        default=1, ge=1, description="Under torchrun: each row split across this many ranks (consecutive ones), "
        "each computing its share of every layer (KDA states passed rank to rank, MLA latents all-gathered; the "
        "result is the same); the world size must be a multiple of it, and the other ranks' factor deals out the "
        "batches. Rows are padded to a multiple of it. 1: no split."
    )
    kda_keep_intermediates: bool = Field(
        default=False, description="On a GPU, fla's KDA kernels keep their chunk states and WY factors for the "
        "backward instead of recomputing them: faster, for 18 bytes per token and KDA channel in each KDA layer not "
        "recomputed (benchmarks/RESULTS.md has the 48B's figures). `kimitune plan` counts it."
    )
    router_aux_loss_coef: float = Field(default=0.0, ge=0.0, description="MoE load-balancing loss weight.")
    max_bad_steps: int = Field(default=5, gt=0, description="Non-finite steps in a row before the run stops.")

    # --- several GPUs (torchrun; kimitune.train.distributed) --------------------------------------------
    fsdp_version: int | None = Field(default=None, description="2 (FSDP2, the only kind); optional.")
    fsdp_config: FsdpConfig | None = Field(
        default=None, description="FSDP2 options under torchrun (the fsdp_config. keys); no effect without torchrun."
    )

    # --- evaluation, checkpoints, logging --------------------------------------------------------------
    eval_steps: int | None = Field(default=None, gt=0, description="Evaluate every this many steps (and at the "
                                   "end); unset with no evals_per_epoch: once, at the end.")
    evals_per_epoch: int | None = Field(default=None, gt=0, description="Evaluations per epoch (instead of "
                                        "eval_steps).")
    save_steps: int | None = Field(default=None, gt=0, description="Write a resumable checkpoint-N every this "
                                   "many steps; unset with no saves_per_epoch: none.")
    saves_per_epoch: int | None = Field(default=None, gt=0, description="Checkpoints per epoch (instead of "
                                        "save_steps).")
    save_total_limit: int | None = Field(default=None, gt=0, description="Keep only the newest this many "
                                         "checkpoints.")
    logging_steps: int = Field(default=1, gt=0, description="Log loss, lr, grad norm and tokens/s every this many "
                               "steps.")
    output_dir: str = Field(
        default="./outputs", description="Folder of the run: metrics.jsonl, checkpoints, the final model or adapter. "
        "One run at a time; one that holds a run is refused unless resumed or overwrite_output_dir."
    )
    overwrite_output_dir: bool = Field(
        default=False, description="Start over in an output_dir that holds a run: its metrics, checkpoints and "
        "saved model are deleted first (other files stay)."
    )
    resume_from_checkpoint: str | bool | None = Field(
        default=None, description="true: continue from the latest checkpoint in output_dir (start afresh when it "
        "has none and holds no run); a path: from that checkpoint."
    )
    # Experiment trackers, with Axolotl's keys (kimitune.train.metrics): W&B is on when wandb_project is set (unless
    # use_wandb: false), MLflow when use_mlflow or mlflow_experiment_name is set, TensorBoard with use_tensorboard.
    use_tensorboard: bool = Field(default=False, description="Write <output_dir>/tensorboard event files.")
    use_wandb: bool | None = Field(default=None, description="false turns W&B off even with wandb_project set.")
    wandb_project: str | None = Field(default=None, description="Log to this W&B project (needs wandb).")
    wandb_entity: str | None = Field(default=None, description="W&B team or user.")
    wandb_name: str | None = Field(default=None, description="W&B run name.")
    wandb_run_id: str | None = Field(default=None, description="W&B run id (resumes that run when it exists).")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(default=None, description="W&B's mode "
                                                                        "(W&B's default when unset).")
    use_mlflow: bool = Field(default=False, description="Log to MLflow (needs mlflow).")
    mlflow_tracking_uri: str | None = Field(default=None, description="MLflow server or folder (MLflow's default "
                                            "when unset).")
    mlflow_experiment_name: str | None = Field(default=None, description="MLflow experiment; setting it turns "
                                               "MLflow on.")
    mlflow_run_name: str | None = Field(default=None, description="MLflow run name.")
    plugins: list[str] = Field(
        default_factory=list, description="Axolotl plugins; the cut-cross-entropy one is built in, Liger's has no "
        "effect, others are refused."
    )

    @model_validator(mode="before")
    @classmethod
    def _gradient_checkpointing_offload(cls, raw: Any) -> Any:
        """Axolotl's ``gradient_checkpointing: offload``: recomputed layers whose saved inputs wait on the host."""
        if isinstance(raw, dict) and raw.get("gradient_checkpointing") == "offload":
            if raw.get("activation_offloading") is False:
                raise ValueError("gradient_checkpointing: offload offloads activations; activation_offloading: false "
                                 "says not to")
            raw = {**raw, "gradient_checkpointing": True, "activation_offloading": True}
        return raw

    @model_validator(mode="before")
    @classmethod
    def _rl_not_yet(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("rl") in ("grpo", "ppo"):
            raise ValueError(f"rl: {raw['rl']} is not supported yet (dpo, ipo, orpo, simpo and kto are)")
        return raw

    @model_validator(mode="after")
    def _check_consistency(self) -> TrainConfig:
        if (self.base_model is None) == (self.init_from_config is None):
            raise ValueError("set exactly one of base_model (a checkpoint) or init_from_config (random weights)")
        chosen = [key for key in ("load_in_8bit", "load_in_4bit", "load_in_fp8") if getattr(self, key)]
        if len(chosen) > 1:
            raise ValueError(f"{' and '.join(chosen)} are exclusive")
        if self.adapter == "qlora" and not self.load_in_4bit:
            raise ValueError("adapter: qlora is LoRA on a 4-bit base: set load_in_4bit: true (for an 8-bit base use "
                             "adapter: lora with load_in_8bit: true)")
        if self.quantizes_weights and self.adapter is None:
            raise ValueError("quantised weights are frozen, so full fine-tuning (adapter unset) cannot train them: "
                             f"set adapter: lora / qlora, or drop {chosen[0]}")
        if self.quantizes_weights and self.fsdp_config is not None and self.fsdp_config.offload_params:
            raise ValueError(f"fsdp_config.offload_params moves FSDP2's shards to the CPU, and {chosen[0]} weights are "
                             "not sharded (every GPU holds all of them): it would offload only the LoRA weights. "
                             "Set offload_params: false, or drop the quantisation to shard bf16 weights")
        bnb_keys = sorted(k for k in self.model_fields_set if k.startswith("bnb_4bit_"))
        if bnb_keys and not self.load_in_4bit:
            raise ValueError(f"{', '.join(bnb_keys)} only apply with load_in_4bit: true")
        ce_keys = sorted(k for k in self.model_fields_set if k.startswith("ce_lora_"))
        if ce_keys and self.adapter != "ce_lora":
            raise ValueError(f"{', '.join(ce_keys)} only apply with adapter: ce_lora (adapter is {self.adapter})")
        sparsities = self.ce_lora_sparsity if isinstance(self.ce_lora_sparsity, dict) else {None: self.ce_lora_sparsity}
        for name, value in sparsities.items():
            if not 0.0 <= value < 1.0:
                key = "ce_lora_sparsity" if name is None else f"ce_lora_sparsity[{name!r}]"
                raise ValueError(f"{key} must be in [0, 1), got {value}")
        if self.gradient_checkpointing_layers is not None and not self.recomputes_layers(sharded=True):
            raise ValueError("gradient_checkpointing_layers only applies with gradient_checkpointing: true (or "
                             "fsdp_config.activation_checkpointing: true)")
        if self.sequence_piece_len is not None and not self.recomputes_layers(sharded=True):
            raise ValueError("sequence_piece_len only applies with gradient_checkpointing: true (or "
                             "fsdp_config.activation_checkpointing: true): the pieces are what recomputes")
        if self.recompute_segment_layers > 1 and (not self.recomputes_layers(sharded=True)
                                                  or self.gradient_checkpointing_layers is not None):
            raise ValueError("recompute_segment_layers needs every decoder layer recomputed: gradient_checkpointing: "
                             "true (or fsdp_config.activation_checkpointing: true) without gradient_checkpointing_layers")
        sft_only = [d.type for d in self.datasets + self.test_datasets if d.type != "chat_template"]
        if self.rl is None and sft_only:
            raise ValueError(f"dataset type {sft_only[0]} is a preference format: set rl (dpo, ipo, orpo, simpo or "
                             "kto), "
                             "or use type: chat_template to fine-tune")
        rl_keys = sorted(k for k in ("rl_beta", "orpo_alpha", "simpo_gamma", "cpo_alpha", "rl_label_smoothing")
                         if getattr(self, k) != type(self).model_fields[k].default)
        if rl_keys and self.rl is None:
            raise ValueError(f"{', '.join(rl_keys)} only apply with rl set")
        kto_keys = sorted(k for k in ("kto_desirable_weight", "kto_undesirable_weight")
                          if getattr(self, k) != type(self).model_fields[k].default)
        if kto_keys and self.rl != "kto":
            raise ValueError(f"{', '.join(kto_keys)} only apply with rl: kto (rl is {self.rl})")
        if self.rl_shared_prompt and self.rl not in ("dpo", "ipo", "simpo"):
            raise ValueError(f"rl_shared_prompt shares a pair's prompt between its replies: rl dpo, ipo or simpo "
                             f"(ORPO's NLL counts the prompt of the chosen sequence, KTO has no pairs; rl is {self.rl})")
        if self.rl_shared_prompt and (self.context_parallel_size > 1 or self.sequence_piece_len is not None or
                                      self.recompute_segment_layers > 1):
            raise ValueError("rl_shared_prompt does not work with context_parallel_size > 1, sequence_piece_len or "
                             "recompute_segment_layers yet: it runs whole rows")
        if self.rl is not None and not self.sample_packing:
            raise ValueError("preference tuning packs each pair's two sequences into one row: set sample_packing: "
                             "true")
        if self.context_parallel_size > 1:
            together = [key for key, used in (("sequence_piece_len", self.sequence_piece_len is not None),
                                              ("recompute_segment_layers", self.recompute_segment_layers > 1)) if used]
            if together:
                raise ValueError(f"context_parallel_size > 1 does not work with {', '.join(together)} yet: a row split "
                                 "across ranks is fine-tuned with whole layers on each rank")
        if self.tiled_mlp_num_shards is not None and not self.tiled_mlp:
            raise ValueError("tiled_mlp_num_shards only applies with tiled_mlp: true")
        if self.fsdp_version not in (None, 2):
            raise ValueError(f"fsdp_version: kimitune shards with FSDP2 only: set 2 (got {self.fsdp_version})")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        if self.eval_steps is not None and self.evals_per_epoch is not None:
            raise ValueError("set eval_steps or evals_per_epoch, not both")
        if self.save_steps is not None and self.saves_per_epoch is not None:
            raise ValueError("set save_steps or saves_per_epoch, not both")
        return self

    @property
    def quantizes_weights(self) -> bool:
        """Whether the frozen weights are stored quantised (load_in_8bit, load_in_4bit or load_in_fp8)."""
        return self.load_in_8bit or self.load_in_4bit or self.load_in_fp8

    def recomputes_layers(self, sharded: bool) -> bool:
        """Whether the run recomputes decoder layers in the backward (``gradient_checkpointing_layers`` of them, or
        all): ``gradient_checkpointing``, or when the model is sharded with FSDP2 (under torchrun)
        ``fsdp_config.activation_checkpointing``."""
        fsdp = sharded and self.fsdp_config is not None and self.fsdp_config.activation_checkpointing
        return self.gradient_checkpointing or fsdp

    @property
    def tokenizer_path(self) -> str:
        """The tokenizer to load: ``tokenizer`` if set, else ``base_model``."""
        if self.tokenizer is not None:
            return self.tokenizer
        if self.base_model is None:
            raise ConfigError("init_from_config needs a `tokenizer:` (the model folder has none)")
        return self.base_model


# Axolotl keys that kimitune accepts but that change nothing here, with the reason given in the warning.
INERT_KEYS: dict[str, str] = {
    "tiled_mlp_use_original_mlp": "kimitune tiles the model's own MLP and MoE",
    "strict": "kimitune always loads strictly and names any mismatched tensor",
    "hub_model_id": "kimitune does not upload; push output_dir yourself",
    "hub_strategy": "kimitune does not upload",
    "lora_fan_in_fan_out": "Kimi Linear has no Conv1D-style layers",
    "flash_attention": "MLA attention uses PyTorch SDPA (flash kernels on GPU) already",
    "sdp_attention": "MLA attention uses PyTorch SDPA already",
    "xformers_attention": "MLA attention uses PyTorch SDPA",
    "group_by_length": "packing already groups samples",
    "early_stopping_patience": "not implemented; watch eval_loss in metrics.jsonl",
    "local_rank": "set by torchrun",
    "debug": "no debug mode",
    "deepspeed": "kimitune uses FSDP2 through torchrun, not DeepSpeed",
    "fsdp": "run under torchrun to shard with FSDP2; fsdp_config sets its options",
    "special_tokens": "the tokenizer's own special tokens are used",
    "tokens": "the tokenizer's own vocabulary is used",
    "wandb_watch": "gradients are not streamed to W&B",
    "wandb_log_model": "checkpoints are not uploaded to W&B",
    "hf_mlflow_log_artifacts": "checkpoints are not uploaded to MLflow",
    "loss_watchdog_threshold": "kimitune stops on non-finite steps instead (max_bad_steps)",
    "loss_watchdog_patience": "kimitune stops on non-finite steps instead (max_bad_steps)",
    "logging_first_step": "every logging_steps step is logged",
    "eval_sample_packing": "evaluation uses the same packing as training",
    "dataset_processes": "tokenisation runs in-process",
    "model_type": "the model type is read from the checkpoint's config.json",
    "tokenizer_type": "the tokenizer class is read from the tokenizer files",
    "is_preprocess": "use `kimitune preprocess`",
    "torch_compile": "kimitune compiles nothing: its hand-written kernels were measured against torch.compile "
                     "(benchmarks/RESULTS.md)",
    "auto_resume_from_checkpoints": "set resume_from_checkpoint: true",
    "eval_table_size": "no eval table",
    "gradient_checkpointing_kwargs": "kimitune checkpoints whole decoder layers",
    "cut_cross_entropy": "training never materialises the logits: kimitune's fused cross-entropy is always on",
    "unfrozen_parameters": "use adapter: null for full fine-tuning",
    "lr_quadratic_warmup": "warmup is linear",
    "lora_modules_to_save": "embeddings and head stay frozen under an adapter",
    "rl_adapter_ref_model": "the reference is the model as training starts (a new adapter adds nothing), "
                            "computed once before the first step: no second model is loaded",
    "precompute_ref_log_probs": "the reference log-probabilities are always computed once, before the first step",
    "remove_unused_columns": "rows are read by their fields; other columns are ignored",
}

# Plugins from Axolotl configs: True when kimitune always does what the plugin does (accepted silently), False when
# it has no effect here (accepted with a warning).
KNOWN_PLUGINS: dict[str, bool] = {
    "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin": True,  # the loss never builds the logits
    "axolotl.integrations.liger.LigerPlugin": False,
}


def _closest_key(key: str, known: list[str]) -> str:
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f"; did you mean `{match[0]}`?" if match else ""


def _check_keys(raw: dict[str, Any], model: type[BaseModel], where: str, inert: dict[str, str]) -> None:
    known = list(model.model_fields)
    for key in raw:
        if key not in model.model_fields and key not in inert:
            raise ConfigError(f"{where}: unknown key `{key}`{_closest_key(key, known + list(inert))}")


def parse_config(raw: dict[str, Any], source: str = "config") -> tuple[TrainConfig, list[str]]:
    """Validates a raw mapping; returns the config and one warning for each set key that has no effect.

    Raises ``ConfigError`` naming the key (and the closest known key for typos) on any problem.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(raw).__name__}")
    _check_keys(raw, TrainConfig, source, INERT_KEYS)
    if isinstance(raw.get("fsdp_config"), dict):  # Axolotl's older spelling prefixes every key with fsdp_
        fsdp = {key.removeprefix("fsdp_"): value for key, value in raw["fsdp_config"].items()}
        _check_keys(fsdp, FsdpConfig, f"{source}: fsdp_config", FSDP_INERT_KEYS)
        fsdp_warnings = [f"`fsdp_config.{key}` has no effect in kimitune: {FSDP_INERT_KEYS[key]}"
                          for key in fsdp if key in FSDP_INERT_KEYS and fsdp[key] not in (None, False, [], "")]
        raw = raw | {"fsdp_config": {k: v for k, v in fsdp.items() if k not in FSDP_INERT_KEYS}}
    else:
        fsdp_warnings = []
    for field in ("datasets", "test_datasets"):
        for i, entry in enumerate(raw.get(field) or []):
            if not isinstance(entry, dict):
                raise ConfigError(f"{source}: {field}[{i}] must be a mapping with at least `path`")
            _check_keys(entry, DatasetConfig, f"{source}: {field}[{i}]", {})
    warnings = fsdp_warnings + [
        f"`{key}` has no effect in kimitune: {reason}"
        for key, reason in INERT_KEYS.items()
        if raw.get(key) not in (None, False, [], {}, "")
    ]
    if raw.get("fp16"):
        warnings.append("`fp16: true` has no effect in kimitune: it trains in bf16 on GPUs that have it (`bf16`), "
                        "else in float32")
    values = {k: v for k, v in raw.items() if k not in INERT_KEYS and v is not None}
    for plugin in values.get("plugins") or []:
        built_in = KNOWN_PLUGINS.get(plugin)
        if built_in is None:
            raise ConfigError(f"{source}: unknown plugin `{plugin}`; known: {', '.join(KNOWN_PLUGINS)}")
        if not built_in:
            warnings.append(f"plugin `{plugin}` has no effect in kimitune: its fused kernels are built in")
    try:
        config = TrainConfig(**values)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None
    return config, warnings


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Returns ``raw`` with command-line overrides (``--learning-rate 1e-4`` -> ``learning_rate``) applied."""
    merged = dict(raw)
    for key, value in overrides.items():
        merged[key.replace("-", "_")] = value
    return merged


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[TrainConfig, list[str]]:
    """Reads a YAML file, applies overrides and validates; relative paths inside stay relative to the cwd."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_config(apply_overrides(raw, overrides or {}), source=str(path))
