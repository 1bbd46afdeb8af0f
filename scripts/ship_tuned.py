"""Adds the kernel configs tuned on a device machine to the ones kimitune ships (kimitune/ops/tuned/<GPU>/fla-<version>/);
entries already shipped stay. From a process's saved configs (scripts/device/tune_kernels.sh's tuned.tgz), or from
the log of a process run with TRITON_PRINT_AUTOTUNING=1 (Triton prints each tuning's kernel, key and chosen config).

    python scripts/ship_tuned.py /work/.device/.../tuned.tgz
    python scripts/ship_tuned.py --log NVIDIA_H200 0.6.0 /work/.device/.../qs-1.log ...
"""

from __future__ import annotations

import ast
import json
import re
import sys
import tarfile
import tempfile
from pathlib import Path

from kimitune.ops import tuned_kernels


def main(archive: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")
        for file in sorted(Path(folder).glob("*/tuned_kernels/*/fla-*/*.json")):
            gpu, version = file.parent.parent.name, file.parent.name
            data = json.loads(file.read_text())
            # a process's folder also holds what it was seeded with from another GPU's shipped configs
            # (tuned_kernels.shipped_folders): only what was tuned on this GPU is shipped as its own
            seeded = {}
            for other in tuned_kernels.SHIPPED.glob(f"*/{version}/{file.name}"):
                if other.parent.parent.name != gpu:
                    seeded.update(tuned_kernels.read_entries(other))
            entries = {digest: entry for digest, entry in data["autotune_entries"].items()
                       if seeded.get(digest, {}).get("config") != entry["config"]}
            if not entries:
                continue
            target = tuned_kernels.SHIPPED / gpu / version / file.name
            added = tuned_kernels.merge_entries(target, data["kernel_name"], entries, data.get("triton_version"))
            print(f"{gpu}/{version}/{file.name}: {added} added")
        for info in Path(folder).glob("*/tuned_kernels/*/gpu.json"):  # its compute capability: for its siblings
            target = tuned_kernels.SHIPPED / info.parent.name / "gpu.json"
            if target.parent.is_dir() and not target.exists():  # its folder exists once something was shipped
                target.write_text(info.read_text())


TUNING = re.compile(r"Triton autotuning for function (\w+),\s*with key as (\(.*?\)),\s*finished after [\d.]+s,\s*"
                    r"best config selected: (.*?);", re.S)
LAUNCH = ("num_warps", "num_ctas", "num_stages", "maxnreg")


def from_logs(gpu: str, version: str, logs: list[str]) -> None:
    """The tunings Triton printed: ``BT: 32, num_warps: 8, num_ctas: 1, num_stages: 3, maxnreg: None``."""
    found: dict[str, dict] = {}
    for log in logs:
        for name, key, chosen in TUNING.findall(Path(log).read_text()):
            values = {k.strip(): ast.literal_eval(v.strip()) for k, v in (part.split(":") for part in chosen.split(","))}
            config = {"kwargs": {k: v for k, v in values.items() if k not in LAUNCH}, "num_warps": values["num_warps"],
                      "num_stages": values["num_stages"], "num_ctas": values.get("num_ctas", 1),
                      "maxnreg": values.get("maxnreg")}
            key = list(ast.literal_eval(key))
            found.setdefault(name, {})[tuned_kernels.key_hash(key)] = {"autotune_key": key, "config": config}
    for name, entries in sorted(found.items()):
        added = tuned_kernels.merge_entries(tuned_kernels.SHIPPED / gpu / f"fla-{version}" / f"{name}.json", name,
                                            entries, None)
        print(f"{gpu}/fla-{version}/{name}.json: {added} added")


if __name__ == "__main__":
    if sys.argv[1] == "--log":
        from_logs(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main(sys.argv[1])
