#!/usr/bin/env bash
# One call for issues 22, 24 and 26 on one GPU: the GPU tests of the 8-bit kernels and of context parallelism at
# N = 1, the 48B with fp8 weights (capped at 80 GiB), the 4-layer fp8 / int8 rows against bf16, the 200-step loss
# check, DPO in pieces. Each stage under its own timeout, logs in $OUT. The tests try one autotune config per kernel
# (one_config/): a fresh machine otherwise spends minutes autotuning fla's kernels at the tests' shapes.
. scripts/device/setup.sh
stage() { local name=$1 limit=$2; shift 2; echo "== $name ($(date +%T))"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc $?"; tail -${TAIL:-25} "$OUT/$name.log"; }
PYTHONPATH=$PWD/scripts/device/one_config:$PYTHONPATH TAIL=12 stage gpu_tests 120 python -m pytest -q -p no:cacheprovider -m gpu -rfE tests/ops/test_quant_grouped_mm.py \
    tests/ops/test_fp8_rows.py tests/quant/test_fp8.py tests/quant/test_quant_gpu.py tests/model/test_context_parallel.py \
    tests/ops/test_kda_fla_dispatch.py
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TAIL=6 stage fp8_48b 140 python benchmarks/train_48b.py --bits 8 --fp8 \
    --seq 8192 --cap-gib 80 --ckpt-layers 27 --warmup 1 --steps 3 --json $OUT/fp8_48b.json
TAIL=12 stage quant_4layer 90 python benchmarks/train_gpu.py --rows kimitune,kimitune+fp8,kimitune+int8 \
    --seq 16384 --ckpt on --warmup 1 --steps 3 --json $OUT/quant_4layer.json
TAIL=20 stage fp8_loss 110 python benchmarks/fp8_loss.py --json $OUT/fp8_loss.json
TAIL=8 stage dpo_piece 50 python benchmarks/dpo_gpu.py --tools kimitune --pairs 8 --prompt 1024 --reply 512 \
    --piece 2048 --ckpt on --warmup 2 --steps 4 --json $OUT/dpo_piece.json
