"""Adds the kernel configs tuned on a device machine (scripts/device/tune_kernels.sh's tuned.tgz) to the ones
kimitune ships (kimitune/ops/tuned/<GPU>/fla-<version>/); entries already shipped stay.

    python scripts/ship_tuned.py /work/.device/.../tuned.tgz
"""

from __future__ import annotations

import json
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
            target = tuned_kernels.SHIPPED / gpu / version / file.name
            added = tuned_kernels.merge_entries(target, data["kernel_name"], data["autotune_entries"],
                                                data.get("triton_version"))
            print(f"{gpu}/{version}/{file.name}: {added} added")


if __name__ == "__main__":
    main(sys.argv[1])
