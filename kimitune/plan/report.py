"""``kimitune plan --json``: the plan, whether it fits, and the suggestions, as one JSON document."""

from __future__ import annotations

import json

from kimitune.plan.parts import GIB, MemoryPlan
from kimitune.plan.suggest import Suggestion


def plan_json(plan: MemoryPlan, gpu_bytes: float, suggestions: list[Suggestion], host_bytes: float | None = None) -> str:
    out = plan.to_dict() | {"gpu_memory_gib": gpu_bytes / GIB, "fits": plan.fits(gpu_bytes, host_bytes),
                            "suggestions": [{"change": s.change, "peak_allocated_gib": s.plan.peak_allocated_gib,
                                             "device_total_gib": s.plan.device_total_gib} for s in suggestions]}
    return json.dumps(out, indent=2)
