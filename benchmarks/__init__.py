"""Scripts that measure salsa_fused and append their results to ``benchmarks/results``.

Run each one as a module from the repository root: ``python -m benchmarks.kernel_bench --help``
(``benchmarks.quality`` holds the optimization-quality experiments, ``python -m benchmarks.quality.run``).
The shared timing, environment and results helpers are in ``benchmarks._common``.
"""
