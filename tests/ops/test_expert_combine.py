"""kimitune.ops.expert_combine: the PyTorch reference against the formula, and the Triton kernel against the
reference (under Triton's CPU interpreter here, compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import interpreted, run_interpreted

from kimitune.ops.expert_combine import sum_token_copies, sum_token_copies_reference, sum_token_copies_triton
from kimitune.ops.permute import inverse_permutation


def case(tokens=5, k=3, width=37, num_experts=4, dtype=torch.float32, device="cpu", seed=0):
    """rows [tokens * k, width] sorted by expert, inverse [tokens * k]."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.randint(0, num_experts, (tokens * k,), generator=gen), stable=True)
    rows = torch.randn(tokens * k, width, generator=gen).to(dtype)
    return rows.to(device), inverse_permutation(order).to(device), k


def test_reference_sums_each_tokens_copies():
    rows, inverse, k = case(dtype=torch.float64)
    y = sum_token_copies_reference(rows, inverse, k)
    for n in range(y.shape[0]):
        # Copy n * k + j sits at row inverse[n * k + j] of the expert-sorted rows.
        torch.testing.assert_close(y[n], sum(rows[inverse[n * k + j]] for j in range(k)))


def test_reference_sums_bf16_in_float32_and_rounds_once():
    rows, inverse, k = case(tokens=2, k=8, width=3)
    rows = torch.full_like(rows, 1.0 / 3).to(torch.bfloat16)
    expected = torch.full((k,), 1.0 / 3, dtype=torch.bfloat16).float().sum().to(torch.bfloat16)
    assert torch.equal(sum_token_copies_reference(rows, inverse, k), torch.full((2, 3), expected.item(),
                                                                               dtype=torch.bfloat16))


def test_cpu_tensors_take_the_reference():
    rows, inverse, k = case()
    assert torch.equal(sum_token_copies(rows, inverse, k), sum_token_copies_reference(rows, inverse, k))


def test_rows_that_are_not_k_copies_are_refused():
    rows, inverse, _ = case(tokens=5, k=3)
    with pytest.raises(ValueError, match="not k = 4 copies"):
        sum_token_copies_triton(rows, inverse, 4)


def test_kernels_in_the_interpreter():
    run_interpreted(__file__)


def assert_kernel_matches_reference(rows, inverse, k):
    tol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2)}[rows.dtype]
    torch.testing.assert_close(sum_token_copies_triton(rows, inverse, k), sum_token_copies_reference(rows, inverse, k),
                               rtol=tol[0], atol=tol[1])


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k, width", [(3, 37), (8, 1000), (1, 16)])
def test_interpreted_kernel_matches_reference(dtype, k, width):
    assert_kernel_matches_reference(*case(k=k, width=width, dtype=dtype))


@interpreted
def test_interpreted_kernel_with_no_tokens():
    rows, inverse, k = case(tokens=0)
    assert sum_token_copies_triton(rows, inverse, k).shape == (0, 37)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_matches_reference_on_cuda():
    assert_kernel_matches_reference(*case(tokens=512, k=8, width=2304, num_experts=256, dtype=torch.bfloat16,
                                          device="cuda"))
