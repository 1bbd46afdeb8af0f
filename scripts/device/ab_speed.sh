#!/usr/bin/env bash
# Speed of this tree against the previous commit's (its files unpacked in .prev: `git archive REV kimitune benchmarks
# examples | tar -x -C .prev`), in one device call, runs interleaved so that warm-up and machine drift fall on both.
#   bash scripts/device/ab_speed.sh gpu16k      train_gpu.py's 16384-token row with checkpointing, twice each
#   bash scripts/device/ab_speed.sh 48b         train_48b.py's bf16 8192-token row (no layer recomputed), twice each
. scripts/device/setup.sh
# The previous tree's processes run through seeded_run.py: this tree's shipped kernel configs, so neither side tunes.
launch() { if [ "$1" = . ]; then python3 "$2" "${@:3}"; else python3 scripts/device/seeded_run.py "$2" "${@:3}"; fi; }
case "$1" in
  gpu16k) run() { launch "$1" "$1"/benchmarks/train_gpu.py --rows kimitune --seq 16384 --ckpt on --warmup 2 --steps 8 \
                    | grep -E '^\| kimitune|^seeded'; } ;;
  48b) export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
       run() { launch "$1" "$1"/benchmarks/train_48b.py --bits 16 --seq 8192 --ckpt-layers 0 --warmup 2 --steps 10 \
                 | grep -E '^\| bf16|^seeded'; } ;;
esac
for round in 1 2; do
  for tree in .prev .; do
    echo "== round $round, $( [ "$tree" = . ] && echo this tree || echo previous commit )"
    PYTHONPATH=/tmp/site:$PWD/$tree run "$tree"
  done
done
