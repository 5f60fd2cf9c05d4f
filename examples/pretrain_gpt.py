"""Pretrain a small byte-level GPT from scratch with FusedSaLSa (or AdamW, for comparison).

The corpus is the source of Python's standard library (present on every machine, no
downloads). One process on the CPU or a GPU, or data parallel with torchrun:

    python examples/pretrain_gpt.py                                   # the README demo (8 s of training, 2 cores)
    python examples/pretrain_gpt.py --optimizer adamw                 # AdamW, warmup + cosine
    torchrun --nproc_per_node 4 examples/pretrain_gpt.py --steps 2000 --n-layer 6 --n-embd 384 \
        --n-head 6 --block-size 256 --batch-size 32 --dtype bf16-autocast
    python examples/pretrain_gpt.py --steps 400 --resume              # continue runs/pretrain_gpt

Writes into ``--out`` (default ``runs/pretrain_gpt``): ``log.jsonl`` (one line per step:
loss, step size, search interval, forward passes, the preset's back-off multiplier),
``loss_step_size.png`` and
``checkpoint.pt`` (model, optimizer, GradScaler, schedule, random states).

``--batch-size`` is per micro-batch and per rank: a step sees
``batch_size * grad_accum * world_size`` sequences. With FusedSaLSa and ``--grad-accum k``
every trial of a search re-runs the forward of all ``k`` micro-batches.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import time

import torch
import torch.distributed as dist

from salsa_fused import FusedSaLSa, backends, presets

if __package__:  # imported as examples.pretrain_gpt (the tests)
    from .gpt import GPT, ByteBatches, GPTConfig, load_stdlib_corpus
else:  # run as a script (python examples/pretrain_gpt.py): its own directory is on sys.path
    from gpt import GPT, ByteBatches, GPTConfig, load_stdlib_corpus

DTYPES = ("fp32", "bf16-autocast", "bf16", "fp16-autocast")


#: What an optimizer's own flags default to where they are not given (given for another optimizer, they are refused).
ADAMW_LR, ADAMW_WARMUP, SEARCH_DIRECTION = 3e-3, 20, "gradient"


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default in its help, but not ``None``: a flag left at None takes the default its help names."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=_DefaultsHelp)
    parser.add_argument("--optimizer", choices=("salsa", "salsa-recommended", "adamw"), default="salsa",
                        help="salsa: FusedSaLSa's defaults (the published SaLSa); salsa-recommended: "
                             "salsa_fused.presets.recommended for a run of --steps steps")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps in total")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch per rank")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--block-size", type=int, default=64, help="tokens (bytes) per sequence (at most 4096)")
    parser.add_argument("--n-layer", type=int, default=2, help="transformer blocks")
    parser.add_argument("--n-head", type=int, default=4, help="attention heads per block")
    parser.add_argument("--n-embd", type=int, default=64, help="model width")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout probability in the blocks")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32",
                        help="bf16-autocast: fp32 weights, bf16 compute; bf16: bf16 weights (FusedSaLSa keeps "
                             "fp32 moments, torch's AdamW bf16 ones); fp16-autocast needs --grad-scaler")
    parser.add_argument("--grad-scaler", action="store_true", help="torch.amp.GradScaler (for fp16)")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="on matrices only (default: 0.1 with salsa-recommended, as the preset; else 0)")
    parser.add_argument("--search-direction", choices=("gradient", "momentum"), default=None,
                        help=f"FusedSaLSa's trial direction, --optimizer salsa only (default: {SEARCH_DIRECTION})")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"AdamW peak learning rate, --optimizer adamw only (default: {ADAMW_LR:g})")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"AdamW warmup steps (then cosine to 10%%), --optimizer adamw only (default: {ADAMW_WARMUP})")
    parser.add_argument("--max-bytes", type=int, default=4_000_000, help="corpus size cap")
    parser.add_argument("--eval-interval", type=int, default=50, help="steps between validation losses")
    parser.add_argument("--eval-batches", type=int, default=4, help="batches per validation loss")
    parser.add_argument("--checkpoint-interval", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--out", default="runs/pretrain_gpt", help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--backend", choices=backends.names(), default="auto",
                        help="FusedSaLSa's backend (auto: triton on CUDA, cpp on the CPU when built, else torch)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batches")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs every 10 steps)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "grad_accum", "block_size", "n_layer", "n_head", "n_embd",
                 "eval_interval", "eval_batches", "checkpoint_interval", "max_bytes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.block_size > MAX_BLOCK_SIZE:
        parser.error(f"--block-size must be at most {MAX_BLOCK_SIZE} (attention holds block x block scores per head; "
                     f"got {args.block_size})")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.weight_decay is None:  # the default said once, so that a resume that spells it out matches
        args.weight_decay = 0.1 if args.optimizer == "salsa-recommended" else 0.0
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        parser.error(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a file: name a folder (made if missing)")
    # given at all, even at its default value: the preset's own direction ran where --search-direction gradient
    # was spelled out, without a word
    ignored = [flag for flag, value, reads in (
        ("--lr", args.lr, "adamw"), ("--warmup", args.warmup, "adamw"),
        ("--search-direction", args.search_direction, "salsa"))
        if value is not None and args.optimizer != reads]
    if ignored:
        parser.error(f"{', '.join(ignored)} set, but --optimizer {args.optimizer} does not read "
                     f"{'it' if len(ignored) == 1 else 'them'} (--lr and --warmup are AdamW's; --search-direction is "
                     "--optimizer salsa's: the preset sets its own)")
    args.lr = ADAMW_LR if args.lr is None else args.lr
    args.warmup = ADAMW_WARMUP if args.warmup is None else args.warmup
    args.search_direction = args.search_direction or SEARCH_DIRECTION
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a finite number > 0, got {args.lr}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.optimizer == "salsa-recommended":
        try:
            presets.preset_kwargs(presets.RECOMMENDED, args.steps)
        except ValueError as error:
            parser.error(f"--optimizer salsa-recommended --steps {args.steps}: {error}")
    if args.n_embd % args.n_head:
        parser.error(f"--n-embd ({args.n_embd}) must be a multiple of --n-head ({args.n_head})")
    if args.dtype == "fp16-autocast" and not args.grad_scaler:
        parser.error("--dtype fp16-autocast needs --grad-scaler (fp16 gradients underflow without it)")
    if args.dtype == "bf16" and args.grad_scaler:
        parser.error("--grad-scaler works with fp32 weights (fp32/bf16-autocast/fp16-autocast), not bf16 weights")
    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device {args.device!r} is not a device: auto, cpu, cuda or cuda:N")
        if device.type not in ("cpu", "cuda"):
            parser.error(f"--device {args.device}: this script runs on the CPU or CUDA (auto, cpu, cuda or cuda:N)")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device; "
                         "--device cpu or auto runs on the CPU")
    return args


class ResumeError(ValueError):
    """A --resume that cannot continue the run in OUT (said in one line when run as a script)."""


class BackendError(ValueError):
    """A --backend that cannot run the run's tensors (said in one line when run as a script)."""


#: Settings a --resume must share with the run that wrote the checkpoint (the model, the data stream,
#: the optimizer and its state's layout), as must the number of processes; --steps (the schedules
#: follow it: said at the resume), the logging, the device and the backend may change.
#: The longest sequence: an audit's --block-size 100000 ran 9 minutes at 7 GB before it was stopped.
MAX_BLOCK_SIZE = 4096

RESUME_MUST_MATCH = ("optimizer", "batch_size", "grad_accum", "block_size", "n_layer", "n_head", "n_embd",
                     "dropout", "dtype", "grad_scaler", "weight_decay", "search_direction", "lr", "warmup",
                     "max_bytes", "seed")


# ----------------------------------------------------------------------------- set-up
def setup_distributed(requested_device: str):
    """(rank, world_size, device); initializes the process group under torchrun."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and requested_device in ("auto", "cuda")
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        return dist.get_rank(), dist.get_world_size(), device
    if requested_device == "auto":
        requested_device = "cuda" if torch.cuda.is_available() else "cpu"
    return 0, 1, torch.device(requested_device)


def make_optimizer(args, model, device):
    groups = model.param_groups(args.weight_decay)
    try:
        if args.optimizer == "salsa-recommended":
            return presets.recommended(groups, total_steps=args.steps, backend=args.backend), None
        if args.optimizer == "salsa":
            return FusedSaLSa(groups, search_direction=args.search_direction, backend=args.backend), None
    except RuntimeError as error:  # the backend cannot run on this device: the optimizer says why
        raise BackendError(f"--backend {args.backend} on {device}: {error}") from None
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")

    def warmup_cosine(step):
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)


def step_batches(batches, args, step, rank, world, device="cpu"):
    """The micro-batches of ``rank`` at ``step``: a function of (seed, step, rank) only, so a
    resumed run draws exactly the data the uninterrupted run would have drawn."""
    generator = torch.Generator().manual_seed((args.seed * 1_000_003 + step) * world + rank)
    return [batches.get("train", args.batch_size, generator, device) for _ in range(args.grad_accum)]


# ----------------------------------------------------------------------------- training
def train(args) -> dict:
    """Run the training job; under torchrun, tear the process group down once the run's
    objects are gone."""
    rank, world, device = setup_distributed(args.device)
    try:
        summary = _run(args, rank, world, device)
    except BaseException:
        if world > 1:
            dist.destroy_process_group()
        raise
    if world > 1:
        # DDP's reducer holds the process group and sits in reference cycles: collected at
        # interpreter exit, gloo's threads are joined mid-finalization (a rare SIGABRT seen in CI).
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _run(args, rank: int, world: int, device: torch.device) -> dict:
    is_main = rank == 0
    torch.manual_seed(args.seed)
    checkpoint_path = os.path.join(args.out, "checkpoint.pt")
    log_path = os.path.join(args.out, "log.jsonl")

    corpus = load_stdlib_corpus(args.max_bytes)
    try:
        batches = ByteBatches(corpus, args.block_size)
    except ValueError as error:
        raise SystemExit(f"pretrain_gpt.py: --max-bytes {args.max_bytes} with --block-size {args.block_size}: {error}")
    config = GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd, dropout=args.dropout)
    model = GPT(config).to(device)
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    opt, schedule = make_optimizer(args, model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.grad_scaler)
    autocast_dtype = {"bf16-autocast": torch.bfloat16, "fp16-autocast": torch.float16}.get(args.dtype)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    start, records = 0, []
    if args.resume:
        if not os.path.exists(checkpoint_path):
            raise ResumeError(f"--resume: no checkpoint at {checkpoint_path} (run without --resume to start, or "
                              "--out the folder of the run to continue)")
        try:
            state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        except Exception as error:  # torch raises what its unpickler met: OSError, ValueError, RuntimeError, EOF...
            raise ResumeError(f"--resume: {checkpoint_path} is not a readable checkpoint "
                              f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
        if not (isinstance(state, dict) and {"model", "optimizer", "step", "rng"} <= state.keys()):
            raise ResumeError(f"--resume: {checkpoint_path} is not a checkpoint of this script (no model, optimizer, "
                              "step and random states in it)")
        saved = state.get("args", {})
        if saved.get("weight_decay", 0) is None:  # written before the default was resolved in parse_args
            saved["weight_decay"] = 0.1 if saved.get("optimizer") == "salsa-recommended" else 0.0
        changed = {k: (saved[k], v) for k, v in vars(args).items()
                   if k in RESUME_MUST_MATCH and k in saved and saved[k] != v}
        if changed:
            raise ResumeError("--resume: the checkpoint was written by a run with other settings: " + ", ".join(
                f"--{k.replace('_', '-')} {old!r} there, {new!r} now" for k, (old, new) in changed.items()))
        saved_world = len(state["rng"])  # one random state per process
        if saved_world != world:
            raise ResumeError(f"--resume: the checkpoint was written by {saved_world} process(es), this run has "
                              f"{world}: each step's batch ({args.batch_size} x {args.grad_accum} x the processes "
                              "sequences) and the data each process draws depend on it; resume with "
                              f"{saved_world} process(es)")
        if state["step"] >= args.steps:
            raise ResumeError(f"--resume: the checkpoint is at step {state['step']}, and --steps {args.steps} asks "
                              f"for no more: pass --steps above {state['step']} to train on")
        planned = saved.get("steps", args.steps)
        if planned != args.steps and args.optimizer != "salsa" and is_main:
            shape = ("the preset's warm-up and cooldown" if args.optimizer == "salsa-recommended"
                     else "AdamW's warm-up and cosine")
            print(f"--resume: the checkpoint's run planned --steps {planned}, this one {args.steps}: {shape} "
                  f"follow the {args.steps}-step schedule from step {state['step']} on, so the step size may "
                  "jump there" + (" (salsa_fused.presets, 'Run length')" if args.optimizer == "salsa-recommended"
                                  else ""), flush=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if schedule is not None:
            schedule.load_state_dict(state["schedule"])
        start = state["step"]
        rng = state["rng"][rank % len(state["rng"])]
        torch.set_rng_state(rng["cpu"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
        if is_main and os.path.exists(log_path):
            records, damaged = [], 0
            with open(log_path) as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut off when the run was killed
                        damaged += 1
                        continue
                    if isinstance(record, dict) and record.get("step", start + 1) <= start:
                        records.append(record)
            if damaged:
                print(f"--resume: {damaged} line(s) of {log_path} did not decode (a run killed while writing?): "
                      "left out of the log", flush=True)

    def forward_loss(x, y):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            return net(x, y)[1]

    def save_checkpoint(step):
        if isinstance(opt, FusedSaLSa):  # NaN/inf counts of plain steps since the last search: not in a checkpoint
            opt.report_nonfinite()
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        all_rng = [None] * world
        if world > 1:
            dist.all_gather_object(all_rng, rng)
        else:
            all_rng = [rng]
        if is_main:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                     "schedule": schedule.state_dict() if schedule is not None else None,
                     "step": step, "rng": all_rng, "args": vars(args)}
            torch.save(state, checkpoint_path + ".tmp")
            os.replace(checkpoint_path + ".tmp", checkpoint_path)

    @torch.no_grad()
    def validation_loss():
        model.eval()
        generator = torch.Generator().manual_seed(args.seed * world + rank)  # the same batches every time
        losses = [forward_loss(*batches.get("val", args.batch_size, generator, device)).float()
                  for _ in range(args.eval_batches)]
        model.train()
        mean = torch.stack(losses).mean()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        return mean.item()

    progress = None
    if is_main and not args.no_progress:
        try:
            from tqdm import tqdm
            progress = tqdm(total=args.steps, initial=start, desc=args.optimizer, dynamic_ncols=True)
        except ImportError:
            print('no progress bar (tqdm is not installed: pip install -e ".[examples]"); '
                  "printing every 10 steps", flush=True)
    mode = "w" if not args.resume else "a"
    if is_main:
        os.makedirs(args.out, exist_ok=True)  # after every refusal: a refused run leaves no folder behind
    log_file = open(log_path, mode) if is_main else None
    if log_file is not None and args.resume:  # drop lines past the checkpoint
        log_file.close()
        with open(log_path, "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in records)
        log_file = open(log_path, "a")
    started = time.perf_counter()
    time_before = records[-1]["time"] if records else 0.0  # a resumed run's log goes on from its checkpoint's time
    try:
        for step in range(start, args.steps):
            micro = step_batches(batches, args, step, rank, world, device)
            k = len(micro)
            opt.zero_grad(set_to_none=True)
            if args.optimizer.startswith("salsa"):
                opt.mark_forward()  # the trials replay this step's dropout draws: no reference forward at w0
            total = torch.zeros((), device=device)
            for i, (x, y) in enumerate(micro):
                sync = net.no_sync() if (world > 1 and i < k - 1) else contextlib.nullcontext()
                with sync:
                    loss = forward_loss(x, y) / k
                    scaler.scale(loss).backward()
                total += loss.detach().float()

            def closure():  # the mean loss over all micro-batches, forward only
                return sum(forward_loss(x, y).float() for x, y in micro) / k

            if args.optimizer.startswith("salsa"):
                scaler.step(opt, closure, loss=total)  # closure positional: GradScaler refuses closure=
            else:
                lr_used = opt.param_groups[0]["lr"]  # the scheduler's step below sets the next step's
                scaler.step(opt)
                schedule.step()
            scaler.update()

            loss_value = total.clone()
            if world > 1:
                dist.all_reduce(loss_value)
                loss_value /= world
            record = {"step": step + 1, "loss": loss_value.item(),
                      "time": time_before + time.perf_counter() - started}
            if args.optimizer.startswith("salsa"):
                record.update(step_size=opt.step_size, effective_step_size=opt.applied_steps[0],
                              interval=opt.search_interval, forwards=opt.num_forward_evals,
                              searches=opt.num_searches, applied_backoff=opt.search_state.applied_backoff,
                              scale_hold=opt.search_state.scale_hold)
            else:
                record.update(step_size=lr_used)
            if (step + 1) % args.eval_interval == 0 or step + 1 == args.steps:
                record["val_loss"] = validation_loss()
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"non-finite loss {record['loss']} at step {step + 1}")
            if is_main:
                records.append(record)
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                size_name = "eta" if args.optimizer.startswith("salsa") else "lr"
                postfix = {"loss": f"{record['loss']:.3f}", size_name: f"{record['step_size']:.2e}"}
                if "interval" in record:
                    postfix["interval"] = f"{record['interval']:.1f}"
                if progress is not None:
                    progress.set_postfix(postfix, refresh=False)
                    progress.update(1)
                elif (step + 1) % 10 == 0 or step + 1 == args.steps:
                    print(f"step {step + 1}/{args.steps} " + " ".join(f"{k} {v}" for k, v in postfix.items()),
                          flush=True)
            if (step + 1) % args.checkpoint_interval == 0 or step + 1 == args.steps:
                save_checkpoint(step + 1)
    finally:
        if progress is not None:
            progress.close()
        if log_file is not None:
            log_file.close()
    summary = {}
    if is_main and records:  # the log and the checkpoint are written: a missing plotting library loses nothing
        plot_path = os.path.join(args.out, "loss_step_size.png")
        try:
            plot(records, plot_path, args.optimizer)
        except ImportError:
            print(f'no plot (matplotlib is not installed: pip install -e ".[examples]"); the log is {log_path}',
                  flush=True)
            plot_path = None
        n = max(1, min(10, len(records) // 2))  # first and last n steps, apart when there are 2 or more
        first = sum(r["loss"] for r in records[:n]) / n
        last = sum(r["loss"] for r in records[-n:]) / n
        summary = {"first_loss": first, "last_loss": last, "val_loss": records[-1].get("val_loss"),
                   "steps": records[-1]["step"], "seconds": time.perf_counter() - started, "plot": plot_path}
        extra = (f", {records[-1]['forwards']} forward passes, {records[-1]['searches']} searches"
                 if args.optimizer.startswith("salsa") else "")
        window = f"{n} step{'s' if n > 1 else ''}"
        print(f"loss {first:.3f} -> {last:.3f} (mean of first/last {window}), val {summary['val_loss']:.3f}"
              f"{extra}; {summary['seconds']:.0f} s on {world} x {device.type}; log {log_path}"
              + (f", plot {plot_path}" if plot_path else ""), flush=True)
    return summary


def plot(records, path, optimizer_name):
    """Loss (train, and validation where measured) and step size against the step: for
    FusedSaLSa the level ``eta`` and the applied step (the optimizer's ``applied_steps``:
    lr x eta x growth, times the schedule's scale under a preset; logged as
    ``effective_step_size``, its earlier name)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    figure, (loss_axis, step_axis) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    loss_axis.plot(steps, [r["loss"] for r in records], lw=1, label="train")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        loss_axis.plot(*zip(*val), "o-", label="validation")
    loss_axis.set_ylabel("cross-entropy (nats/byte)")
    loss_axis.legend()
    loss_axis.grid(alpha=0.3)
    if optimizer_name.startswith("salsa"):
        step_axis.semilogy(steps, [r["step_size"] for r in records], label="level eta")
        applied = [r["effective_step_size"] if r["effective_step_size"] > 0 else math.nan for r in records]
        step_axis.semilogy(steps, applied, lw=1, ls="--", label="applied step")
        interval_axis = step_axis.twinx()
        interval_axis.plot(steps, [r["interval"] for r in records], color="tab:gray", lw=0.8,
                           label="search interval")
        interval_axis.set_ylabel("search interval (steps)")
        interval_axis.legend(loc="upper right")
    else:
        step_axis.semilogy(steps, [r["step_size"] for r in records], label="AdamW learning rate")
    step_axis.set_ylabel("step size")
    step_axis.set_xlabel("step")
    step_axis.legend(loc="upper left")
    step_axis.grid(alpha=0.3)
    figure.suptitle(f"byte-level GPT on the Python standard library ({optimizer_name})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    try:
        train(parse_args())
    except (ResumeError, BackendError) as error:
        raise SystemExit(f"pretrain_gpt.py: {error}") from None
