"""Kimi Delta Attention implementations: naive.py (``recurrent_kda_reference``, the per-token definition), chunk.py
(``chunk_kda_reference``: chunkwise PyTorch with a hand-written backward), recurrent.py
(``fused_recurrent_kda_reference``: vectorised per-token decode), fla.py (fla-core's kernels on CUDA).
The dispatching entry points are in :mod:`kimitune.ops`."""
