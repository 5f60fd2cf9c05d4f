"""Shared helpers of the benchmarks: tensor lists, timing, environment, results files.

Every benchmark appends one *run* to ``benchmarks/results/<name>.json`` (``{"runs": [...]}``,
each run the environment, a summary and one row per measurement: kernel, provider, size,
p20/p50/p80 in milliseconds, device name, versions, commit, date, command) and one section
to ``<name>.md`` (a table for people); earlier runs are kept. :func:`latest_run` reads the
newest. Figures that need a GPU and were not taken say so (:data:`NOT_MEASURED`); nothing is
ever filled in.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NOT_MEASURED = "not measured: no GPU"

Shape = Tuple[int, ...]


# ---------------------------------------------------------------------------- tensor lists
def gpt2_small_shapes(scale: float = 1.0, n_layer: int = 12, d_model: int = 768,
                      vocab: int = 50257, context: int = 1024) -> List[Shape]:
    """The parameter shapes of GPT-2 small (tied embedding): 148 tensors, 124,439,808 elements.

    ``wte, wpe``, then per layer ``ln_1 (w, b), c_attn (w, b), attn c_proj (w, b),
    ln_2 (w, b), c_fc (w, b), mlp c_proj (w, b)``, then ``ln_f (w, b)``. ``scale`` multiplies
    every tensor's leading dimension (rounded, at least 1): the tensor count and the mix of
    large and small tensors stay, the element count scales by about ``scale``.
    """
    d, h = d_model, 4 * d_model
    layer = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, h), (h,), (h, d), (d,)]
    shapes = [(vocab, d), (context, d)] + layer * n_layer + [(d,), (d,)]
    if scale == 1.0:
        return shapes
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return [(max(1, round(s[0] * scale)),) + tuple(s[1:]) for s in shapes]


def flat_shapes(numel: int, n_tensors: int = 1) -> List[Shape]:
    """``n_tensors`` 1-D tensors of about equal size totalling ``numel`` elements."""
    base, extra = divmod(numel, n_tensors)
    return [(base + (1 if i < extra else 0),) for i in range(n_tensors)]


def numel_of(shapes: Sequence[Shape]) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def make_params(shapes: Sequence[Shape], dtype: torch.dtype, device, seed: int = 0,
                grads: Optional[List[torch.Tensor]] = None) -> List[torch.nn.Parameter]:
    """Leaf parameters (N(0, 0.02)) with gradients (N(0, 1e-3), or the given tensors, shared)."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        p = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(device=device, dtype=dtype))
        p.grad = grads[i] if grads is not None else (
            torch.randn(shape, generator=generator) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params


# ---------------------------------------------------------------------------- models and checks
def two_group_mlp(device, dtype, seed: int = 0, width: int = 256):
    """An MLP in two param groups (two buckets) with its data: ``(model, groups, loss_fn)``.
    ``width`` 256 on a GPU, 16 in smoke forms (the Triton interpreter runs every launch element
    by element). Used by the GPU stages and tests/test_cuda.py."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.GELU(), torch.nn.Linear(width, 10))
    model = model.to(device=device, dtype=dtype)
    x = torch.randn(128, 64, device=device, dtype=dtype)
    y = torch.randint(0, 10, (128,), device=device)
    groups = [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.01},
              {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0}]
    return model, groups, lambda: torch.nn.functional.cross_entropy(model(x).float(), y)


def make_next_step_plain(optimizer) -> None:
    """Make the next step of a FusedSaLSa a plain step: past the always-search steps, the
    interval at its maximum (``eta_fast == eta_slow``) and not yet due."""
    state = optimizer.search_state
    state.steps_since_search = 0
    state.step = max(state.step, optimizer.search_config.always_search_steps + 1)
    state.step_size_fast = state.step_size_slow = 1.0
    optimizer._commit(state)


@contextlib.contextmanager
def sync_debug_error(device: torch.device):
    """Any host synchronization inside the block raises (CUDA); a no-op on the CPU."""
    if device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


# ---------------------------------------------------------------------------- timing
def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device, inner: int = 1) -> float:
    """Seconds per call of ``fn``, averaged over ``inner`` back-to-back calls.

    CUDA: events around the calls (device time, launches queued back to back);
    elsewhere: the wall clock.
    """
    device = torch.device(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    began = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - began) / inner


def interleaved(fns: Dict[str, Callable[[], object]], device, repeats: int, warmup: int = 1,
                inner: int = 1) -> Dict[str, List[float]]:
    """Time every provider ``repeats`` times, one round at a time, in a rotating order.

    Interleaving spreads slow drifts (frequency, other processes) over all providers,
    so ratios of medians are fair even on a noisy machine. Returns seconds per call.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(time_once(fns[name], device, inner))
    return samples


def quantiles_ms(samples: Sequence[float]) -> Dict[str, float]:
    """p20, p50, p80 of ``samples`` (seconds) in milliseconds."""
    ordered = sorted(samples)
    if len(ordered) == 1:
        value = ordered[0] * 1e3
        return {"p20_ms": value, "p50_ms": value, "p80_ms": value}
    cuts = statistics.quantiles(ordered, n=10, method="inclusive")
    return {"p20_ms": cuts[1] * 1e3, "p50_ms": statistics.median(ordered) * 1e3, "p80_ms": cuts[7] * 1e3}


# ---------------------------------------------------------------------------- environment
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_fingerprint(cpuinfo: Optional[str] = None) -> str:
    """What sets a CPU run's last bits besides the code and the thread count: the CPU's ``family/model/stepping``
    and microcode (``/proc/cpuinfo``, or the text ``cpuinfo``; its model name can be masked, "AMD EPYC" on two
    machines whose runs differ), torch's CPU dispatch level, and a digest of the feature flags, as one line. On
    Arm Linux the implementer/part/variant/revision and the "Features" line stand in; without ``/proc/cpuinfo``
    (macOS, Windows) only ``platform.processor()`` and torch's dispatch level are read, which may not tell two
    machines apart. Quality NOTES section 74: runs under different fingerprints need not agree bit for bit."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    x86 = ("cpu family", "model", "stepping")
    arm = ("CPU implementer", "CPU part", "CPU variant", "CPU revision")
    fields: Dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in (*x86, *arm, "microcode", "flags", "Features") and key not in fields:
            fields[key] = value.strip()
    dispatch = f"torch dispatch {torch.backends.cpu.get_cpu_capability()}"
    if not fields:
        return f"processor {platform.processor() or platform.machine() or '?'} (no /proc/cpuinfo), {dispatch}"
    flags = " ".join(sorted(fields.get("flags", fields.get("Features", "")).split()))
    digest = hashlib.sha1(flags.encode()).hexdigest()[:12] if flags else "?"
    if "cpu family" not in fields and "CPU part" in fields:
        ids = "implementer/part/variant/revision " + "/".join(fields.get(k, "?") for k in arm)
    else:
        ids = "family/model/stepping " + "/".join(fields.get(k, "?") for k in x86)
    return f"{ids}, microcode {fields.get('microcode', '?')}, {dispatch}, flags sha1 {digest}"


def device_name(device, threads: Optional[int] = None) -> str:
    """The GPU's name, or the CPU's with its cores and the torch threads the measurement ran on
    (``threads``: where those were another process's, e.g. a spawned worker's; else this one's)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads() if threads is None else threads
    return f"{_cpu_name()} ({os.cpu_count()} cores, {threads} torch threads)"


#: Where measurements are appended: a run that adds rows there leaves the code as committed.
RESULT_DIRECTORIES = ("benchmarks/results", "benchmarks/quality/results")


def git_commit(root: Optional[str] = None) -> str:
    """HEAD's short hash in ``root`` (this checkout), with ``+dirty`` when files outside the result
    directories differ from it, untracked ones included (a benchmark run before its script's first
    commit measured code that commit does not hold); without git (a borrowed machine gets the files, not
    ``.git``), ``SALSA_FUSED_COMMIT`` as the caller gave it, else "unknown"."""
    root = root or Path(__file__).resolve().parents[1]

    def git(*args) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "--short=12", "HEAD") or os.environ.get("SALSA_FUSED_COMMIT", "").strip() or "unknown"
    if commit != "unknown" and git("status", "--porcelain", "--untracked-files=normal", "--", ".",
                                   *(f":(exclude){path}" for path in RESULT_DIRECTORIES)):
        commit += "+dirty"
    return commit


def command_line() -> str:
    """This process's command as one would type it again: ``python -m benchmarks.kernel_bench --tiny``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:  # started with -m
        launcher = ["-m", spec.name.removesuffix(".__main__")]
    else:
        launcher = sys.argv[:1]
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *launcher, *sys.argv[1:]])


def environment(device, threads: Optional[int] = None) -> Dict[str, str]:
    """Where and how a result was measured (``threads``: as :func:`device_name`)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "device": device_name(device, threads),
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "git_commit": git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "cpu": cpu_fingerprint(),
    }


# ---------------------------------------------------------------------------- results
@dataclass
class Row:
    """One measurement: a kernel (or step) by a provider on a size; times in ms."""

    kernel: str
    provider: str
    size: str
    numel: int = 0
    dtype: str = ""
    p20_ms: Optional[float] = None
    p50_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    extra: Dict[str, object] = field(default_factory=dict)
    note: str = ""


def row_from_samples(kernel: str, provider: str, size: str, samples: Sequence[float], **kwargs) -> Row:
    return Row(kernel=kernel, provider=provider, size=size, **quantiles_ms(samples), **kwargs)


def read_json(json_path: Path):
    """A results file's JSON; ValueError naming the file when it does not parse (damaged, cut short)."""
    try:
        return json.loads(Path(json_path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{json_path} is not a results file: {error}") from None


def read_runs(json_path: Path) -> List[dict]:
    """The runs recorded in a results file (none when it does not exist). A file from before
    results were appended (one run at the top level) reads as that one run. ValueError naming
    the file when it is not a results file."""
    json_path = Path(json_path)
    if not json_path.exists():
        return []
    data = read_json(json_path)
    if not isinstance(data, dict):
        raise ValueError(f"{json_path} is not a results file: a JSON {type(data).__name__}, not an object")
    if "runs" in data:
        return data["runs"]
    return [data]


def latest_run(json_path: Path) -> dict:
    """The newest run of a results file: ``{"environment", "summary", "rows"}``."""
    runs = read_runs(json_path)
    if not runs:
        raise FileNotFoundError(f"no results recorded in {json_path}")
    return runs[-1]


def write_results(name: str, rows: Sequence[Row], env: Dict[str, str], markdown: str,
                  out_dir: Optional[Path] = None, summary: Optional[dict] = None) -> Tuple[Path, Path]:
    """Append this run to ``<name>.json`` (environment, summary, rows with the environment in
    each; earlier runs kept) and its table, headed by device, versions, date and commit, to
    ``<name>.md``; returns both paths."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [{**asdict(r), "device": env["device"], "torch": env["torch"], "triton": env["triton"],
                "cuda": env["cuda"], "python": env.get("python", ""), "date": env["date"], "command": env["command"],
                "git_commit": env.get("git_commit", ""), "cpu": env.get("cpu", "")} for r in rows]
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    runs = read_runs(json_path) + [{"environment": env, "summary": summary or {}, "rows": records}]
    json_path.write_text(json.dumps({"runs": runs}, indent=1, default=str) + "\n", encoding="utf-8")
    section = (f"## {env['date']}, commit {env['git_commit']}\n\n"
               f"<!-- generated by {env['command']} -->\n\n"
               f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}.\n\n"
               + markdown.rstrip() + "\n")
    if md_path.exists():  # kept even where its .json is gone: a table is never overwritten
        earlier = md_path.read_text(encoding="utf-8").rstrip()
        if not earlier.startswith(f"# {name}"):  # a file from before results were appended
            earlier = f"# {name}: every run, oldest first\n\n## (earlier run)\n\n{earlier}"
        md_path.write_text(earlier + "\n\n" + section, encoding="utf-8")
    else:
        md_path.write_text(f"# {name}: every run, oldest first\n\n{section}", encoding="utf-8")
    return json_path, md_path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def device(text: str) -> torch.device:
    """``--device``: ``cpu``, or ``cuda``/``cuda:N`` where torch sees that device (a CPU-only torch ended in
    torch's own AssertionError, deep in the first tensor made there)."""
    try:
        chosen = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if chosen.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if chosen.type == "cuda" and not (torch.cuda.is_available()
                                      and (chosen.index or 0) < torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(
            f"{text}: no such CUDA device here (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none'}, {torch.cuda.device_count()} device(s) seen)")
    return chosen


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ensure_triton_interpreter_without_cuda() -> None:
    """Let the triton backend run on the CPU (its interpreter) when no GPU is present.

    Must run before triton is imported; a no-op when CUDA is available or already set.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def append_jsonl(path, record: dict) -> None:
    """Append one JSON record as a line and flush it: a run cut short keeps every finished row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def name_pairs(items: Sequence[str], form: str = "NAME=AS") -> Dict[str, str]:
    """``["a=b", "c=d"]`` -> ``{"a": "b", "c": "d"}`` (a command's renames or aliases); ValueError
    naming ``form`` on an item without ``=`` or with an empty side."""
    pairs = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise ValueError(f"expected {form}, got {item!r}")
        pairs[old] = new
    return pairs


# ---------------------------------------------------------------------------- command lines
# argparse types: a bad value is refused by the parser (exit 2, the flag and the value named)
# before anything is measured or written.
def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = int_at_least(1)


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def comma_list(text: str) -> List[str]:
    """An argparse type: ``a,b,c`` as a list, at least one name."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}, which names none")
    return items


def _path(text: str) -> Path:
    if not text.strip():  # `--out "$OUT"` with OUT unset would resolve to the working directory
        raise argparse.ArgumentTypeError(f"an empty path ({text!r}): is the shell variable given unset, e.g. $OUT?")
    return Path(text)


def output_dir(text: str) -> Path:
    """An argparse type: a directory to write into, existing or not, but not a file."""
    path = _path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a directory")
    return path


def output_file(text: str) -> Path:
    """An argparse type: a file to append to, existing or not, but not a directory."""
    path = _path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file")
    return path


def results_readable(parser: argparse.ArgumentParser, json_path: Path) -> None:
    """Refuse (``parser.error``) a results file the run would append to that cannot be read:
    before measuring, so that no run is lost."""
    try:
        read_runs(json_path)
    except ValueError as error:
        parser.error(str(error))
