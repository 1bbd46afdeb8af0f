"""What is allocated at a GPU step's peak, and where it was allocated: the CUDA caching allocator's history replayed.

    with peak_trace.recording() as trace:
        step()
    for line in peak_trace.report(trace["snapshot"]):
        print(line)

``recording`` turns on ``torch.cuda.memory._record_memory_history`` (Python frames only) for the block and keeps
its snapshot; ``peak_blocks`` replays the trace's allocations and frees, finds the moment the most bytes were live
(above what was live when the recording began: the weights, the optimizer's states) and returns the blocks live
then, grouped by the innermost frames of kimitune, fla, transformers, trl or peft that allocated them. It answers what
``max_memory_allocated`` cannot: which tensors make the peak.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch

OURS = ("kimitune/", "fla/", "transformers/", "trl/", "peft/", "benchmarks/")
FRAMES_PER_SITE = 3


@contextlib.contextmanager
def recording(max_entries: int = 2_000_000):
    """Records every allocation and free of the block, with its Python frames; yields a dict that holds the
    allocator's snapshot (``"snapshot"``) once the block has run."""
    trace: dict = {}
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")
    try:
        yield trace
    finally:
        torch.cuda.synchronize()
        trace["snapshot"] = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)


def site(frames: list[dict]) -> str:
    """The innermost ``FRAMES_PER_SITE`` frames in the code that matters (kimitune, fla, ...), innermost first."""
    picked = [f"{f['filename'].rsplit('/', 2)[-2]}/{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}"
              for f in frames if any(part in f["filename"] for part in OURS)]
    return " < ".join(picked[:FRAMES_PER_SITE]) or (frames[0]["name"] if frames else "?")


def peak_blocks(snapshot: dict, device: int = 0) -> tuple[int, dict[str, tuple[int, int]]]:
    """(the peak's bytes above the recording's start, {site: (bytes, blocks)} live at that moment)."""
    events = snapshot["device_traces"][device]
    live, now, peak, peak_at = {}, 0, 0, -1
    for index, event in enumerate(events):
        if event["action"] == "alloc":
            live[event["addr"]] = event["size"]
            now += event["size"]
            if now > peak:
                peak, peak_at = now, index
        elif event["action"] == "free_completed":  # a block from before the recording counts as it goes too
            now -= live.pop(event["addr"], event["size"])
    sites: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    alive: dict[int, dict] = {}
    for event in events[:peak_at + 1]:
        if event["action"] == "alloc":
            alive[event["addr"]] = event
        elif event["action"] == "free_completed":
            alive.pop(event["addr"], None)
    for event in alive.values():
        entry = sites[site(event.get("frames", []))]
        entry[0] += event["size"]
        entry[1] += 1
    return peak, {name: (size, count) for name, (size, count) in sites.items()}


def report(snapshot: dict, top: int = 25, device: int = 0) -> list[str]:
    """Lines: the peak above the start, then the ``top`` sites by bytes live at the peak."""
    peak, sites = peak_blocks(snapshot, device)
    lines = [f"peak above the recording's start: {peak / 2**30:.2f} GiB; live at the peak, by site:"]
    for name, (size, count) in sorted(sites.items(), key=lambda item: -item[1][0])[:top]:
        lines.append(f"  {size / 2**20:9.1f} MiB  {count:5d} blocks  {name}")
    return lines
