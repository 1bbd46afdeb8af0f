#!/usr/bin/env bash
# Issue 25, item 11: the GPU quickstart's first and second process on one machine, and how many kernels each tuned.
# Expected with kimitune/triton_env.py's defaults: process 1 tunes (> 0), process 2 tunes nothing and is much faster;
# the control (caching off) tunes again.
. scripts/device/setup.sh
unset TRITON_CACHE_AUTOTUNING  # setup.sh sets it; here kimitune's own default is what is measured
export TRITON_CACHE_DIR=$(mktemp -d) TRITON_PRINT_AUTOTUNING=1
python3 -c "import kimitune, os, triton, fla; print('triton', triton.__version__, 'fla', fla.__version__, \
  {k: os.environ.get(k) for k in ('TRITON_CACHE_AUTOTUNING', 'FLA_CACHE_RESULTS')})"
python3 -m kimitune preprocess examples/quickstart.yaml --dataset-prepared-path /tmp/qs-cache > /dev/null
for i in 1 2; do
  start=$(date +%s.%N)
  python3 -m kimitune train examples/quickstart.yaml --device cuda --output-dir /tmp/qs-$i \
    --dataset-prepared-path /tmp/qs-cache > /tmp/qs-$i.log 2>&1
  echo "process $i: $(echo "$(date +%s.%N) - $start" | bc) s wall, $(grep -c 'Triton autotuning for function' /tmp/qs-$i.log)" \
       "kernels tuned, $(find "$TRITON_CACHE_DIR" -name '*.autotune.json' | wc -l) autotune files"
done
TRITON_CACHE_AUTOTUNING=0 FLA_CACHE_RESULTS=0 python3 -m kimitune train examples/quickstart.yaml --device cuda \
  --output-dir /tmp/qs-3 --dataset-prepared-path /tmp/qs-cache 2>&1 | grep -c 'Triton autotuning for function'
