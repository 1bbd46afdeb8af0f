#!/usr/bin/env bash
# Issue 25, item 11, on a fresh machine with kimitune's shipped kernel configs: the GPU quickstart's first and second
# process, train_gpu.py's 4096-token row in a first and a second process, then `kimitune train` itself
# (train_product.py: packed rows, whose varlen kernels may tune) whose tuned configs come back in $OUT/tuned.tgz.
. scripts/device/setup.sh
unset TRITON_CACHE_AUTOTUNING   # kimitune's own defaults are what is measured
export TRITON_PRINT_AUTOTUNING=1 KIMITUNE_CACHE_DIR=/tmp/kt
T0=$(date +%s.%N)
now() { python3 -c "import time; print(f'{time.time() - $T0:.1f}')"; }
tuned() { grep -c 'Triton autotuning for function' "$1"; }
save() { tar czf $OUT/tuned.tgz -C /tmp kt/tuned_kernels 2>/dev/null; }
python3 -c "import torch, triton; print(torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
timed() {  # $1: name, then the command; prints its wall time and how many kernels it tuned
  local name=$1; shift; local start=$(now)
  "$@" > /tmp/$name.log 2>&1; local rc=$?
  echo "[$(now) s] $name: $(python3 -c "print(f'{$(now) - $start:.1f}')") s wall, rc $rc, $(tuned /tmp/$name.log) kernels tuned"
  grep -E '^\| kimitune|^done:|^\{' /tmp/$name.log | grep -v '^{"' ; cp /tmp/$name.log $OUT/ 2>/dev/null
}
quickstart() { python3 -m kimitune train examples/quickstart.yaml --device cuda --output-dir /tmp/$1; }
timed qs-1 quickstart qs-1
timed qs-2 quickstart qs-2
gpu4k() { timeout 240 python3 benchmarks/train_gpu.py --rows kimitune --seq 4096 --ckpt off --warmup 2 --steps 8; }
timed gpu4k-1 gpu4k
timed gpu4k-2 gpu4k
save
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/ops/test_tuned_kernels_gpu.py -m gpu 2>&1 | tail -3
# the layers-in-pieces path (issue 21) on the GPU: one autotune config per kernel (a correctness test, not a timing)
PYTHONPATH=$PWD/scripts/device/one_config:$PYTHONPATH timeout 150 python3 -m pytest -q -p no:cacheprovider \
  tests/model/test_pieces_gpu.py -m gpu 2>&1 | tail -15
if [ "$1" = product ]; then  # `kimitune train` itself: its packed rows tune fla's varlen kernels on first use
  left=$(python3 -c "print(int(585 - $(now)))")  # the rest of the call's 600 s
  timed product timeout $left python3 benchmarks/train_product.py --work /tmp/product --steps 30 --skip 10
  save
fi
