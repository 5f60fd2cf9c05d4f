"""Training-level timings: a GPT-2-small-shaped decoder on random tokens.

Optimizers: fused AdamW, the published SaLSa (``salsa-optimizer`` 0.1.0, ``SaLSA``),
FusedSaLSa with each restore strategy, and the recommended preset (``presets.recommended``
for the run's length: it searches only in the first 20% of the steps, so steps 1000-2000
time its steady state, plain steps only). Per optimizer: mean step time over steps 1-200
and over steps 1000-2000 (the adaptive interval reaches 10 only near step 900), peak
memory, forward evaluations per step, searches and backtracks, and per-step times and
step sizes (for ``plot_results.py``). Same model initialization and batches for all.

GPU default: GPT-2 small (12 layers, 768 wide, 12 heads, vocabulary 50257, tied
embedding; 124.4M parameters), B=8, T=512, bf16 autocast, 2000 steps. ``--tiny`` runs
the same code on the CPU with a tiny model and a few steps (the smoke test); its
figures are marked as not GPU figures.

    python -m benchmarks.train_bench                 # GPU
    python -m benchmarks.train_bench --device cpu --tiny
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch

from benchmarks import _common as C
from examples.gpt import GPT, GPTConfig
from salsa_fused import FusedSaLSa, presets

OPTIMIZERS = ("adamw_fused", "salsa_published", "fused_salsa_copy", "fused_salsa_inplace",
              "fused_salsa_recommended")
WINDOWS = ((1, 200), (1000, 2000))


def gpt2_small_config(tiny: bool) -> Tuple[GPTConfig, int, int]:
    """(config, batch, context)."""
    if tiny:
        return GPTConfig(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_embd=32), 2, 32
    return GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768), 8, 512


class StepTimer:
    """Per-step times without a sync per step (CUDA events, read at the end)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_seconds(self) -> List[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def forward_ms(loss_of, steps: int, device: torch.device, repeats: int = 10) -> float:
    """Median time of one trial forward as the search runs it (no grad), on the run's batches."""
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            start = time.perf_counter()
            loss_of(i % steps)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


@dataclass
class TrainingRun:
    """One optimizer on the benchmark's model and batches: ``one_step(i)`` runs step i."""
    name: str
    opt: object
    loss_of: Callable[[int], torch.Tensor]
    one_step: Callable[[int], None]
    losses: List[torch.Tensor] = field(default_factory=list)  # each step's loss, read at the end (no sync)
    step_sizes: List[float] = field(default_factory=list)
    forwards_so_far: List[int] = field(default_factory=list)  # FusedSaLSa's forward count after each step


def prepare(name: str, steps: int, device: torch.device, tiny: bool, seed: int = 0) -> TrainingRun:
    """The model (same initial weights for every optimizer), ``steps`` batches and the optimizer."""
    config, batch, context = gpt2_small_config(tiny)
    torch.manual_seed(seed)
    model = GPT(config).to(device)
    data = torch.Generator(device="cpu").manual_seed(seed + 1)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    tokens = torch.randint(0, config.vocab_size, (steps, batch, context + 1), generator=data)

    def loss_of(step: int) -> torch.Tensor:
        window = tokens[step % steps].to(device, non_blocking=True)
        with autocast:
            return model(window[:, :-1], window[:, 1:])[1]

    run = TrainingRun(name, None, loss_of, lambda step: None)
    if name == "adamw_fused":
        opt = torch.optim.AdamW(model.param_groups(0.1), lr=6e-4, betas=(0.9, 0.95),
                                fused=device.type == "cuda")

        def one_step(step):
            opt.zero_grad(set_to_none=True)
            loss = loss_of(step)
            loss.backward()
            opt.step()
            run.losses.append(loss.detach())
    elif name == "salsa_published":
        from salsa.SaLSA import SaLSA
        opt = SaLSA(model.parameters())

        def one_step(step):
            opt.zero_grad(set_to_none=True)

            def closure(backwards=False):
                loss = loss_of(step)
                if backwards:
                    loss.backward()
                    run.losses.append(loss.detach())
                return loss
            opt.step(closure)
            run.step_sizes.append(float(opt.step_size))
    else:
        if name == "fused_salsa_recommended":
            opt = presets.recommended(model.param_groups(0.1), total_steps=steps)
        else:
            opt = FusedSaLSa(model.param_groups(0.0), restore=name.rsplit("_", 1)[1])

        def one_step(step):
            opt.zero_grad(set_to_none=True)
            run.losses.append(opt.step(lambda: loss_of(step)).detach())
            run.step_sizes.append(opt.step_size)
            run.forwards_so_far.append(opt.num_forward_evals)
    run.opt, run.one_step = opt, one_step
    return run


def run_one(name: str, steps: int, device: torch.device, tiny: bool, seed: int = 0,
            windows: Tuple[Tuple[int, int], ...] = WINDOWS) -> dict:
    run = prepare(name, steps, device, tiny, seed)
    opt, one_step, loss_of = run.opt, run.one_step, run.loss_of
    losses, step_sizes, forwards_so_far = run.losses, run.step_sizes, run.forwards_so_far
    searches = forwards = backtracks = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(device)
    timer.mark()
    for step in range(steps):
        one_step(step)
        timer.mark()
    seconds = timer.step_seconds()
    if name == "salsa_published":
        forwards, backtracks = opt.state["n_forwards"], opt.state["n_backtr"]
        searches = None  # 0.1.0 does not count its searches
    elif name.startswith("fused_salsa"):
        forwards, searches, backtracks = opt.num_forward_evals, opt.num_searches, opt.num_backtracks
    else:
        forwards = steps
    means, window_forwards = {}, {}
    for first, last in windows:
        chunk = seconds[first - 1:last]
        means[f"steps {first}-{last}"] = statistics.fmean(chunk) * 1e3 if len(seconds) >= last else None
        if forwards_so_far and len(forwards_so_far) >= last:
            before = forwards_so_far[first - 2] if first >= 2 else 0
            window_forwards[f"steps {first}-{last}"] = (forwards_so_far[last - 1] - before) / (last - first + 1)
        elif len(seconds) >= last:
            window_forwards[f"steps {first}-{last}"] = 1.0 if name == "adamw_fused" else None
    return {"optimizer": name, "steps": steps, "mean_step_ms": means, "forwards_per_step_in": window_forwards,
            "forward_ms": forward_ms(loss_of, steps, device),
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "forwards_per_step": forwards / steps, "searches": searches, "backtracks": backtracks,
            "step_ms": [s * 1e3 for s in seconds], "step_size": step_sizes,
            "loss": torch.stack(losses).float().tolist() if losses else []}


def results_name(gpu: bool) -> str:
    return "train_bench" if gpu else "train_bench_cpu_smoke"


def main(argv=None) -> Dict[str, dict]:
    parser = argparse.ArgumentParser(description="Training-level timings, GPT-2 small on random tokens")
    parser.add_argument("--device", type=C.device, default=C.default_device())
    parser.add_argument("--tiny", action="store_true", help="tiny model, few steps (CPU smoke test)")
    parser.add_argument("--steps", type=C.int_at_least(2), default=None,
                        help="at least 2: the step times are read in two windows")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--out-dir", type=C.output_dir, default=None)
    args = parser.parse_args(argv)
    device = args.device
    if device.type == "cpu" and not args.tiny:
        parser.error("--device cpu runs only with --tiny (the default is GPT-2 small for 2000 steps: hours here)")
    gpu = device.type == "cuda" and not args.tiny
    C.results_readable(parser, (args.out_dir or C.RESULTS_DIR) / f"{results_name(gpu)}.json")
    steps = args.steps or (12 if args.tiny else 2000)
    windows = WINDOWS if steps >= 2000 else ((1, min(200, steps // 2)), (steps // 2 + 1, steps))
    results = {name: run_one(name, steps, device, args.tiny, windows=windows) for name in args.optimizers}
    rows, table = [], []
    for name, r in results.items():
        windows = r["mean_step_ms"]
        for window, mean in windows.items():
            rows.append(C.Row(kernel=f"train step, {window}", provider=name,
                              size="gpt2-small B8 T512 bf16" if gpt2_small_config(args.tiny)[1] == 8 else "tiny",
                              p50_ms=mean, extra={k: v for k, v in r.items() if k not in ("step_ms", "step_size", "loss")},
                              note="" if mean is not None else f"fewer than {window.split('-')[1]} steps run"))
        peak = r["peak_memory_bytes"]
        table.append([name] + [("-" if v is None else f"{v:.2f}") for v in windows.values()]
                     + ["-" if peak is None else f"{peak / 2**30:.2f}", f"{r['forwards_per_step']:.2f}",
                        "-" if r["searches"] is None else r["searches"], r["backtracks"]])
    note = "" if gpu else (f"\n**{C.NOT_MEASURED}**: CPU smoke run of a tiny model "
                           f"({steps} steps); not the GPU training figures.\n")
    markdown = (f"# Training-level timings ({'GPT-2 small, B=8, T=512, bf16 autocast' if not args.tiny else 'tiny'}, "
                f"random tokens, {steps} steps)\n{note}\n"
                + C.markdown_table(["optimizer"] + [f"mean ms, {w}" for w in next(iter(results.values()))
                                                    ["mean_step_ms"]]
                                   + ["peak GiB", "forwards/step", "searches", "backtracks"], table))
    print(markdown)
    C.write_results(results_name(gpu), rows, C.environment(device),
                    markdown, args.out_dir, {"gpu_measured": gpu, "series": {
                        n: {"step_ms": r["step_ms"], "step_size": r["step_size"]} for n, r in results.items()}})
    return results


if __name__ == "__main__":
    main()
