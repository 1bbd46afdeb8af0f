#!/usr/bin/env bash
# Installs the carried wheels on the device machine and checks what the GPU code paths rely on.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 - <<'PY'
import torch, triton, transformers, peft
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "peft", peft.__version__)
import fla; print("fla", fla.__version__)
from fla.ops.kda import chunk_kda
from kimitune.ops.kda.naive import recurrent_kda_reference
torch.manual_seed(0)
B,T,H,K,V = 1, 300, 4, 64, 64
dev = "cuda"
q = torch.randn(B,T,H,K, device=dev); k = torch.randn(B,T,H,K, device=dev); v = torch.randn(B,T,H,V, device=dev)
g = -torch.rand(B,T,H,K, device=dev) * 2; beta = torch.rand(B,T,H, device=dev)
o, s = chunk_kda(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta.bfloat16(), use_qk_l2norm_in_kernel=True, output_final_state=True)
o_ref, s_ref = recurrent_kda_reference(q.double(), k.double(), v.double(), g.double(), beta.double(), use_qk_l2norm_in_kernel=True, output_final_state=True)
print("fla vs naive rel err o", ((o.double()-o_ref).norm()/o_ref.norm()).item(), "state", ((s.double()-s_ref).norm()/s_ref.norm()).item())
print("grouped_mm", hasattr(torch, "_grouped_mm"))
try:
    import cut_cross_entropy; from cut_cross_entropy import linear_cross_entropy
    e = torch.randn(64, 128, device=dev, dtype=torch.bfloat16, requires_grad=True); c = torch.randn(1000, 128, device=dev, dtype=torch.bfloat16)
    t = torch.randint(0, 1000, (64,), device=dev)
    print("cce", linear_cross_entropy(e, c, t).item(), torch.nn.functional.cross_entropy((e.float()@c.float().T), t).item())
except Exception as ex: print("cce failed", repr(ex))
try:
    import bitsandbytes as bnb; print("bnb", bnb.__version__)
    l = bnb.nn.Linear4bit(256, 256, bias=False, quant_type="nf4", compute_dtype=torch.bfloat16).cuda(); print("bnb4", l(torch.randn(4,256,device=dev,dtype=torch.bfloat16)).shape)
except Exception as ex: print("bnb failed", repr(ex))
from transformers import KimiLinearForCausalLM; print("transformers kimi ok")
print("pydantic", end=" ");
try:
    import pydantic; print(pydantic.__version__)
except Exception as ex: print("missing")
try:
    import datasets; print("datasets", datasets.__version__)
except Exception as ex: print("datasets missing")
PY
