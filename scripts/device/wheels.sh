#!/usr/bin/env bash
# Downloads, here, the wheels the device machine lacks into .whl/ (ignored by git; carry [".whl"]; setup.sh installs
# them there). The device image has torch 2.11 + cu130, triton 3.6, peft, accelerate, huggingface-hub, tokenizers,
# typer and rich (Python 3.12); bitsandbytes is too large for a call's 64 MiB and goes to .whl_opt/ only when asked:
#   bash scripts/device/wheels.sh [--bnb]
set -e
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms -d "$@"; }
get .whl fla-core==0.6.0 cut-cross-entropy==25.1.1 transformers==5.24.0 trl==1.16.0 datasets dill multiprocess \
    pydantic pydantic-core annotated-types typing-inspection typing-extensions
if [ "$1" = --bnb ]; then get .whl_opt bitsandbytes; fi
du -sh .whl $( [ -d .whl_opt ] && echo .whl_opt)
