"""dispatch_rows / combine_rows / permute_rows against plain indexing: the same rows forward, the same gradients
backward."""

import torch

from kimitune.ops.permute import combine_rows, dispatch_rows, inverse_permutation, permute_rows


def routed(num_tokens=37, k=3, num_experts=5, width=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    experts = torch.randint(0, num_experts, (num_tokens * k,), generator=gen)
    order = torch.argsort(experts, stable=True)
    x = torch.randn(num_tokens, width, dtype=torch.float64, generator=gen)
    return x, order, k


def test_inverse_permutation_undoes_the_permutation():
    perm = torch.randperm(50)
    inverse = inverse_permutation(perm)
    assert torch.equal(perm[inverse], torch.arange(50)) and torch.equal(inverse[perm], torch.arange(50))


def test_dispatch_and_permute_match_plain_indexing_forward_and_backward():
    x, order, k = routed()
    inverse = inverse_permutation(order)
    upstream = torch.randn(x.shape[0] * k, x.shape[1], dtype=torch.float64)

    def through(dispatch, back):
        leaf = x.clone().requires_grad_(True)
        copies = dispatch(leaf) * torch.linspace(0.5, 2.0, x.shape[0] * k, dtype=torch.float64)[:, None]
        out = back(copies)
        (out * upstream).sum().backward()
        return out, leaf.grad

    plain_out, plain_grad = through(lambda t: t[order // k],
                                    lambda c: torch.empty_like(c).index_copy_(0, order, c))
    ours_out, ours_grad = through(lambda t: dispatch_rows(t, order, inverse, k),
                                  lambda c: permute_rows(c, inverse, order))
    torch.testing.assert_close(ours_out, plain_out, rtol=0, atol=0)
    torch.testing.assert_close(ours_grad, plain_grad, rtol=1e-12, atol=1e-12)


def test_dispatch_backward_sums_each_tokens_copies_in_float32():
    x, order, k = routed(num_tokens=4, k=8, width=3)
    leaf = x.to(torch.bfloat16).requires_grad_(True)
    inverse = inverse_permutation(order)
    dispatch_rows(leaf, order, inverse, k).backward(torch.full((4 * k, 3), 1.0 / 3, dtype=torch.bfloat16))
    expected = (torch.full((k,), 1.0 / 3, dtype=torch.bfloat16).float().sum()).to(torch.bfloat16)
    assert torch.equal(leaf.grad, torch.full((4, 3), expected.item(), dtype=torch.bfloat16))


def test_combine_sums_each_tokens_copies_and_sends_the_gradient_to_every_copy():
    x, order, k = routed()
    inverse = inverse_permutation(order)
    rows = x[order // k] * torch.linspace(0.5, 2.0, x.shape[0] * k, dtype=torch.float64)[:, None]
    upstream = torch.randn(x.shape[0], x.shape[1], dtype=torch.float64)
    plain, ours = rows.clone().requires_grad_(True), rows.clone().requires_grad_(True)
    # Plain indexing: copy c of the token-ordered copies is row inverse[c] of the expert-sorted ones.
    plain_out = plain[inverse].view(x.shape[0], k, -1).sum(1)
    ours_out = combine_rows(ours, order, inverse, k)
    (plain_out * upstream).sum().backward()
    (ours_out * upstream).sum().backward()
    torch.testing.assert_close(ours_out, plain_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.grad, plain.grad, rtol=0, atol=0)
