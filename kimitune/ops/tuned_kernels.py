"""fla-core's autotuned launch configs, kept across processes and shipped for the GPUs kimitune is measured on.

fla-core's Triton kernels are autotuned per tuning key (the kernel's ``key`` arguments: head counts, head sizes,
block sizes, flags, and the dtypes of its tensors): every candidate config is compiled and timed, minutes on a new
machine. An autotuner tunes a key only when its in-memory results (``autotuner.cache``: key -> chosen config) lack
it, so kimitune fills those results before the first launch (`seed_autotuners`, run by the ops right after they
import fla's kernels) from one folder per GPU model and fla version in the user's cache,
``$KIMITUNE_CACHE_DIR/tuned_kernels/<GPU>/fla-<version>`` (default ``$XDG_CACHE_HOME/kimitune``, else
``~/.cache/kimitune``), which starts as a copy of the configs shipped in ``kimitune/ops/tuned/<GPU>/fla-<version>/``
(`use_tuned_configs`; the keys a GPU's own shipped configs lack are filled from a same-capability GPU's: an H100's
from the H200's), and adds what a process tuned (`save_tuned_configs`, after a training step). Only the exact
key is seeded, and only with one of the kernel's own candidates: never a config chosen for other sizes. Triton's own
autotune cache (kimitune/triton_env.py) is keyed by hashes of the Triton build and the kernel's source, so it serves
only the machine that tuned; fla's config files (``FLA_CACHE_MODE``) reach only fla's own autotuner class, not the
plain ``triton.autotune`` of its norm and SwiGLU kernels. ``FLA_CACHE_RESULTS=0`` turns all of this off.

File format (fla's ``KernelConfigFile``, one per kernel): ``{"kernel_name", "triton_version", "autotune_entries":
{md5 of the key's JSON: {"autotune_key": [...], "config": {"kwargs", "num_warps", "num_stages", "num_ctas",
"maxnreg"}}}}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import weakref
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SHIPPED = Path(__file__).with_name("tuned")

_config_dir: Path | None = None  # the folder this process reads and writes, once use_tuned_configs has run


def gpu_folder_name(device_name: str) -> str:
    """fla's name for a GPU model (``sanitize_gpu_name``): ``'NVIDIA H200'`` -> ``'NVIDIA_H200'``."""
    return re.sub(r"[^0-9A-Za-z]+", "_", device_name).strip("_") or "unknown_gpu"


def key_hash(autotune_key: Any) -> str:
    """fla's ``AutotuneKey.key_hash``: the md5 of the key as compact JSON with sorted keys (tuples as lists)."""
    return hashlib.md5(json.dumps(autotune_key, separators=(",", ":"), sort_keys=True).encode()).hexdigest()


def user_cache_root() -> Path:
    if os.environ.get("KIMITUNE_CACHE_DIR"):
        return Path(os.environ["KIMITUNE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kimitune"


def folder_for(device_name: str, fla_version: str, root: Path) -> Path:
    """``root/<GPU>/fla-<version>``: the user cache's folder for that GPU (root ``.../tuned_kernels``) or the
    shipped one."""
    return root / gpu_folder_name(device_name) / f"fla-{fla_version}"


def serialize_config(config: Any) -> dict[str, Any] | None:
    """A Triton ``Config`` as fla's loader reads it; None for one that cannot be written (a pre-hook)."""
    if getattr(config, "pre_hook", None) is not None:
        return None
    return {
        "kwargs": dict(config.kwargs),
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
        "num_ctas": getattr(config, "num_ctas", 1),
        "maxnreg": getattr(config, "maxnreg", None),
    }


def entries_of(autotuner: Any) -> dict[str, dict[str, Any]]:
    """The autotune entries of one autotuner's in-memory results (``autotuner.cache``: tuning key -> Config)."""
    entries = {}
    for key, config in autotuner.cache.items():
        serialized = serialize_config(config)
        try:
            digest = key_hash(list(key))
        except TypeError:  # a key value that is not JSON: fla could not look it up either
            continue
        if serialized is not None:
            entries[digest] = {"autotune_key": list(key), "config": serialized}
    return entries


def read_entries(path: Path) -> dict[str, dict[str, Any]]:
    """The entries of one config file; a missing file has none, and a malformed one is reported and has none (it
    is rewritten on the next save)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        entries = data["autotune_entries"]
        if not isinstance(entries, dict):
            raise TypeError("autotune_entries is not an object")
        return entries
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("ignoring the malformed kernel config file %s: %s", path, error)
        return {}


def merge_entries(path: Path, name: str, entries: dict[str, dict[str, Any]], triton_version: str | None) -> int:
    """Adds the entries that ``path`` lacks (those it has stay: the first tuning of a key is kept) and rewrites it
    atomically, so a reader never sees half a file and concurrent writers (ranks) lose no more than an entry.
    Returns how many were added."""
    known = read_entries(path)
    new = {digest: entry for digest, entry in entries.items() if digest not in known}
    if not new:
        return 0
    data = {"kernel_name": name, "triton_version": triton_version, "autotune_entries": {**known, **new}}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as file:
        json.dump(data, file, indent=1, sort_keys=True)
    os.replace(temporary, path)
    return len(new)


def seed_from(shipped: Path, folder: Path) -> int:
    """Merges every shipped ``<kernel>.json`` of ``shipped`` into ``folder``; returns the entries added."""
    if not shipped.is_dir():
        return 0
    added = 0
    for file in sorted(shipped.glob("*.json")):
        data = json.loads(file.read_text())
        added += merge_entries(folder / file.name, data.get("kernel_name") or file.stem, data["autotune_entries"],
                               data.get("triton_version"))
    return added


def shipped_folders(device_name: str, fla_version: str, capability: tuple[int, int] | None = None) -> list[Path]:
    """The shipped configs for this GPU, first choice first: its own folder, then those of the GPUs of the same
    compute capability (``<GPU>/gpu.json``: ``{"name", "capability"}``), whose kernels have the same shared memory
    and instructions, so their choices run here close to the best: an H100 fills the keys it has not tuned with the
    H200's rather than tuning them for minutes."""
    own = folder_for(device_name, fla_version, SHIPPED)
    folders = [own] if own.is_dir() else []
    if capability is None:
        return folders
    for info in sorted(SHIPPED.glob("*/gpu.json")):
        sibling = info.parent / f"fla-{fla_version}"
        try:
            same = tuple(json.loads(info.read_text())["capability"]) == tuple(capability)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if same and sibling.is_dir() and sibling != own:
            logger.info("kernel configs tuned on %s (compute capability %d.%d) fill the keys not tuned on %s",
                        info.parent.name, *capability, device_name)
            folders.append(sibling)
    return folders


def use_tuned_configs(device_name: str, fla_version: str | None = None,
                      capability: tuple[int, int] | None = None) -> Path | None:
    """This GPU's kernel config folder, the shipped configs merged in (`shipped_folders`: its own, then same-
    capability GPUs' for the keys still missing), as the folder this process seeds from and saves to; None where
    the user turned caching off (``FLA_CACHE_RESULTS=0``) or the cache cannot be written. ``capability`` is also
    written beside it once (``gpu.json``), so that configs shipped from there (scripts/ship_tuned.py) can serve that
    GPU's siblings."""
    global _config_dir
    if os.environ.get("FLA_CACHE_RESULTS") == "0":
        return None
    try:
        version = fla_version or metadata.version("fla-core")
    except metadata.PackageNotFoundError:  # fla is missing: its import will say so
        return None
    folder = folder_for(device_name, version, user_cache_root() / "tuned_kernels")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        info = folder.parent / "gpu.json"
        if capability is not None and not info.exists():
            info.write_text(json.dumps({"name": device_name, "capability": list(capability)}))
        for shipped in shipped_folders(device_name, version, capability):
            seed_from(shipped, folder)
    except OSError as error:  # a read-only home: fla tunes as it would without kimitune
        logger.warning("kernel configs are not kept across processes: %s", error)
        return None
    _config_dir = folder
    return folder


def kernel_name(autotuner: Any) -> str:
    """The kernel's name: fla's ``CachedAutotuner.kernel_name``, else the jitted function's."""
    name = getattr(autotuner, "kernel_name", None)
    if name:
        return name
    fn = autotuner.fn
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn.__name__


def _is_autotuner(value: Any) -> bool:
    return isinstance(getattr(value, "cache", None), dict) and isinstance(getattr(value, "configs", None), list) \
        and hasattr(value, "keys") and hasattr(value, "fn")


def seed_autotuners(autotuners: list[Any] | None = None, folder: Path | None = None) -> int:
    """Fills the autotuners' in-memory results with the stored configs for their keys (each autotuner once; a key
    it already has stays); returns how many keys were seeded. A stored config must be one of the kernel's
    candidates (the same kwargs, warps, stages and CTAs), and that candidate itself is used. From then on each
    autotuner keeps what it tunes as it tunes it (`keep_as_tuned`)."""
    folder = folder or _config_dir
    if folder is None:
        return 0
    seeded = 0
    for autotuner in live_autotuners() if autotuners is None else autotuners:
        if id(autotuner) in _seeded:
            continue
        _seeded.add(id(autotuner))
        keep_as_tuned(autotuner, folder)
        candidates = {json.dumps(serialize_config(c), sort_keys=True): c for c in autotuner.configs}
        for entry in read_entries(folder / f"{kernel_name(autotuner)}.json").values():
            key = tuple(entry.get("autotune_key") or ())
            config = candidates.get(json.dumps(entry.get("config"), sort_keys=True))
            if key and config is not None and key not in autotuner.cache:
                autotuner.cache[key] = config
                seeded += 1
    return seeded


def keep_as_tuned(autotuner: Any, folder: Path) -> None:
    """Makes ``autotuner`` write its choice to ``folder`` right after it tunes a new key (a launch whose run grew
    its results), so that a process stopped in the middle of a first run, minutes of tuning on a new machine,
    leaves what it tuned for the next one. A launch that tunes nothing costs a length check."""
    run = getattr(autotuner, "run", None)
    if run is None or getattr(run, "keeps_as_tuned", False):
        return

    def run_and_keep(*args: Any, **kwargs: Any) -> Any:
        known = len(autotuner.cache)
        result = run(*args, **kwargs)
        if len(autotuner.cache) != known:
            save_tuned_configs([autotuner], folder)
        return result

    run_and_keep.keeps_as_tuned = True  # type: ignore[attr-defined]
    autotuner.run = run_and_keep  # the instance's own: Triton's launch and heuristics call ``self.run``


_seeded: set[int] = set()  # ids of the autotuners seed_autotuners has filled
_saved: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # autotuner -> (folder, keys) at its last save
_prepared = False


def seed_after_import() -> int:
    """What an op runs right after importing fla's kernels (before their first launch): on CUDA, this GPU's folder
    (`use_tuned_configs`, once per process), then `seed_autotuners`. Returns the keys seeded."""
    global _prepared
    import torch

    if not torch.cuda.is_available():
        return 0
    if not _prepared:
        _prepared = True
        use_tuned_configs(torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability())
    return seed_autotuners()


def live_autotuners() -> list[Any]:
    """The autotuners of the imported fla modules (fla's ``CachedAutotuner`` and plain ``triton.autotune``), found
    under the ``triton.heuristics`` that may wrap them."""
    found = {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "fla" or name.startswith("fla.")):
            continue
        for value in list(vars(module).values()):
            for _ in range(4):  # triton.heuristics wraps the autotuner, which wraps the jitted function (``.fn``)
                if _is_autotuner(value):
                    found[id(value)] = value
                value = getattr(value, "fn", None)
                if value is None:
                    break
    return list(found.values())


def save_tuned_configs(autotuners: list[Any] | None = None, folder: Path | None = None) -> int:
    """Writes what this process's autotuners chose that the folder lacks; returns how many entries were added.
    Cheap when there is nothing new (no file is written), so it can run after every few steps."""
    folder = folder or _config_dir
    if folder is None:
        return 0
    triton_version = sys.modules["triton"].__version__ if "triton" in sys.modules else None
    added = 0
    for autotuner in live_autotuners() if autotuners is None else autotuners:
        if _saved.get(autotuner) == (folder, len(autotuner.cache)):
            continue  # nothing tuned since its last save: no file read
        entries, size = entries_of(autotuner), len(autotuner.cache)
        if entries:
            try:
                name = kernel_name(autotuner)
                added += merge_entries(folder / f"{name}.json", name, entries, triton_version)
            except OSError as error:
                logger.warning("could not keep the kernel configs in %s: %s", folder, error)
                return added
        _saved[autotuner] = (folder, size)
    return added
