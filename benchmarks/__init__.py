"""Benchmarks: dpo-fast side by side with naive PyTorch and the fused heads people use today.

``python -m benchmarks`` runs the sweep (see ``__main__.py``); ``pytest benchmarks/
--benchmark-only`` runs the same methods at CPU-small shapes under pytest-benchmark.
Every method computes the same sigmoid DPO loss (beta 0.1, precomputed reference
log-probs) on the same inputs and is checked against the float64 oracle of
``dpo_fast.reference``.
"""
