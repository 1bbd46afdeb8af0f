#!/usr/bin/env bash
# Issue 25, item 11, part 1: tunes fla's kernels on this GPU for the shapes kimitune ships configs for (the
# quickstart's tiny model; the 48B's widths at 4096 and 16384 tokens) and times first and second processes.
# $OUT/tuned.tgz holds the configs: `python scripts/ship_tuned.py $OUT/tuned.tgz` puts them in kimitune/ops/tuned/.
. scripts/device/setup.sh
unset TRITON_CACHE_AUTOTUNING   # kimitune's own defaults are what is measured
export TRITON_PRINT_AUTOTUNING=1 KIMITUNE_CACHE_DIR=/tmp/kt
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
save() { tar czf $OUT/tuned.tgz -C /tmp kt/tuned_kernels kt-qs/tuned_kernels 2>/dev/null; }
tuned() { grep -c 'Triton autotuning for function' "$1"; }
python3 -c "import torch, triton, fla; print(torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__, torch.cuda.get_device_name())"
python3 -m kimitune preprocess examples/quickstart.yaml --dataset-prepared-path /tmp/qs-cache > /dev/null
quickstart() {  # $1: the run's name
  local start=$(date +%s.%N)
  KIMITUNE_CACHE_DIR=/tmp/kt-qs python3 -m kimitune train examples/quickstart.yaml --device cuda --output-dir /tmp/$1 \
    --dataset-prepared-path /tmp/qs-cache > $OUT/$1.log 2>&1
  stamp "quickstart $1: $(echo "$(date +%s.%N) - $start" | bc) s wall, $(tuned $OUT/$1.log) kernels tuned"
}
gpu_row() {  # $1: log name, then train_gpu.py's arguments
  local log=$1; shift
  local start=$(date +%s.%N)
  timeout 300 python3 benchmarks/train_gpu.py --rows kimitune "$@" > /tmp/$log.log 2>&1
  stamp "train_gpu $log ($*): $(echo "$(date +%s.%N) - $start" | bc) s wall, $(tuned /tmp/$log.log) tuned"
  grep '^| kimitune' /tmp/$log.log; grep -v 'Triton autotuning\|best config\|^$' /tmp/$log.log | tail -3 >> $OUT/errors.log
}
quickstart qs-1 &
gpu_row gpu4k-1 --seq 4096 --ckpt off --warmup 2 --steps 8
wait; save
quickstart qs-2
gpu_row gpu4k-2 --seq 4096 --ckpt off --warmup 2 --steps 8
save
stamp "train_product:"; timeout 200 python3 benchmarks/train_product.py --work /tmp/product --steps 30 --skip 10 2>&1 | tail -4
gpu_row gpu16k-1 --seq 16384 --ckpt on --warmup 2 --steps 6
save; ls /tmp/kt*/tuned_kernels/*/*/
