"""Runs an older tree's script with this tree's shipped fla kernel configs seeded first, so that an A/B against a
commit from before kimitune kept its tuning (issue 25) times the step, not fla's autotuning.

    python3 scripts/device/seeded_run.py .prev/benchmarks/train_gpu.py --rows kimitune --seq 16384 ...

The older tree must be first on PYTHONPATH (ab_speed.sh sets it). fla's ops and modules are imported eagerly, then
this tree's ``kimitune/ops/tuned_kernels.py`` (loaded by path: it imports nothing of kimitune) fills every
autotuner's results for the stored keys, then the script runs as ``__main__``.
"""

import importlib
import importlib.util
import pkgutil
import runpy
import sys
from pathlib import Path

import torch

TUNED = Path(__file__).resolve().parents[2] / "kimitune" / "ops" / "tuned_kernels.py"


def main() -> None:
    script, *args = sys.argv[1:]
    import fla

    for info in pkgutil.walk_packages(fla.__path__, "fla."):
        if info.name.startswith(("fla.ops", "fla.modules")):
            try:
                importlib.import_module(info.name)
            except Exception:  # noqa: BLE001  a module this machine cannot import is one fla would not use here
                pass
    spec = importlib.util.spec_from_file_location("seeded_tuned_kernels", TUNED)
    tuned = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tuned)
    tuned.use_tuned_configs(torch.cuda.get_device_name())
    print(f"seeded {tuned.seed_autotuners()} kernel keys from this tree's configs", flush=True)
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
