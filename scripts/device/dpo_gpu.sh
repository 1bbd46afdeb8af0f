#!/usr/bin/env bash
# Issue 26 on the device: the preference steps' no-sync GPU test, then benchmarks/dpo_gpu.py (kimitune against
# TRL's DPOTrainer + PEFT, the 4-layer model at the 48B's widths). TRL must travel too: add trl==1.16.0 and
# accelerate (its and peft's need) to .whl before the call.
#   bash scripts/device/dpo_gpu.sh [dpo_gpu.py arguments, e.g. --pairs 8 --prompt 1024 --reply 512]
. scripts/device/setup.sh
PYTHONPATH=$PWD/scripts/device/one_config:$PYTHONPATH timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu \
  tests/train/test_step.py -k preference 2>&1 | tail -3
python3 benchmarks/dpo_gpu.py --json $OUT/dpo_gpu.json "$@"
