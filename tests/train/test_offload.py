"""Activation offloading (kimitune/train/offload.py): the same step, the saved tensors on the host until the
backward. On the CPU the hooks leave every tensor where it is; on a GPU the step's results are the same bits and its
peak is lower (GPU part below)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from test_step import lora_model, packed_batch  # noqa: E402

from kimitune.model import RunOptions  # noqa: E402
from kimitune.train.offload import HostOffload  # noqa: E402
from kimitune.train.step import TrainStep  # noqa: E402


def step_results(device: str, offload: bool, dtype=torch.float32):
    model = lora_model(device=device, dtype=dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    options = RunOptions(recompute_layers=model.recomputed_layers(), sequence_piece_len=8)
    step = TrainStep(model, optimizer, device, options=options, offload_activations=offload)
    batch = packed_batch(0)
    losses = [step([batch], batch.num_label_tokens).loss.item() for _ in range(2)]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_offloading_changes_nothing_on_the_cpu():
    plain, offloaded = step_results("cpu", False), step_results("cpu", True)
    assert plain[0] == offloaded[0]
    assert all(torch.equal(plain[1][n], offloaded[1][n]) for n in plain[1])


def test_cpu_tensors_and_small_tensors_stay_where_they_are():
    hooks = HostOffload(min_bytes=1 << 20)
    tensor = torch.ones(4)
    assert hooks._pack(tensor) is tensor and hooks._unpack(tensor) is tensor


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and fla-core)")
def test_offloaded_steps_equal_the_plain_ones_and_hold_less_on_the_gpu():
    plain, offloaded = step_results("cuda", False, torch.bfloat16), step_results("cuda", True, torch.bfloat16)
    assert plain[0] == offloaded[0]
    assert all(torch.equal(plain[1][n], offloaded[1][n]) for n in plain[1])
    x = torch.randn(4096, 4096, device="cuda", requires_grad=True)
    for offload in (False, True):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        with HostOffload() if offload else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            y = x
            for _ in range(8):
                y = torch.sin(y)  # saves its 64 MiB input each time
        torch.cuda.synchronize()
        torch.empty(1, device="cuda")  # the allocator frees blocks whose side-stream copies are done on a malloc
        held = torch.cuda.memory_allocated() - start
        y.sum().backward()
        if offload:
            assert held < 3 * 64 * 2**20, held  # the last output and copies in flight, not 8 saved inputs
        else:
            assert held >= 8 * 64 * 2**20, held


def test_what_offloading_moves_is_every_recomputed_layers_input():
    """torch.utils.checkpoint saves a recomputed region's inputs through the saved-tensor hooks (and nothing of what
    it computes inside), so the hooks see every piece of every layer's input: what the offload moves to the host."""
    from kimitune import KimiLinearForCausalLM
    from model_helpers import micro_config

    torch.manual_seed(0)
    model = KimiLinearForCausalLM(micro_config())
    ids = torch.randint(0, 250, (1, 30))
    seen = []

    def pack(tensor):
        seen.append(tuple(tensor.shape))
        return tensor

    options = RunOptions(recompute_layers=model.recomputed_layers(), sequence_piece_len=8)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids, return_logits=False, options=options).loss.backward()
    hidden = model.config.hidden_size
    pieces = [(1, n, hidden) for n in (8, 8, 8, 6)]
    for shape in pieces:
        assert seen.count(shape) >= model.config.num_hidden_layers, (shape, seen)
