"""The CUDA binding (csrc/cuda/salsa_cuda.cu: the ops' validation, the tensor table, the launches) compiles.

setup.py builds it only beside a CUDA torch, and the kernel audit (tests/benchmarks/test_cuda_audit.py)
compiles the kernels alone, without torch: so without this module a change to the binding met no compiler on a
machine without a GPU. It is compiled here with nvcc, the extension's flags and the installed torch's headers,
to compute_90a's PTX only: its device code goes through cicc, and ptxas, which the nvcc audit runs on the
same kernels (csrc/cuda/audit_kernels.cu instantiates each one the binding launches) for sm_80 and sm_90a, is
left out (nvcc --time, 2026-12-06: cudafe++ 13 s, cicc 19 s, ptxas 10 s, gcc 16 s; ``-arch=sm_90a`` would
also compile compute_90's PTX, a second cicc pass). A CPU torch wheel ships the CUDA headers the binding
includes but one generated configuration header (c10/cuda/impl/cuda_cmake_macros.h); where it is missing an
empty one stands in for it, so this checks the binding's code, not a CUDA torch's build. Skipped only where
nvcc is absent.
"""

from __future__ import annotations

import runpy
import subprocess
from pathlib import Path

import pytest

from benchmarks import cuda_audit
from tests import background

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "csrc" / "cuda" / "salsa_cuda.cu"
NVCC_FLAGS = runpy.run_path(str(ROOT / "salsa_fused" / "_build_flags.py"))["NVCC_FLAGS"]
GENERATED = Path("c10") / "cuda" / "impl" / "cuda_cmake_macros.h"


def _compile(tmp: Path):
    nvcc = cuda_audit.find_tool("nvcc")
    if nvcc is None:
        return None
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths()
    if not any((Path(p) / GENERATED).exists() for p in includes):
        (tmp / GENERATED).parent.mkdir(parents=True)
        (tmp / GENERATED).write_text("// stands in for a CUDA torch's generated header (tests/backends/test_cuda_binding.py)\n")
        includes = [str(tmp), *includes]
    command = [nvcc, *NVCC_FLAGS, "-gencode", "arch=compute_90a,code=compute_90a", "-DTORCH_EXTENSION_NAME=_C", *(f"-I{p}" for p in includes),
               "-c", str(SOURCE), "-o", str(tmp / "salsa_cuda.o")]
    proc = subprocess.run(command, capture_output=True, text=True)
    return dict(returncode=proc.returncode, stderr=proc.stderr, object=(tmp / "salsa_cuda.o").exists())


BINDING = background.job("nvcc binding", _compile, seconds_hint=60)


def test_the_cuda_binding_compiles_with_the_extensions_flags():
    if cuda_audit.find_tool("nvcc") is None:
        pytest.skip("nvcc is not installed")
    result = BINDING.result()
    errors = [line for line in result["stderr"].splitlines() if "error" in line]
    assert result["returncode"] == 0 and result["object"], "\n".join(errors[:20]) or result["stderr"][-4000:]
