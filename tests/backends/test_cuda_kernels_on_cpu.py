"""The CUDA kernels (csrc/cuda/salsa_kernels.cuh) run on the CPU and write, bit for bit, what csrc/salsa_math.h's
per-element formulas give (tests/backends/cuda_on_cpu/: an emulation of the CUDA constructs they use, and the
check). The CPU backend shares those formulas and is held to the torch reference in test_cpp_backend.py, so
this carries the reference to the kernels' chunking, vector and scalar paths (a row with any one stream
misaligned included), tails, block reductions (the slope's partials within 1e-5 of a double sum; its finish
kernel's q bit for bit in its fixed order), the plain step's guards (found_inf, a non-finite loss) and non-finite
counts, and the bytes around each tensor, for fp32, bf16 and fp16 weights, without a GPU. Checked to fail when the
kernels lose the found_inf or the loss guard, when the vector path reads only the weight's alignment, or when the
finish kernel sums one partial. Reads past a tensor's end: a second build with AddressSanitizer poisons the bytes
after each tensor (and before it, to the 8-byte granule ASan tracks) while the kernels run, once per dtype,
direction and saved copy (`--bounds`); checked to stop a kernel whose vector path reads a ragged tail's full pack,
and, on every run, to stop a read the harness makes past a tensor's end itself (`--overread`). A block's threads
are fibers on one OS thread (cuda_shim.h), and a block whose threads reach different numbers of __syncthreads
stops the run (`--divergent`). Not checked: the hardware's own conversions and fused multiply-adds, and the
binding (test_cuda_binding.py compiles it). About 75 s of one core on a 2-core AVX2 machine, in the background.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests import background

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent / "cuda_on_cpu"


def _build_and_run(tmp: Path) -> dict:
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:  # the extension needs one too: not a reason to skip
        raise RuntimeError("no C++ compiler (c++ or g++) on PATH")
    binaries = {}
    for name, flags in (("plain", ["-O1"]), ("asan", ["-O0", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"])):
        binaries[name] = tmp / f"kernels_on_cpu_{name}"
        build = subprocess.run([compiler, "-std=c++20", *flags, f"-I{ROOT / 'csrc'}", f"-I{HERE}",
                                str(HERE / "kernels_on_cpu.cpp"), "-o", str(binaries[name])],
                               capture_output=True, text=True)
        if build.returncode != 0:
            raise RuntimeError(f"the emulation did not compile ({name}):\n{build.stderr[-4000:]}")
    runs = {name: subprocess.run([str(binaries[binary]), *flags], capture_output=True, text=True, timeout=600)
            for name, binary, flags in (("check", "plain", []), ("perturbed", "plain", ["--perturb"]),
                                        ("bounds", "asan", ["--bounds"]), ("overread", "asan", ["--overread"]),
                                        ("divergent", "plain", ["--divergent"]))}
    return {name: (run.returncode, run.stdout, run.stderr) for name, run in runs.items()}


RUN = background.job("CUDA kernels on the CPU", _build_and_run, seconds_hint=54)


def test_every_pass_writes_what_salsa_math_gives_for_every_element():
    code, out, err = RUN.result()["check"]
    failures = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert code == 0 and out.rstrip().endswith("failures 0"), "\n".join(failures[:20]) or (out + err)[-4000:]
    accesses = int(out.rsplit("128-bit accesses ", 1)[1].split(",")[0])
    assert accesses > 0  # the aligned rows took the vector path


def test_the_check_fails_when_one_expected_bit_is_changed():
    code, out, _ = RUN.result()["perturbed"]
    assert code == 1 and "FAIL first trial: an element differs from salsa_math.h's" in out


def test_no_kernel_reads_or_writes_past_a_tensors_end_under_asan():
    code, out, err = RUN.result()["bounds"]
    assert code == 0 and out.rstrip().endswith("failures 0"), (out + err)[-4000:]
    assert int(out.rsplit("128-bit accesses ", 1)[1].split(",")[0]) > 0


def test_the_asan_build_stops_a_read_past_a_tensors_end():
    code, out, err = RUN.result()["overread"]
    assert code != 0 and "use-after-poison" in err and "unnoticed" not in out, (out + err)[-2000:]


def test_a_syncthreads_not_every_thread_reaches_stops_the_emulation():
    code, out, err = RUN.result()["divergent"]
    assert code != 0 and "1 of 256 threads wait at a __syncthreads" in err and "unnoticed" not in out, (out + err)[-2000:]
