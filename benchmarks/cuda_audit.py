"""Static audit of the CUDA kernels (csrc/cuda/), compiled by nvcc without torch.

Compiles csrc/cuda/audit_kernels.cu (every kernel for fp32, bf16 and fp16 weights) for
each architecture with ``-Xptxas -v`` and reads, per kernel: registers, spill bytes and
stack frame (ptxas), and from the SASS (``cuobjdump -sass``) the global accesses by width.
The vectorized path of a kernel moves each stream as 128-bit accesses (two per fp32
stream and pack of 8 elements, one per 16-bit stream), so the 128-bit loads and stores
in the SASS give the bytes per parameter the kernel moves; they are checked against the
design's budget (SPEC section 2): plain step 28, first trial 32 (with the saved copy),
retrial 16, restore 8 from the copy + 16 in place, slope 8 (gradient) / 12 (momentum), in
fp32; along the raw gradient (no moments) plain step 12, first trial 16, retrial 12, restore
8 + 12, slope 4. Results go to ``results/cuda_audit.{json,md}`` (appended as runs to the JSON).

    python -m benchmarks.cuda_audit [--arch sm_80 sm_90a]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "cuda" / "audit_kernels.cu"
RESULTS = Path(__file__).resolve().parent / "results"
# The extension's own nvcc flags (read as setup.py reads them: the file alone, no torch import).
NVCC_FLAGS = runpy.run_path(str(ROOT / "salsa_fused" / "_build_flags.py"))["NVCC_FLAGS"]
PACK = 8  # csrc/cuda/multi_tensor.cuh: elements per thread and step
ELEMENT_BYTES = {"float": 4, "salsa::bf16_bits": 2, "salsa::fp16_bits": 2}
# salsa::Direction (csrc/salsa_math.h) by its value, as c++filt prints a template argument.
DIRECTIONS = {"(salsa::Direction)0": "gradient", "(salsa::Direction)1": "momentum", "(salsa::Direction)2": "raw"}


def find_tool(name: str) -> Optional[str]:
    """nvcc / cuobjdump on PATH or under CUDA_HOME; cuobjdump also ships inside Triton's wheel."""
    found = shutil.which(name)
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / name).exists():
            return str(Path(root) / "bin" / name)
    try:
        import triton
        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    return None


def _demangle(names: List[str]) -> Dict[str, str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


def parse_ptxas(log: str) -> Dict[str, dict]:
    """Registers, spills, stack per mangled kernel name from ``-Xptxas -v`` output."""
    kernels, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = m.group(1)
            kernels[current] = {}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                    spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[current]["registers"] = int(m.group(1))
    return kernels


def parse_sass(sass: str) -> Dict[str, Dict[str, int]]:
    """Global/generic memory instructions by kind and width, per mangled kernel name."""
    counts = {}
    for part in re.split(r"\n\s*Function : ", sass)[1:]:
        name = part.split("\n", 1)[0].strip()
        c: Dict[str, int] = {}
        for m in re.finditer(r"\s(LDG|STG|LD|ST)\.E((?:\.[A-Z0-9]+)*)\s", part):
            suffixes = [s for s in m.group(2).split(".") if s in ("128", "64", "U16", "U8", "S16")]
            key = m.group(1) + ("." + suffixes[0] if suffixes else ".32")
            c[key] = c.get(key, 0) + 1
        counts[name] = c
    return counts


def expected_vector_accesses(kernel: str, w_bytes: int, g_bytes: int, direction: str) -> Dict[str, int]:
    """128-bit loads and stores of a kernel's vectorized path (the design's streams)."""
    def n(element_bytes):  # 128-bit accesses per pack of one stream
        return element_bytes * PACK // 16
    moments = 0 if direction == "raw" else 2 * n(4)  # m and v, read and written (not along raw)
    if kernel == "plain_step_kernel":
        return {"loads": n(w_bytes) + n(g_bytes) + moments, "stores": n(w_bytes) + moments}
    if kernel == "first_trial_kernel":
        return {"loads": n(w_bytes) + n(g_bytes) + moments, "stores": 2 * n(w_bytes) + moments}
    # What d reads: v and m (momentum), v and g (gradient), g (raw).
    d_loads = {"momentum": 2 * n(4), "gradient": n(4) + n(g_bytes), "raw": n(g_bytes)}[direction]
    if kernel == "retrial_kernel":  # d's streams, saved-or-w (one load site); w
        return {"loads": d_loads + n(w_bytes), "stores": n(w_bytes)}
    if kernel == "restore_kernel":  # copy path: saved -> w;  in place: d's streams, w -> w
        return {"loads": n(w_bytes) + d_loads + n(w_bytes), "stores": 2 * n(w_bytes)}
    if kernel == "slope_kernel":
        return {"loads": {"momentum": n(g_bytes) + 2 * n(4), "gradient": n(g_bytes) + n(4),
                          "raw": n(g_bytes)}[direction], "stores": 0}
    return {}


def _describe(demangled: str):
    """(kernel, W, G, direction) from e.g.
    'void salsa_cuda::retrial_kernel<float, float, (salsa::Direction)1>(...)' (direction "momentum")."""
    m = re.search(r"salsa_cuda::(\w+)<(.*)>\(", demangled)
    if not m:
        return re.search(r"salsa_cuda::(\w+)", demangled).group(1), None, None, None
    kernel, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
    direction = DIRECTIONS[args[-1]]
    if kernel == "slope_kernel":
        return kernel, None, args[0], direction
    return kernel, args[0], args[1], direction


def audit_arch(arch: str, nvcc: str, cuobjdump: Optional[str], workdir: Path) -> dict:
    cubin = workdir / f"audit_{arch}.cubin"
    began = time.perf_counter()
    proc = subprocess.run([nvcc, *NVCC_FLAGS, f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-o", str(cubin),
                           str(SOURCE)], capture_output=True, text=True)
    compile_s = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed for {arch}:\n{proc.stderr[-4000:]}")
    ptxas = parse_ptxas(proc.stderr + proc.stdout)
    sass = {}
    if cuobjdump is not None:
        sass = parse_sass(subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                                         check=True).stdout)
    names = _demangle(sorted(ptxas))
    kernels = []
    for mangled, info in sorted(ptxas.items(), key=lambda kv: names[kv[0]]):
        kernel, w, g, direction = _describe(names[mangled])
        access = sass.get(mangled, {})
        row = {"kernel": kernel, "weight": w, "grad": g, "direction": direction, **info, "sass": access}
        if g is not None and cuobjdump is not None:
            expected = expected_vector_accesses(kernel, ELEMENT_BYTES.get(w, 4), ELEMENT_BYTES[g], direction)
            loads = access.get("LDG.128", 0) + access.get("LD.128", 0)
            stores = access.get("STG.128", 0) + access.get("ST.128", 0)
            row.update(vector_loads=loads, vector_stores=stores, expected_vector_loads=expected["loads"],
                       expected_vector_stores=expected["stores"],
                       vector_bytes_per_param=16 * (loads + stores) / PACK)
        kernels.append(row)
    return {"arch": arch, "compile_s": compile_s, "kernels": kernels}


def run(archs: List[str]) -> dict:
    from benchmarks import _common as C  # here, not at the top: importing this module needs no torch

    nvcc = find_tool("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (PATH, CUDA_HOME)")
    cuobjdump = find_tool("cuobjdump")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    with tempfile.TemporaryDirectory() as tmp:
        results = [audit_arch(arch, nvcc, cuobjdump, Path(tmp)) for arch in archs]
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "nvcc": version, "cuobjdump": cuobjdump or "not found (no SASS widths)",
            "git_commit": C.git_commit(), "archs": results}


def write(record: dict, out_dir: Path = RESULTS) -> None:
    from benchmarks import _common as C

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "cuda_audit.json"
    runs = C.read_runs(json_path) + [record]
    json_path.write_text(json.dumps({"runs": runs}, indent=1) + "\n", encoding="utf-8")
    command = " ".join(["python -m benchmarks.cuda_audit", *map(shlex.quote, sys.argv[1:])]).strip()
    lines = [f"<!-- generated by {command} -->\n",  # as one types it again, not this machine's path
             f"# CUDA kernel audit (csrc/cuda/, nvcc without torch)\n",
             f"{record['nvcc']}; {record['date']}; commit {record['git_commit']}. Flags: {' '.join(NVCC_FLAGS)}. "
             "Vector B/param: bytes the 128-bit accesses of the vectorized path move per element "
             "(restore: its copy path and in-place path together).\n"]
    for arch in record["archs"]:
        lines.append(f"\n## {arch['arch']} (compile {arch['compile_s']:.1f} s)\n")
        lines.append("| kernel | weight | grad | direction | registers | spills (st/ld B) | stack B | "
                     "128-bit ld/st (expected) | vector B/param | other accesses |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for k in arch["kernels"]:
            other = ", ".join(f"{key} {v}" for key, v in sorted(k["sass"].items()) if not key.endswith(".128"))
            vector = (f"{k['vector_loads']}/{k['vector_stores']} ({k['expected_vector_loads']}/"
                      f"{k['expected_vector_stores']})" if "vector_loads" in k else "-")
            per_param = f"{k['vector_bytes_per_param']:g}" if "vector_loads" in k else "-"
            lines.append(f"| {k['kernel']} | {k['weight'] or '-'} | {k['grad'] or '-'} | {k['direction'] or '-'} | "
                         f"{k.get('registers')} | {k.get('spill_stores')}/{k.get('spill_loads')} | {k.get('stack')} | "
                         f"{vector} | {per_param} | {other} |")
    (out_dir / "cuda_audit.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None) -> None:
    from benchmarks import _common as C

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["sm_80", "sm_90a"])
    parser.add_argument("--out-dir", type=C.output_dir, default=RESULTS)
    args = parser.parse_args(argv)
    C.results_readable(parser, args.out_dir / "cuda_audit.json")
    record = run(args.arch)
    write(record, args.out_dir)
    for arch in record["archs"]:
        worst = max(arch["kernels"], key=lambda k: k.get("registers", 0))
        spills = sum(k.get("spill_stores", 0) + k.get("spill_loads", 0) for k in arch["kernels"])
        print(f"{arch['arch']}: {len(arch['kernels'])} kernels, max {worst.get('registers')} registers "
              f"({worst['kernel']}), {spills} spill bytes, compiled in {arch['compile_s']:.1f} s")


if __name__ == "__main__":
    main()
