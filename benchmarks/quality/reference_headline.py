"""Seed 001's headline ("Adam+SLS collapses its step on transformers, ALSALS fixes it"),
checked with the readable references of tests/reference on the suite's byte-level GPT.

    python -m benchmarks.quality.reference_headline RUN [SIZE] [SEED]

RUN: ``sls`` (Adam+SLS), ``alsals`` (f_a as the exact directional derivative),
``alsals_probe`` (f_a from the paper's literal 5e-8 probe in fp32), or a number (Adam at
that constant learning rate). Prints one JSON line: mean train loss of the last 50 steps,
validation loss, and for the searches the step size at steps 10, 100 and the end.
A preliminary check (slow reference code, one seed); the fused rules replace it.
"""

import argparse
import json
import time

import torch

from benchmarks.quality.tasks import make_task
from tests.reference.alsals import ALSALS
from tests.reference.sls import AdamSLS


def main(run: str, size: str = "cpu", seed: int = 0) -> dict:
    torch.set_num_threads(1)
    task = make_task("gpt", size, seed=seed)
    model = task.model(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    searches = {"sls": lambda: AdamSLS(params), "alsals": lambda: ALSALS(params),
                "alsals_probe": lambda: ALSALS(params, slope="probe")}
    opt = searches[run]() if run in searches else torch.optim.Adam(params, lr=float(run))
    losses, step_sizes = [], []
    start = time.time()
    for batch in task.batches:
        closure = lambda: task.loss(model, batch)  # noqa: E731
        if isinstance(opt, torch.optim.Optimizer):
            opt.zero_grad()
            loss = closure()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        else:
            losses.append(opt.step(closure))
            step_sizes.append(opt.eta)
    out = dict(run=run, size=size, seed=seed, train_last50=sum(losses[-50:]) / len(losses[-50:]), val=task.evaluate(model),
               seconds=round(time.time() - start, 1))
    if step_sizes:
        trials = [len(h["trial_step_sizes"]) for h in opt.history]
        out.update({f"step_size_{k}": step_sizes[k - 1] for k in (10, 100) if k <= len(step_sizes)})
        out.update(step_size_final=step_sizes[-1], trials_mean=sum(trials) / len(trials))
    return out


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="sls, alsals, alsals_probe, or Adam's constant learning rate (a number)")
    parser.add_argument("size", nargs="?", default="cpu", help="the task's size (benchmarks.quality.tasks)")
    parser.add_argument("seed", nargs="?", type=int, default=0)
    args = parser.parse_args(argv)
    if args.run not in ("sls", "alsals", "alsals_probe"):
        try:
            float(args.run)
        except ValueError:
            parser.error(f"RUN must be sls, alsals, alsals_probe or a learning rate, got {args.run!r}")
    return args


if __name__ == "__main__":
    arguments = _parse()
    print(json.dumps(main(arguments.run, arguments.size, arguments.seed)))
