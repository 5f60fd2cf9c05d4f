"""Compiler flags of the C++/CUDA extension: one list for setup.py and the JIT build.

Plain constants (setup.py reads this file without importing the package). The kernels'
bitwise agreement with the torch reference depends on them: no contraction of a*b+c into
an FMA (the math places its FMAs itself), sqrt without errno and selects on FP values
without trap semantics so that the guarded loops vectorize (neither changes a rounding).
``-g0`` overrides the ``-g`` that Python's own compiler flags add: debug information for the torch
headers took a third of the build (both files, one core: 117 s with it, 74 s without, 2026-12-06).
"""

CXX_FLAGS = ["-O3", "-g0", "-std=c++20", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++20", "--fmad=false"]
LINK_FLAGS = ["-fopenmp"]
CPU_SOURCES = ["csrc/cpu/salsa_cpu.cpp"]
CUDA_SOURCES = ["csrc/cuda/salsa_cuda.cu"]
PYTHON_MODULE_SOURCE = "csrc/python_module.cpp"
