#!/usr/bin/env bash
# Issue 24's GPU figures in one call: the GPU tests of the 8-bit kernels, the grouped FP8 product variants, the
# 48B with fp8 weights (capped at 80 GiB) and int8, the 4-layer fp8 / int8 rows against bf16, the 200-step loss
# check. Each stage under its own timeout, logs in $OUT.
. scripts/device/setup.sh
stage() { local name=$1 limit=$2; shift 2; echo "== $name ($(date +%T))"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc $?"; tail -${TAIL:-25} "$OUT/$name.log"; }
TAIL=8 stage gpu_tests 80 python -m pytest -q -p no:cacheprovider -m gpu -rfE tests/ops/test_quant_grouped_mm.py \
    tests/ops/test_fp8_rows.py tests/quant/test_fp8.py tests/quant/test_quant_gpu.py tests/model/test_context_parallel.py
TAIL=16 stage fp8_grouped 60 python benchmarks/fp8_grouped.py --tokens 8192 --repeats 10 --json $OUT/fp8_grouped.json
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TAIL=6 stage fp8_48b 110 python benchmarks/train_48b.py --bits 8 --fp8 \
    --seq 8192 --cap-gib 80 --ckpt-layers 14,27 --warmup 1 --steps 3 --json $OUT/fp8_48b.json
TAIL=16 stage quant_4layer 110 python benchmarks/train_gpu.py --rows kimitune,kimitune+fp8,kimitune+int8 \
    --seq 4096,16384 --ckpt off,on --warmup 1 --steps 3 --json $OUT/quant_4layer.json
TAIL=20 stage fp8_loss 130 python benchmarks/fp8_loss.py --json $OUT/fp8_loss.json
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TAIL=4 stage int8_48b 60 python benchmarks/train_48b.py --bits 8 \
    --seq 8192 --ckpt-layers 27 --warmup 1 --steps 2 --json $OUT/int8_48b.json
