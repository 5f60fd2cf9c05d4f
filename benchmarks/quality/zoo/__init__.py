"""The task zoo: generalization across tasks (ZOO.md); run with ``python -m benchmarks.quality.zoo``."""
