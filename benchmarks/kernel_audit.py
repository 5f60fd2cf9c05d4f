"""Ahead-of-time audit of every kernel the Triton backend launches (issue 7, layer 1). No GPU needed.

The backend's public functions are called on CPU buckets (fp32, bf16, fp16; aligned
and misaligned storage) with the launch replaced by a recorder, so the audit compiles
exactly the specializations the backend uses: its pointer-table signatures, constexpr
switches, BLOCK and num_warps. Each is compiled with ``triton.compile`` for sm_80 and
sm_90a; the cubin it builds declares its registers and stack frame (``cuobjdump -res-usage``).

Per record:
  registers, stack_bytes   what the cubin Triton built declares (``cuobjdump -res-usage``); a
                           stack frame is spill space (no local arrays, no calls). Read from the
                           cubin, not from a second ptxas run: one without Triton's flags
                           (``--regAllocOptLevel=2``) gave other counts and hid a spill.
  vector_bits              the narrowest access width the main streams need: unpredicated
                           global loads/stores of the full-block path are sorted widest
                           first and their bytes accumulated until they cover the streams'
                           bytes per thread (BLOCK / threads x bytes_per_param); the width
                           where coverage completes. 128 = every stream moves in 128-bit
                           accesses.
  bytes_per_param          from the kernel's design: sum of the element sizes of the
                           streams it reads and writes (e.g. plain step, fp32: reads
                           w, g, m, v and writes w, m, v = 7 x 4 = 28).
  bytes_per_param_ptx      (aligned path) bytes moved by 128-bit accesses / elements per
                           thread: the same number measured on the compiled code.
  sass_vector_bits,        the same two figures read from the machine code that runs
  bytes_per_param_sass     (``cuobjdump -sass`` of the cubin: LDG/STG widths), so a width
                           ptxas narrowed after the PTX would show.

Every specialization the optimizer launches is compiled: each pass with and without a
GradScaler's scale (and the plain step with found_inf), all three directions (the plain
step: Adam's update and raw), both restore strategies, the plain step's register cap (``maxnreg``) where the backend sets it.

Run:  python -m benchmarks.kernel_audit   (writes benchmarks/results/kernel_audit.{json,md}, or --out-dir DIR)
      python -m benchmarks.kernel_audit --sample   (a covering quarter, as JSON: what the tests compile)
It must run without TRITON_INTERPRET (kernels must be JIT functions, not interpreted).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("kernel_audit compiles for real GPUs: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from salsa_fused._compat import triton_kernel_source  # noqa: E402
from salsa_fused.backends import triton_backend  # noqa: E402
from salsa_fused.backends.base import GRADIENT, MOMENTUM, RAW, Bucket, Hyper, Move, PassArgs  # noqa: E402

TARGETS = {"sm_80": 80, "sm_90a": 90}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RESULTS = ROOT / "benchmarks" / "results"
FIELDS = ("kernel", "target", "dtype", "registers", "stack_bytes", "vector_bits", "bytes_per_param")
# SPEC section 2, fp32 weights, state and gradients.
FP32_BUDGET = {"plain_step": 28, "first_trial": 32, "retrial": 16}

_SIG_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
              torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}
_ELEMENT_SIZE = {"w": None, "g": None, "m": 4, "v": 4, "saved": None}


@dataclass
class Variant:
    """One specialization the backend launches, and the streams its design moves."""

    kernel_name: str  # e.g. "first_trial[copy,gradient]"
    dtype: str
    aligned: bool
    fn: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    attrs: Dict[Tuple[int, ...], list]
    reads: Tuple[str, ...]
    writes: Tuple[str, ...]
    options: Dict[str, object] = field(default_factory=dict)

    def bytes_per_param(self) -> int:
        size = DTYPES[self.dtype].itemsize
        return sum(size if _ELEMENT_SIZE[s] is None else _ELEMENT_SIZE[s] for s in self.reads + self.writes)


def _signature_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _SIG_TYPES[value.dtype]
    if isinstance(value, float):
        return "fp32"
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if abs(value) >= 2 ** 31 else "i32"
    raise TypeError(f"cannot type kernel argument {value!r}")


def _make_bucket(dtype: torch.dtype, saved: bool, misaligned: bool) -> Bucket:
    def tensor(n, dt):
        if misaligned:
            return torch.zeros(n + 1, dtype=dt)[1:]
        return torch.zeros(n, dtype=dt)

    sizes = [5000, 7]
    return Bucket([tensor(n, dtype) for n in sizes], [tensor(n, dtype) for n in sizes],
                  [tensor(n, torch.float32) for n in sizes], [tensor(n, torch.float32) for n in sizes],
                  [tensor(n, dtype) for n in sizes] if saved else None, torch.device("cpu"), dtype, 0)


def _streams_of(kernel: str, constexprs: Dict[str, object]) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """(streams read, streams written) per element, from each kernel's design (see its docstring)."""
    direction = _DIRECTION_NAMES[constexprs["DIRECTION"]]
    saved = constexprs.get("HAS_SAVED")
    # What d is made of: m and v along the momentum, g and v along the gradient, g alone along raw.
    d_inputs = {MOMENTUM: ("m", "v"), GRADIENT: ("g", "v"), RAW: ("g",)}[direction]
    if kernel == "_slope_kernel":  # m_new only enters q along the momentum direction
        return {MOMENTUM: ("g", "m", "v"), GRADIENT: ("g", "v"), RAW: ("g",)}[direction], ()
    moments = () if direction == RAW else ("m", "v")
    if kernel == "_plain_step_kernel":
        return ("w", "g") + moments, ("w",) + moments
    if kernel == "_first_trial_kernel":
        return ("w", "g") + moments, ("w",) + moments + (("saved",) if saved else ())
    if kernel == "_retrial_kernel":
        return (("saved",) if saved else ("w",)) + d_inputs, ("w",)
    if kernel == "_restore_kernel":
        return (("saved",) if saved else ("w",) + d_inputs), ("w",)
    raise KeyError(kernel)


_DIRECTION_NAMES = {triton_backend.K.GRADIENT_DIRECTION: GRADIENT, triton_backend.K.MOMENTUM_DIRECTION: MOMENTUM,
                    triton_backend.K.RAW_DIRECTION: RAW}


def _variant_name(kernel: str, constexprs: Dict[str, object]) -> str:
    """e.g. ``first_trial[copy,gradient,amp]``; the plain step's Adam form has no direction tag."""
    base = kernel.strip("_").replace("_kernel", "")
    tags = []
    if "HAS_SAVED" in constexprs:
        tags.append("copy" if constexprs["HAS_SAVED"] else "inplace")
    direction = _DIRECTION_NAMES[constexprs["DIRECTION"]]
    if base == "plain_step":
        if direction == RAW:
            tags.append(RAW)
    elif not (base == "restore" and constexprs.get("HAS_SAVED")):
        tags.append(direction)
    if constexprs.get("HAS_FOUND_INF") or constexprs.get("HAS_GRAD_SCALE"):
        tags.append("amp")
    if constexprs.get("HAS_STEP_COUNTS"):
        tags.append("counts")
    return base + (f"[{','.join(tags)}]" if tags else "")


def record_variants() -> List[Variant]:
    """Call every backend function the way the optimizer does and record each launch."""
    recorded: Dict[tuple, Variant] = {}
    dtype_name = {}

    def recorder(kernel, tables, launch, *args, **constexprs):
        fn = kernel
        values = [tables.tensor_table, launch.block_table, *args]
        options = {"num_warps": triton_backend.NUM_WARPS, "enable_fp_fusion": False}
        if "maxnreg" in constexprs:  # a compile option passed with the launch, not a kernel argument
            constexprs = dict(constexprs)
            options["maxnreg"] = constexprs.pop("maxnreg")
        constexprs = dict(constexprs, ALIGNED=launch.aligned, BLOCK=launch.block)
        runtime_names = [n for n in fn.arg_names if n not in constexprs]
        assert len(runtime_names) == len(values), (fn.__name__, runtime_names)
        signature = {name: _signature_type(v) for name, v in zip(runtime_names, values)}
        signature.update({name: "constexpr" for name in constexprs})
        attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
                 for name, v in zip(runtime_names, values)
                 if isinstance(v, torch.Tensor) and v.data_ptr() % 16 == 0}
        reads, writes = _streams_of(fn.__name__, constexprs)
        name = _variant_name(fn.__name__, constexprs)
        key = (name, dtype_name["current"], launch.aligned)
        recorded.setdefault(key, Variant(name, dtype_name["current"], launch.aligned, fn, signature, constexprs,
                                         attrs, reads, writes, options))

    hyper = Hyper(0.9, 0.999, 1e-8, 0.1, 0.19, 0.002, 1.0)
    with mock.patch.object(triton_backend, "_launch", recorder):
        for dtype_key, dtype in DTYPES.items():
            dtype_name["current"] = dtype_key
            for misaligned in (False, True):
                for saved in (True, False):
                    bucket = _make_bucket(dtype, saved, misaligned)
                    for direction in (GRADIENT, MOMENTUM, RAW):
                        for scale in (None, torch.ones(())):  # without and with a GradScaler
                            if saved:
                                triton_backend.slope(bucket, PassArgs(hyper, direction=direction, grad_scale=scale))
                            triton_backend.first_trial(bucket, PassArgs(hyper, Move(0.5, decay=0.5), direction, scale))
                            triton_backend.retrial(bucket, PassArgs(hyper, Move(0.4, 0.5, 0.5), direction, scale))
                            triton_backend.restore(bucket, PassArgs(hyper, Move(0.0, 0.4, 0.5), direction, scale))
                bucket = _make_bucket(dtype, False, misaligned)
                loss = torch.zeros(())
                for step_counts, direction in itertools.product(
                        (None, torch.zeros(2, dtype=torch.int64)),  # later buckets, the first
                        (GRADIENT, RAW)):  # Adam's update, or along g
                    count = torch.zeros((), dtype=torch.int64)
                    triton_backend.plain_step(bucket, PassArgs(hyper, Move(0.3, decay=0.3), direction), loss,
                                              nonfinite_count=count, step_counts=step_counts)
                    triton_backend.plain_step(bucket, PassArgs(hyper, Move(0.3, decay=0.3), direction,
                                                               grad_scale=torch.ones(())),
                                              loss, found_inf=torch.zeros(()), nonfinite_count=count,
                                              step_counts=step_counts)
    return list(recorded.values())


_ACCESS = re.compile(r"^\s*(@!?%p\d+\s+)?(ld|st)\.global(\.[a-z0-9_]+)*?(\.v(\d))?\.([bfsu])(\d+)\s")


def global_accesses(ptx: str) -> List[Tuple[bool, int, int]]:
    """(predicated, width in bits, vector lanes) of every ld.global / st.global in the PTX."""
    out = []
    for line in ptx.splitlines():
        match = _ACCESS.match(line)
        if match:
            lanes = int(match.group(5) or 1)
            out.append((match.group(1) is not None, lanes * int(match.group(7)), lanes))
    return out


def vector_bits(accesses: List[Tuple[bool, int, int]], stream_bytes_per_thread: int) -> int:
    """Narrowest width needed to cover the streams' bytes with unpredicated accesses, widest first.

    Scalar 64-bit loads are left out: no stream has 64-bit elements, they are the table's
    pointers. The few scalar 32-bit loads of the block map and flags (at most 20 bytes) are
    counted, well under the bytes of one fp32 stream.
    """
    covered = 0
    unpredicated = [(w, lanes) for predicated, w, lanes in accesses if not predicated and (lanes, w) != (1, 64)]
    for width in sorted({w for w, _ in unpredicated}, reverse=True):
        covered += sum(w // 8 for w, _ in unpredicated if w == width)
        if covered >= stream_bytes_per_thread:
            return width
    return 0


_SASS_ACCESS = re.compile(r"(@!?U?P\w+\s+)?\b(LDG|STG)\.E((?:\.[A-Z0-9_]+)*)")


def sass_accesses(sass: str) -> List[Tuple[bool, int, int]]:
    """(predicated, width in bits, lanes) of every LDG / STG in ``cuobjdump -sass`` output.

    Width from the suffix: ``.128`` (4 lanes of 32 bits), ``.64``, ``.U16``/``.S16``, ``.U8``/``.S8``,
    none = 32 bits. 64-bit accesses count as one lane (the table's pointers), as in the PTX reading.
    """
    out = []
    for match in _SASS_ACCESS.finditer(sass):
        suffixes = set(match.group(3).split("."))
        if "128" in suffixes:
            width, lanes = 128, 4
        elif "64" in suffixes:
            width, lanes = 64, 1
        elif suffixes & {"U16", "S16"}:
            width, lanes = 16, 1
        elif suffixes & {"U8", "S8"}:
            width, lanes = 8, 1
        else:
            width, lanes = 32, 1
        out.append((match.group(1) is not None, width, lanes))
    return out


def _cuobjdump() -> Optional[str]:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def read_sass(cubin: bytes) -> Optional[str]:
    """The SASS of a cubin (``cuobjdump -sass``), None without a cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        result = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"cuobjdump failed:\n{result.stderr}")
    return result.stdout


def cubin_usage(cubin: bytes) -> Tuple[int, int]:
    """(registers, stack frame bytes) the cubin declares (``cuobjdump -res-usage``). These kernels
    have no local arrays and make no calls, so a stack frame is spill space."""
    tool = _cuobjdump()
    if tool is None:
        raise FileNotFoundError("no cuobjdump (Triton's NVIDIA backend bundles one) to read the cubin with")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        result = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True)
    match = re.search(r"REG:(\d+) STACK:(\d+)", result.stdout)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"cuobjdump -res-usage failed:\n{result.stdout}{result.stderr}")
    return int(match.group(1)), int(match.group(2))


def _options_for(variant: Variant, capability: int) -> Dict[str, object]:
    """The compile options the backend launches this variant with on ``capability``: the
    recorded ones (from CPU buckets), with the plain step's per-capability register cap."""
    options = {k: v for k, v in variant.options.items() if k != "maxnreg"}
    if variant.fn is getattr(triton_backend.K, "_plain_step_kernel", None):
        cap = triton_backend.plain_step_maxnreg(triton_backend._triton_dtype(DTYPES[variant.dtype]),
                                                variant.aligned, capability)
        if cap is not None:
            options["maxnreg"] = cap
    return options


def audit_variant(variant: Variant, target: str) -> dict:
    capability = TARGETS[target]
    source = triton_kernel_source(variant.fn, variant.signature, variant.constexprs, variant.attrs)
    options = _options_for(variant, capability)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    ptx = compiled.asm["ptx"]
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    registers, stack_bytes = cubin_usage(compiled.asm["cubin"])
    threads = 32 * options["num_warps"]
    elements_per_thread = variant.constexprs["BLOCK"] // threads
    bytes_per_param = variant.bytes_per_param()
    accesses = global_accesses(ptx)
    wide_bytes = sum(w // 8 for predicated, w, _ in accesses if not predicated and w == 128)
    # The SASS is read where the audit checks it, the aligned path (one cuobjdump per cubin, about
    # 0.9 s of CPU each: half the audit's time when the unaligned path was read too).
    sass = read_sass(compiled.asm["cubin"]) if variant.aligned and "cubin" in compiled.asm else None
    sass_access = sass_accesses(sass) if sass is not None else None
    sass_wide = (sum(w // 8 for predicated, w, _ in sass_access if not predicated and w == 128)
                 if sass_access is not None else None)
    return {
        "kernel": variant.kernel_name,
        "target": arch,
        "dtype": variant.dtype,
        "registers": registers,
        "stack_bytes": stack_bytes,
        "vector_bits": vector_bits(accesses, elements_per_thread * bytes_per_param),
        "bytes_per_param": bytes_per_param,
        "aligned": variant.aligned,
        "bytes_per_param_ptx": wide_bytes / elements_per_thread if variant.aligned else None,
        "sass_vector_bits": (vector_bits(sass_access, elements_per_thread * bytes_per_param)
                             if sass_access is not None else None),
        "bytes_per_param_sass": (sass_wide / elements_per_thread
                                 if sass_wide is not None and variant.aligned else None),
        "maxnreg": options.get("maxnreg"),
        "blocks_per_sm": blocks_per_sm(registers, threads),
        "streams_read": list(variant.reads),
        "streams_written": list(variant.writes),
        "block": variant.constexprs["BLOCK"],
        "num_warps": options["num_warps"],
        "triton": triton.__version__,
    }


@functools.lru_cache(maxsize=None)
def _variants_in_worker() -> Tuple[Variant, ...]:
    return tuple(record_variants())


def _audit_job(job: Tuple[int, str]) -> dict:
    index, target = job
    return audit_variant(_variants_in_worker()[index], target)


def covering_jobs(variants: List[Variant]) -> List[Tuple[int, str]]:
    """Three (variant index, target) jobs per kernel, one per dtype, on three of the four
    (target, alignment) pairs, the pairs rotating from kernel to kernel: every kernel is compiled
    in every dtype, on both targets, aligned and not, and each (target, alignment, dtype) recurs
    across kernels. A change confined to the one (target, alignment) pair a kernel's dtype was not
    sampled on shows only in the full audit."""
    # any three consecutive pairs (cyclically) hold both targets and both alignments
    pairs = [("sm_80", True), ("sm_90a", False), ("sm_80", False), ("sm_90a", True)]
    index = {(v.kernel_name, v.dtype, v.aligned): i for i, v in enumerate(variants)}
    names = list(dict.fromkeys(v.kernel_name for v in variants))
    jobs = []
    for k, name in enumerate(names):
        for j, dtype in enumerate(DTYPES):
            target, aligned = pairs[(k + j) % len(pairs)]
            jobs.append((index[(name, dtype, aligned)], target))
    return jobs


def run_audit(workers: Optional[int] = None, sample: bool = False) -> List[dict]:
    """Records for every (variant, target), in a stable order; ``sample``: only the
    ``covering_jobs`` (a quarter of them)."""
    variants = record_variants()
    jobs = ([(i, target) for i in range(len(variants)) for target in TARGETS] if not sample
            else covering_jobs(variants))
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        return [audit_variant(variants[i], target) for i, target in jobs]
    # spawn, not fork: a forked child of a process that has run torch and triton can deadlock.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_audit_job, jobs))


def blocks_per_sm(registers: int, threads: int, registers_per_sm: int = 65536) -> int:
    """Resident blocks per SM allowed by registers (sm_80/sm_90: 64K registers, allocated per
    warp in units of 256, i.e. per-thread counts rounded up to a multiple of 8)."""
    per_warp = -(-registers * 32 // 256) * 256
    return registers_per_sm // (per_warp * (threads // 32))


def problems(records: List[dict]) -> List[str]:
    """What fails the audit: spills, a narrow main stream on sm_90a's aligned path, bytes over budget."""
    found = []
    for r in records:
        where = f"{r['kernel']} {r['target']} {r['dtype']} {'aligned' if r['aligned'] else 'unaligned'}"
        if r["stack_bytes"]:
            found.append(f"{where}: a {r['stack_bytes']}-byte stack frame (spills)")
        if r["aligned"] and r["target"] == "sm_90a" and r["vector_bits"] < 128:
            found.append(f"{where}: main streams need {r['vector_bits']}-bit accesses, not 128")
        if (r["aligned"] and r["target"] == "sm_90a" and r.get("sass_vector_bits") is not None
                and r["sass_vector_bits"] < 128):
            found.append(f"{where}: the SASS moves the main streams in {r['sass_vector_bits']}-bit accesses")
        if r["aligned"] and r.get("bytes_per_param_sass") not in (None, r["bytes_per_param"]):
            found.append(f"{where}: 128-bit SASS traffic is {r['bytes_per_param_sass']} B/param, "
                         f"design says {r['bytes_per_param']}")
        if r["aligned"] and r["bytes_per_param_ptx"] != r["bytes_per_param"]:
            found.append(f"{where}: 128-bit traffic is {r['bytes_per_param_ptx']} B/param, "
                         f"design says {r['bytes_per_param']}")
        budget = FP32_BUDGET.get(r["kernel"].split("[")[0])
        if r["dtype"] == "fp32" and budget is not None and r["bytes_per_param"] > budget:
            found.append(f"{where}: {r['bytes_per_param']} B/param over the SPEC budget of {budget}")
    return found


def to_markdown(records: List[dict]) -> str:
    lines = [
        "# Kernel audit (ahead-of-time, no GPU)",
        "",
        f"triton {triton.__version__}, BLOCK {triton_backend.BLOCK} ({triton_backend.UNALIGNED_BLOCK} on the unaligned path), num_warps {triton_backend.NUM_WARPS}, "
        "fp fusion off. Registers and stack frame (spill space) as the cubin Triton built declares them (`cuobjdump -res-usage`); vector_bits is the narrowest "
        "access width the main streams need on the full-block path; bytes/param from the streams each "
        "kernel reads and writes (checked against the 128-bit traffic of the aligned PTX). "
        "Generated by `python -m benchmarks.kernel_audit`.",
        "",
        "| kernel | target | dtype | path | registers | blocks/SM (8 warps) | stack bytes | vector bits (PTX/SASS) "
        "| bytes/param |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(f"| {r['kernel']} | {r['target']} | {r['dtype']} | {'aligned' if r['aligned'] else 'unaligned'} "
                     f"| {r['registers']} | {r['blocks_per_sm']} | {r['stack_bytes']} | {r['vector_bits']}/"
                     f"{r['sass_vector_bits'] if r['sass_vector_bits'] is not None else '-'} | {r['bytes_per_param']} |")
    found = problems(records)
    lines += ["", "Problems: " + ("none." if not found else ""), *[f"- {p}" for p in found], ""]
    return "\n".join(lines)


def write(records: List[dict], found: List[str], out_dir: Path) -> None:
    """Append this run (its environment and records) to ``kernel_audit.json``; ``kernel_audit.md``
    gets every run's summary line and this run's table."""
    from benchmarks import _common as C

    env = {**C.environment("cpu"), "device": f"none: compiled ahead of time for {', '.join(TARGETS)}"}
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "kernel_audit.json"
    old = C.read_json(json_path) if json_path.exists() else {"runs": []}
    runs = old["runs"] if isinstance(old, dict) else [{"environment": {}, "records": old}]  # before appending
    runs.append({"environment": env, "problems": found, "records": records})
    json_path.write_text(json.dumps({"runs": runs}) + "\n")
    history = C.markdown_table(
        ["date", "commit", "triton", "records", "problems", "max registers"],
        [[run["environment"].get("date", "(before dates were kept)"), run["environment"].get("git_commit", "-"),
          run["environment"].get("triton", "-"), len(run["records"]), len(run.get("problems", [])),
          max((r["registers"] for r in run["records"]), default=0)] for run in runs])
    (out_dir / "kernel_audit.md").write_text(
        f"{to_markdown(records)}\n## Every run (kernel_audit.json)\n\n{history}"
        f"\nThis run: {env['date']}, commit {env['git_commit']}, triton {env['triton']}, torch {env['torch']}.\n")


def main(argv=None) -> int:
    from benchmarks import _common as C

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the records as JSON; write no files")
    parser.add_argument("--sample", action="store_true",
                        help="compile only a covering sample (every kernel in every dtype, on both targets, aligned "
                             "and not): what the tests check the committed audit against; implies --json")
    parser.add_argument("--out-dir", type=C.output_dir, default=None,
                        help="where kernel_audit.{json,md} are written (default: benchmarks/results)")
    args = parser.parse_args(argv)
    if args.out_dir is not None and (args.sample or args.json):
        parser.error("--out-dir with --sample or --json: those print the records as JSON and write no files")
    args.out_dir = args.out_dir or RESULTS
    records = run_audit(sample=args.sample)
    if args.sample:
        args.json = True
    if args.json:
        json.dump(records, sys.stdout)
        return 0
    found = problems(records)
    write(records, found, args.out_dir)
    print(f"{len(records)} records, {len(found)} problems; wrote {args.out_dir / 'kernel_audit.json'}")
    for p in found:
        print("  " + p)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
