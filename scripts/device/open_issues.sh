#!/usr/bin/env bash
# The open issues' GPU runs on one GPU, in groups that each fit one call (each stage under its own timeout, logs and
# JSON in $OUT):
#   bash scripts/device/open_issues.sh tests   # ~4 min: GPU tests (8-bit kernels, FP8, context parallelism at N = 1)
#   bash scripts/device/open_issues.sh attention  # ~2 min: MLA's attention in pieces, cuDNN against flash, key layouts
#   bash scripts/device/open_issues.sh quant   # ~10 min: issue 24's expert products, the 48B fp8, the 4-layer rows, the loss
#   bash scripts/device/open_issues.sh long    # ~9 min: issue 21's lengths, bf16 and 8-bit capped at 80 GiB
#   bash scripts/device/open_issues.sh pieces_tests  # ~2 min: the GPU tests of pieces, tiled MLP and shared prompts
#   bash scripts/device/open_issues.sh dpo     # ~4 min: issue 26's DPO whole, shared prompts, tiled MLP, pieces
#   bash scripts/device/open_issues.sh dpo_48b # ~3 min: the whole 48B's DPO (int8, shared prompts)
#   bash scripts/device/open_issues.sh h200    # ~8 min, an H200 (needs_h200): the bf16 48B's DPO and 32,768 and
#                                              # 262,144 tokens in bf16
#   bash scripts/device/open_issues.sh peer_long  # ~5 min, an H200 (needs_h200): the peer's (transformers + PEFT)
#                                                 # longest sequence of the bf16 48B, issue 21's 10x
#   bash scripts/device/open_issues.sh dpo_trl # ~4 min: issue 26's targets: shared prompts and whole pairs beside TRL,
#                                              # 8 pairs of 2048 + 2 x 1024 tokens
# Several groups run one after another in one call: open_issues.sh tests dpo_trl
# A fresh machine compiles and autotunes every Triton kernel in its first process (minutes): each group ends by
# packing the autotuners' choices into $OUT/autotune.tgz; copied to .triton_autotune/ here and carried (carry
# [".whl", ".triton_autotune"]), setup.sh unpacks it, and a later call compiles only what is new.
. scripts/device/setup.sh
# FIRST_CONFIG=1: every Triton autotuner tries its first config only (memory figures, not speed, on a fresh machine)
one_config=$PWD/scripts/device/one_config
# (a stage with one config keeps none of its choices: FLA_CACHE_RESULTS=0)
stage() { local name=$1 limit=$2; shift 2; echo "== $name ($(date +%T))"
    PYTHONPATH=$([ "$FIRST_CONFIG" = 1 ] && echo "$one_config:")$PYTHONPATH \
        FLA_CACHE_RESULTS=$([ "$FIRST_CONFIG" = 1 ] && echo 0 || echo 1) timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?; echo "rc $rc"; tail -${TAIL:-25} "$OUT/$name.log"; return $rc; }
alloc=expandable_segments:True
# kimitune keeps each fla config it tunes as soon as it is tuned (tuned_kernels.keep_as_tuned): a stage stopped by its
# timeout still leaves them; $OUT/tuned.tgz brings them back for `python scripts/ship_tuned.py` (this GPU's folder in
# kimitune/ops/tuned/, so that the next fresh machine of this kind skips the tuning)
export KIMITUNE_CACHE_DIR=/tmp/kt
for group in "$@"; do
case "$group" in
tests)
    FIRST_CONFIG=1 TAIL=30 stage gpu_tests 200 python -m pytest -v -p no:cacheprovider -m gpu -rfEs \
        tests/model/test_context_parallel.py tests/model/test_shared_prompts.py tests/model/test_pieces_gpu.py \
        tests/train/test_step.py tests/ops/test_quant_grouped_mm.py tests/ops/test_fp8_rows.py tests/quant/test_fp8.py \
        tests/ops/test_prefix_attention.py ;;
attention)
    TAIL=10 stage prefix_attention 120 python benchmarks/prefix_attention_gpu.py --piece 16384 --blocks 0,3 \
        --key-layouts model,tokens --json $OUT/prefix_attention.json ;;
quant)
    TAIL=22 stage fp8_grouped 90 python benchmarks/fp8_grouped.py --tokens 8192 --repeats 10 --json $OUT/fp8_grouped.json
    PYTORCH_CUDA_ALLOC_CONF=$alloc TAIL=4 stage fp8_48b 150 python benchmarks/train_48b.py --bits 8 --fp8 --seq 8192 \
        --cap-gib 80 --ckpt-layers 14,27 --warmup 1 --steps 3 --json $OUT/fp8_48b.json
    TAIL=12 stage quant_4layer 170 python benchmarks/train_gpu.py --rows kimitune,kimitune+fp8,kimitune+int8 \
        --seq 4096,16384 --ckpt off,on --warmup 1 --steps 3 --json $OUT/quant_4layer.json
    TAIL=20 stage fp8_loss 150 python benchmarks/fp8_loss.py --json $OUT/fp8_loss.json ;;
long)
    PYTORCH_CUDA_ALLOC_CONF=$alloc TAIL=8 stage long_bf16 300 python benchmarks/train_long.py --bits 16 \
        --seq 32768,131072,262144 --warmup 1 --steps 2 --json $OUT/long_bf16.json
    PYTORCH_CUDA_ALLOC_CONF=$alloc TAIL=8 stage long_int8 230 python benchmarks/train_long.py --bits 8 \
        --seq 131072,262144 --cap-gib 80 --offload --warmup 1 --steps 2 --json $OUT/long_int8.json ;;
pieces_tests)
    FIRST_CONFIG=1 TAIL=12 stage pieces_tests 85 python -m pytest -q -p no:cacheprovider -m gpu -rfEs \
        tests/model/test_pieces_gpu.py tests/model/test_shared_prompts.py ;;
dpo)
    TAIL=8 stage dpo_kimitune 220 python benchmarks/dpo_gpu.py --tools kimitune --pairs 8 --prompt 1024 --reply 512 \
        --kimitune whole,shared,shared+tiled,piece=2048 --ckpt on --warmup 2 --steps 4 --json $OUT/dpo_kimitune.json ;;
dpo_48b)
    PYTORCH_CUDA_ALLOC_CONF=$alloc TAIL=8 stage dpo_48b 125 python benchmarks/dpo_gpu.py --tools kimitune --layers 27 \
        --quant int8 --pairs 8 --prompt 1024 --reply 512 --kimitune shared --ckpt on --warmup 1 --steps 2 \
        --json $OUT/dpo_48b.json ;;
h200)  # what needs an H200's memory (run with needs_h200): the bf16 48B's DPO, and its long lengths in bf16
    PYTORCH_CUDA_ALLOC_CONF=$alloc TAIL=8 stage dpo_48b_bf16 120 python benchmarks/dpo_gpu.py --tools kimitune \
        --layers 27 --pairs 8 --prompt 1024 --reply 512 --kimitune shared --ckpt on --warmup 1 --steps 2 \
        --json $OUT/dpo_48b_bf16.json
    # LONG_SEQ / LONG_LIMIT: shorter lengths and stage for a call with less device time left
    PYTORCH_CUDA_ALLOC_CONF=$alloc TAIL=8 stage long_bf16 ${LONG_LIMIT:-330} python benchmarks/train_long.py \
        --bits 16 --seq ${LONG_SEQ:-32768,262144} --warmup 1 --steps 1 \
        --json $OUT/long_bf16.json ;;
peer_long)
    # the longest length that fits is the figure (one autotune config: the peer's kernels at each new length)
    FIRST_CONFIG=1 PYTORCH_CUDA_ALLOC_CONF=$alloc TAIL=12 stage peer_long 330 python benchmarks/train_long.py --peer \
        --seq 8192,12288,16384,20480,24576,32768,49152,65536 --warmup 1 --steps 1 --json $OUT/peer_long.json ;;
dpo_trl)
    TAIL=10 stage dpo_trl_long 230 python benchmarks/dpo_gpu.py --pairs 8 --prompt 2048 --reply 1024 \
        --kimitune shared,whole --ckpt on --warmup 2 --steps 4 --json $OUT/dpo_trl_long.json ;;
*) echo "usage: open_issues.sh tests|attention|pieces_tests|quant|long|dpo|dpo_48b|h200|peer_long|dpo_trl ..."; exit 2 ;;
esac
done
# the autotuners' choices only (the compiled kernels would pass the 16 MiB a file may bring back)
(cd /tmp && find tcache -name '*.autotune.json' | tar czf "$OUT/autotune.tgz" -T -) && ls -la "$OUT/autotune.tgz"
[ -d /tmp/kt/tuned_kernels ] && tar czf "$OUT/tuned.tgz" -C /tmp kt/tuned_kernels && ls -la "$OUT/tuned.tgz"
