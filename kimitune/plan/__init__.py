"""`kimitune plan`: the peak GPU memory of a training run, predicted from its config before anything is loaded,
and what would make it fit.

    shapes.py       what the model holds, read from the model built on the meta device and adapted as training
                    adapts it (dataflow.py: which tensor each linear reads, traced from the model's forward)
    activations.py  what each layer kind keeps for the backward, per token (tests/test_plan_saved_tensors.py
                    measures the PyTorch paths' terms)
    predict.py      the items of the peak on one GPU: weights, gradients, optimizer states, activations,
                    transients (sharding.py: under FSDP2)
    suggest.py      settings that would make it fit
    parts.py        MemoryPlan and its items, keyed by Part; report.py: the JSON report; inputs.py: the model's
                    config.json and memory sizes

The per-kind terms follow what each op saves; the GPU kernels' terms come from the memory census
(benchmarks/memory_census.py) and benchmarks/RESULTS.md, "Peak GPU memory: census and kimitune plan", says how
close the plan comes to the measured peaks (tests/test_plan.py holds those rows). When the model code changes what
it saves, tests/test_plan_saved_tensors.py fails for the PyTorch paths; re-run the census for the GPU kernels.
"""

from kimitune.plan.inputs import load_model_config, parse_memory
from kimitune.plan.parts import GIB, MemoryItem, MemoryPlan, Part
from kimitune.plan.predict import predict_peak_memory
from kimitune.plan.report import plan_json
from kimitune.plan.suggest import Suggestion, suggest_settings

__all__ = ["GIB", "MemoryItem", "MemoryPlan", "Part", "Suggestion", "predict_peak_memory", "suggest_settings",
           "load_model_config", "parse_memory", "plan_json"]
