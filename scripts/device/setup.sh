# Sourced at the start of every device command: installs the carried wheels (.whl, and .whl_opt for bitsandbytes
# when carried) and puts the repo on the path.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl $(ls .whl_opt/*.whl 2>/dev/null) >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
# Autotune results of earlier runs (carry .triton_autotune): triton then compiles only the chosen config.
export TRITON_CACHE_DIR=/tmp/tcache TRITON_CACHE_AUTOTUNING=1
if [ -f .triton_autotune/autotune.tgz ]; then tar xzf .triton_autotune/autotune.tgz -C /tmp; fi
