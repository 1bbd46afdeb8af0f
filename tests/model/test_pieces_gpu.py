"""On a CUDA GPU with fla-core: layers in pieces (model/pieces.py), and feed-forward blocks in shards of tokens
(model/tiled_mlp.py), against whole layers in bf16 (fla's KDA with
carried states, MLA over the earlier pieces block by block: kimitune.ops.prefix_attention, whose own GPU test is in
tests/ops/test_prefix_attention.py).

Run on the device: python -m pytest -q tests/model/test_pieces_gpu.py -m gpu
"""

from __future__ import annotations

import pytest
import torch

from kimitune import KimiLinearForCausalLM
from kimitune.model import RunOptions

from model_helpers import micro_config, perturb_

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and fla-core)"),
]


def relative(got, ref):
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("piece, shards", [(128, 1), (None, 3), (128, 2)], ids=["pieces", "tiled", "both"])
def test_pieces_equal_the_whole_layers_in_bf16(packed, piece, shards):
    torch.manual_seed(0)
    config = micro_config(hidden_size=128, kda_num_heads=2, kda_head_dim=64, num_attention_heads=2, head_dim=64,
                          qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, kv_lora_rank=64)
    model = perturb_(KimiLinearForCausalLM(config)).cuda().bfloat16()
    # Every token goes to experts 0 and 1: bf16 rounding that differs at the piece cuts would otherwise flip a few
    # tokens' top-k choices, and each flip moves the router's and the experts' gradients by a whole expert's share
    # (on the H200, 2026-12-03: 0.149 apart for a router weight, 0.090 for an expert stack, the worst of all the
    # gradients). The bias only chooses; the weights still come from the token's scores, so the routers' gradients
    # stay continuous and are held too. The float32 test on the CPU (test_pieces.py) routes freely.
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.zero_()[:2] = 10.0
    if packed:
        bounds = [0, 100, 230, 231, 512, 700]
        input_ids, cu = torch.randint(0, 250, (1, 700), device="cuda"), torch.tensor(bounds, dtype=torch.int32)
    else:
        input_ids, cu = torch.randint(0, 250, (2, 300), device="cuda"), None
    results = []
    for piece_len, mlp_shards in ((None, 1), (piece, shards)):
        model.zero_grad(set_to_none=True)
        options = RunOptions(recompute_layers=model.recomputed_layers(), sequence_piece_len=piece_len,
                             mlp_shards=mlp_shards)
        out = model(input_ids, labels=input_ids, cu_seqlens=cu, return_logits=False, options=options)
        out.loss.backward()
        results.append((out.loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}))
    (loss, grads), (loss_p, grads_p) = results
    assert abs(loss_p - loss).item() <= 1e-2 * loss.abs().item()
    worst = max((relative(grads_p[n], grads[n]), n) for n in grads if grads[n].norm() > 0)
    assert worst[0] < 5e-2, worst
