"""Training on several processes: FSDP2 (``torch.distributed.fsdp.fully_shard``) under torchrun.

``torchrun --nproc_per_node N -m kimitune train CONFIG`` starts N copies of the ordinary trainer; torchrun's
environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT; across nodes its rendezvous) tells each one who it is.
Without that environment nothing here does anything: ``World()`` is one process of rank 0, every collective is the
identity, and the trainer runs exactly as it always has.

- Process group: ``init_from_env`` starts it (nccl with device ``cuda:LOCAL_RANK`` on GPUs, gloo on the CPU) and
  sets ``NCCL_NVLS_ENABLE=0`` unless the environment already says otherwise (NVLink multicast buffers cost memory
  and are refused on some shared machines).
- Building: only rank 0 reads or draws the weights, on its CPU; the other ranks build the same modules on the
  meta device, and after sharding ``fill_from_rank0`` sends each rank its slices (torchtune's way), so no GPU
  holds the whole model. Quantised weights and CE-LoRA compute buffers from the weights while the model is built:
  with them every rank builds the whole model on its device and shards it (``setup.builds_on_meta``).
- Wrapping: ``shard_model`` calls ``fully_shard`` on every decoder layer, then on the whole model (embedding, final
  norm, LM head). Each layer's weights, frozen or not, are sharded on dim 0 (stacked MoE experts ``[E, ...]``
  included), and so are their gradients and the optimizer state. FSDP2 all-gathers tensors of mixed dtypes (bf16
  frozen weights beside float32 LoRA) through a byte buffer; it needs one dtype among the *trainable* parameters of
  a layer, which LoRA (all float32) and full fine-tuning (all one dtype) satisfy. On a GPU with bf16, compute runs
  in bf16 (``MixedPrecisionPolicy(param_dtype=bf16)``) and gradients are reduced in float32.
- Loss: the trainer divides every rank's summed token losses by the label tokens of the whole global batch, so the
  gradient it wants is the plain SUM of the ranks' gradients. ``shard_model`` therefore sets FSDP's gradient
  divide factor to 1 (FSDP would otherwise average over ranks).
- Data (in the trainer): every rank walks the same global micro-batch stream; rank r takes micro-batches r, r + N,
  r + 2N, ... of each step's ``gradient_accumulation_steps * N``. The stream position (epoch, index) is therefore
  the same on every rank and does not depend on N, which is what lets a checkpoint resume on another world size.
- Context parallelism (``context_parallel_size: C``): the ranks form a 2-D mesh (data N / C, context C; consecutive
  ranks share a row). The data ranks deal out the batches as above (every rank of a context group takes the same
  micro-batches) and each context group splits each row (model/context_parallel.py). FSDP2 shards over the data
  dimension: the ranks of a context group hold the same shards, and their gradients are summed over the group
  after the backward (``sum_over_context``). Sharding over the context dimension too would put FSDP's per-layer
  collectives, which need every rank at the same layer, between the row's rank-to-rank state passing, which runs
  the ranks one after another: a deadlock; along the data dimension every FSDP collective joins ranks at the same
  place in the row. Losses and gradients are sums over every rank, as without it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class World:
    """This process's place among the training processes (one process of rank 0 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    device: torch.device | None = None
    started_group: bool = False  # this World started the process group (and shuts it down)
    context_parallel: int = 1  # consecutive ranks that split each row (split_rows)
    context_group: Any = None  # their process group, None without a split
    mesh: Any = None  # the (data, context) DeviceMesh, None without a split

    @property
    def data_rank(self) -> int:
        """This rank's place among the ranks that take different batches."""
        return self.rank // self.context_parallel

    @property
    def data_size(self) -> int:
        """How many ranks take different batches."""
        return self.size // self.context_parallel

    def split_rows(self, context_parallel: int) -> None:
        """Groups every ``context_parallel`` consecutive ranks to split each row (a 2-D device mesh: data, context);
        a ValueError names a world size that is not a multiple of it."""
        if context_parallel == 1:
            return
        if self.size % context_parallel:
            raise ValueError(f"context_parallel_size: {context_parallel} does not divide the {self.size} ranks "
                             f"torchrun started: start a multiple of {context_parallel}")
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(self.device.type, (self.size // context_parallel, context_parallel),
                                     mesh_dim_names=("data", "context"))
        self.context_parallel, self.context_group = context_parallel, self.mesh["context"].get_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, *values: torch.Tensor | float) -> list[float]:
        """Sums of each value over all ranks (float64), as Python floats."""
        device = self.device if (self.device is not None and self.distributed) else torch.device("cpu")
        buffer = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device).reshape(()) for v in values])
        if self.distributed:
            dist.all_reduce(buffer)
        return buffer.tolist()

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over all ranks, in place on its device (queued: the host does not wait)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shutdown(self) -> None:
        if self.started_group and self.distributed:
            dist.destroy_process_group()
            self.started_group = False


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device_type: str = "cuda") -> World:
    """The World torchrun's environment describes, with the process group started; ``World()`` without torchrun.

    ``device_type`` is what the run computes on (``setup.pick_device``): "cuda" gives nccl on ``cuda:LOCAL_RANK``
    (made the current device, so ``torch.device("cuda")`` means it), "cpu" gives gloo.
    """
    if not launched_by_torchrun():
        return World()
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        started = True
    return World(rank=rank, local_rank=local_rank, size=size, device=device, started_group=started)


def is_main_process() -> bool:
    """Rank 0, or a process without a process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, world: World, *, bf16: bool, offload_params: bool = False,
                pin_memory: bool = True, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` on each decoder layer and on the whole model; returns the model (now an FSDPModule)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    # With rows split, the data ranks of this rank's context column (see the module docstring)
    mesh = world.mesh["data"] if world.mesh is not None else init_device_mesh(world.device.type, (world.size,))
    settings = dict(
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16 else MixedPrecisionPolicy(),
        offload_policy=CPUOffloadPolicy(pin_memory=pin_memory) if offload_params else OffloadPolicy(),
    )
    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **settings)
    # The root keeps its weights (lm_head, final norm) gathered after forward: its output is a dataclass, inside which
    # FSDP2 finds no tensor to hook a re-gather on before their backward (resharding it read freed memory on GPUs).
    fully_shard(model, **settings)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # the loss is already normalised over the global batch
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM(1))
    return model


def fill_from_rank0(model: nn.Module, full_state: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    """After ``shard_model``: every rank's shards (and buffers) from rank 0's whole state dict; a collective.

    Ranks > 0 built the model on the meta device (no weights anywhere), so their shards are allocated here on
    ``device``; rank 0 built it on its CPU and passes its state dict, taken before sharding. Each whole tensor is
    broadcast from rank 0 and every rank keeps its slice, so no GPU ever holds more than one whole tensor beyond
    its shards, and only rank 0's host holds the whole model.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state if full_state is not None else {}, options=options)


def full_state_dict(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
    """A sharded model's whole state dict (or its trainable part) on rank 0's CPU ({} on other ranks); a
    collective. None for an unsharded model: use the model's own tensors."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` that also takes sharded (DTensor) gradients; returns the global norm, a plain tensor."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


SUM_BUCKET_ELEMENTS = 1 << 26  # 256 MB of float32 gradients per all-reduce


def sum_over_context(params: list[nn.Parameter], world: World) -> None:
    """Each gradient (its local shard) summed over this rank's context group, in place; nothing without one. The
    gradients go in buckets of one dtype and up to ``SUM_BUCKET_ELEMENTS`` (one collective each, as DDP's)."""
    if world.context_group is None:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    from torch.distributed.tensor import DTensor

    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
    buckets: dict[torch.dtype, list[list[torch.Tensor]]] = {}
    for grad in grads:
        same = buckets.setdefault(grad.dtype, [[]])
        if same[-1] and sum(g.numel() for g in same[-1]) + grad.numel() > SUM_BUCKET_ELEMENTS:
            same.append([])
        same[-1].append(grad)
    for bucket in (b for runs in buckets.values() for b in runs):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=world.context_group)
        for grad, summed in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            grad.copy_(summed)


def shard_of(items: list, world: World) -> list:
    """This rank's items: every ``world.data_size``-th one from ``world.data_rank`` (the ranks of a context group
    take the same ones)."""
    return items[world.data_rank::world.data_size]


def forward_passes_per_rank(count: int, world: World) -> int:
    """The most items ``shard_of`` gives any rank: FSDP needs every rank to run as many forward passes."""
    return math.ceil(count / world.data_size)
