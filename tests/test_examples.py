"""Smoke tests of examples/pretrain_gpt.py: a few steps with a tiny model.

In-process runs (fast) for the single-process paths and resume. The runs as programs (the scripts'
one-line errors, the model module run by path, two torchrun runs with 2 CPU processes for the DDP
path) start a fresh interpreter each: they run one after another in a background job
(tests/background.py), about 50 s of one core, and their tests read what each left.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from examples import pretrain_gpt
from tests import background
from torchrun_launch import run_torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "4",
        "--max-bytes", "200000", "--eval-interval", "3", "--eval-batches", "1", "--no-progress"]


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def _run(out, *flags):
    return pretrain_gpt.train(pretrain_gpt.parse_args([*TINY, "--out", str(out), *flags]))


SCRIPT_ERRORS = [
    (["--resume", "--steps", "2"], "pretrain_gpt.py: --resume: no checkpoint at"),
    (["--device", "cuda"], "--device cuda: this torch"),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
    (["--device", "cpu", "--backend", "cuda"], "pretrain_gpt.py: --backend cuda on cpu: backend 'cuda' runs"),
    (["--device", "cpu", "--backend", "triton"], "pretrain_gpt.py: --backend triton on cpu: backend='triton' cannot"),
]

_DESTROY_PROBE = """
import gc, pathlib, sys
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from examples import pretrain_gpt
destroy = dist.destroy_process_group
def counted_destroy(*args, **kwargs):
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    rank = dist.get_rank()
    report = pathlib.Path(__file__).with_name(f"destroy_rank{rank}.txt")
    report.write_text(f"rank {rank}: {alive} DDP wrappers alive at destroy_process_group")
    return destroy(*args, **kwargs)
dist.destroy_process_group = counted_destroy
pretrain_gpt.train(pretrain_gpt.parse_args(sys.argv[1:]))
"""


def _programs(tmp: Path) -> dict:
    """Each run as a program, keyed as the tests read it; a run that raised keeps its exception."""
    # without the interpreter the tests set, as a user runs it: Triton then refuses CPU tensors
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script, model = os.path.join(ROOT, "examples", "pretrain_gpt.py"), os.path.join(ROOT, "examples", "gpt.py")
    probe = tmp / "teardown" / "probe.py"
    probe.parent.mkdir()
    probe.write_text(_DESTROY_PROBE)
    runs = {("error", *flags): lambda flags=flags: background.run_process(
                [sys.executable, script, *TINY, "--out", str(tmp / "error_run"), *flags], timeout=120, env=env)
            for flags, _ in SCRIPT_ERRORS if not (flags[:2] == ["--device", "cuda"] and torch.cuda.is_available())}
    for flags in (["--help"], []):
        runs[("gpt.py", *flags)] = lambda flags=flags: background.run_process([sys.executable, model, *flags],
                                                                               timeout=120)
    runs[("torchrun ddp",)] = lambda: run_torchrun(2, script, *TINY, "--steps", "3", "--grad-accum", "2",
                                                   "--out", tmp / "ddp")
    runs[("torchrun teardown",)] = lambda: run_torchrun(2, probe, *TINY, "--steps", "2", "--out",
                                                        tmp / "teardown" / "run")
    done = {}
    for key, run in runs.items():
        try:
            done[key] = run()
        except Exception as error:  # raised again in the test that reads this run
            done[key] = error
    return done


PROGRAMS = background.job("example programs", _programs, seconds_hint=58)


def _program(key: tuple):
    result = PROGRAMS.result()[key]
    if isinstance(result, Exception):
        raise result
    return result


def test_pretrain_gpt_runs_plots_and_resumes_identically(tmp_path):
    summary = _run(tmp_path / "full", "--steps", "6", "--checkpoint-interval", "3")
    full = _log(tmp_path / "full")
    assert [r["step"] for r in full] == list(range(1, 7))
    assert all(r["step_size"] > 0 and r["interval"] >= 0 and "forwards" in r for r in full)
    assert all(0 < r["applied_backoff"] <= 1 and r["scale_hold"] >= 0 for r in full)  # the range test's record
    assert "val_loss" in full[2] and "val_loss" in full[5]
    with open(summary["plot"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"

    _run(tmp_path / "resumed", "--steps", "3")  # "killed" after step 3
    _run(tmp_path / "resumed", "--steps", "6", "--resume")
    resumed = _log(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(resumed, full):
        # the resumed optimizer checks loss= again at its first search (step 4: the check is not in the
        # checkpoint), one forward more; loss and level bitwise the same
        checked_again = int(a["step"] > 3)
        assert (a["loss"], a["step_size"], a["forwards"]) == (b["loss"], b["step_size"], b["forwards"] + checked_again)
    assert all(a["time"] < b["time"] for a, b in zip(resumed, resumed[1:]))  # the log's clock goes on


def test_a_resume_with_other_settings_names_them_before_loading_anything(tmp_path):
    _run(tmp_path, "--steps", "2", "--checkpoint-interval", "2")
    with pytest.raises(ValueError, match=r"--optimizer 'salsa' there, 'adamw' now"):
        _run(tmp_path, "--steps", "4", "--resume", "--optimizer", "adamw")
    with pytest.raises(ValueError, match=r"--n-embd 32 there, 64 now"):
        pretrain_gpt.train(pretrain_gpt.parse_args([*TINY[:2], "--n-embd", "64", *TINY[4:], "--out", str(tmp_path),
                                                    "--steps", "4", "--resume"]))
    assert [r["step"] for r in _log(tmp_path)] == [1, 2]  # the log is untouched
    for steps in ("1", "2"):  # nothing left to train: said, not a silent run that trains nothing
        with pytest.raises(ValueError, match=f"checkpoint is at step 2, and --steps {steps} asks for no more"):
            _run(tmp_path, "--steps", steps, "--resume")
    assert [r["step"] for r in _log(tmp_path)] == [1, 2]


def test_a_resume_by_another_number_of_processes_is_refused(tmp_path):
    """The batch of a step and the data each process draws depend on the number of processes:
    a checkpoint of a 2-process run (two random states) is not continued by one process."""
    _run(tmp_path, "--steps", "2")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    state["rng"] = state["rng"] * 2
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(pretrain_gpt.ResumeError, match=r"written by 2 process\(es\), this run has 1"):
        _run(tmp_path, "--steps", "4", "--resume")
    assert [r["step"] for r in _log(tmp_path)] == [1, 2]


def test_a_resume_that_changes_the_run_length_says_the_schedule_changes(tmp_path, capsys):
    for optimizer, shape in (("salsa-recommended", "the preset's warm-up and cooldown"),
                             ("adamw", "AdamW's warm-up and cosine")):
        out = tmp_path / optimizer
        _run(out, "--steps", "3", "--optimizer", optimizer)
        printed = capsys.readouterr().out
        assert "(mean of first/last 1 step)" in printed  # 3 steps: the first and the last, not the same mean
        assert (" lr " if optimizer == "adamw" else " eta ") in printed
        _run(out, "--steps", "5", "--optimizer", optimizer, "--resume")
        assert (f"the checkpoint's run planned --steps 3, this one 5: {shape} follow the 5-step schedule from "
                "step 3 on") in capsys.readouterr().out
    _run(tmp_path / "salsa", "--steps", "2")
    _run(tmp_path / "salsa", "--steps", "4", "--resume")  # no schedule: nothing to say
    assert "planned" not in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", SCRIPT_ERRORS)
def test_the_script_says_what_is_wrong_in_one_line(flags, message):
    if flags[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    result = _program(("error", *flags))
    assert result.returncode != 0 and message in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


def test_the_model_module_run_by_path_says_what_it_is_and_where_training_is():
    for flags, expected in ([["--help"], "train with: python examples/pretrain_gpt.py"],
                            [[], "10,844,160 parameters. Train it: python examples/pretrain_gpt.py"]):
        result = _program(("gpt.py", *flags))
        assert result.returncode == 0 and expected in " ".join(result.stdout.split()), result.stdout + result.stderr


def test_pretrain_gpt_finishes_without_tqdm_and_matplotlib(tmp_path, monkeypatch, capsys):
    """Without the examples extra the demo says so in one line each, and still trains,
    logs every step and saves its checkpoint."""
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    flags = [flag for flag in TINY if flag != "--no-progress"]
    summary = pretrain_gpt.train(pretrain_gpt.parse_args([*flags, "--steps", "3", "--out", str(tmp_path)]))
    out = capsys.readouterr().out
    assert "tqdm is not installed" in out and "matplotlib is not installed" in out
    assert summary["steps"] == 3 and summary["plot"] is None
    assert [r["step"] for r in _log(tmp_path)] == [1, 2, 3]
    assert os.path.exists(tmp_path / "checkpoint.pt") and not os.path.exists(tmp_path / "loss_step_size.png")


@pytest.mark.parametrize("flags", [["--optimizer", "adamw", "--dtype", "bf16-autocast"],
                                   ["--dtype", "bf16", "--grad-accum", "2"],
                                   ["--dtype", "fp16-autocast", "--grad-scaler"],
                                   ["--optimizer", "salsa-recommended"]])
def test_pretrain_gpt_precisions_and_adamw(tmp_path, flags):
    summary = _run(tmp_path, "--steps", "3", *flags)
    assert summary["steps"] == 3
    assert all(r["loss"] == r["loss"] and r["step_size"] > 0 for r in _log(tmp_path))


def test_the_adamw_log_gives_the_rate_each_step_ran_at(tmp_path):
    """The log read the scheduler's rate after its step: one step ahead, a rate never used at the last step."""
    _run(tmp_path, "--steps", "4", "--optimizer", "adamw", "--warmup", "2", "--lr", "1e-3")
    assert [r["step_size"] for r in _log(tmp_path)] == pytest.approx([0.5e-3, 1e-3, 1e-3, 0.55e-3])  # warm-up, then cosine to 10%


def test_the_demo_under_dropout_marks_its_forward_and_spends_no_reference_forward(tmp_path, monkeypatch):
    """Without mark_forward() every search paid one reference forward at w0 once dropout moved the generators:
    the forwards are the step's own, its trials and the one check of loss= (the same run counted)."""
    from salsa_fused import FusedSaLSa

    trials = []
    step = FusedSaLSa.step

    def counted(self, *args, **kwargs):
        before = self.num_forward_evals
        out = step(self, *args, **kwargs)
        trials.append(self.search_state.last_trials if self.search_state.steps_since_search == 0 else 0)
        assert self.num_forward_evals - before - trials[-1] in (1, 2)  # 2: the first two-phase search's check
        return out

    monkeypatch.setattr(FusedSaLSa, "step", counted)
    summary = _run(tmp_path, "--steps", "6", "--dropout", "0.2")
    assert summary["steps"] == 6 and _log(tmp_path)[-1]["forwards"] == 6 + sum(trials) + 1


def test_pretrain_gpt_rejects_bad_flags():
    with pytest.raises(SystemExit):
        pretrain_gpt.parse_args(["--dtype", "fp16-autocast"])  # needs --grad-scaler
    with pytest.raises(SystemExit):
        pretrain_gpt.parse_args(["--n-embd", "30", "--n-head", "4"])
    with pytest.raises(SystemExit):
        pretrain_gpt.parse_args(["--max-bytes", "0"])
    with pytest.raises(SystemExit):
        pretrain_gpt.parse_args(["--dropout", "-0.5"])
    with pytest.raises(SystemExit):
        pretrain_gpt.parse_args(["--optimizer", "salsa-recommended", "--steps", "2"])  # too short for its cooldown


def test_the_help_names_each_flags_default_once_and_never_none(capsys):
    """--lr, --warmup and --search-direction default to None (so that one given for another optimizer is refused)
    and take the default their help names: the help read "(default: 0.003) (default: None)"."""
    with pytest.raises(SystemExit):
        pretrain_gpt.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    for default in (f"(default: {pretrain_gpt.ADAMW_LR:g})", f"(default: {pretrain_gpt.ADAMW_WARMUP})",
                    f"(default: {pretrain_gpt.SEARCH_DIRECTION})"):
        assert text.count(default) == 1, default
    args = pretrain_gpt.parse_args([])
    assert (args.lr, args.warmup, args.search_direction) == (pretrain_gpt.ADAMW_LR, pretrain_gpt.ADAMW_WARMUP,
                                                             pretrain_gpt.SEARCH_DIRECTION)


def test_a_corpus_too_short_for_the_block_is_named():
    from examples.gpt import ByteBatches

    with pytest.raises(ValueError, match="a corpus of 10 bytes leaves a split of 1 bytes, too short for windows of 64"):
        ByteBatches(torch.zeros(10, dtype=torch.uint8), 64)
    ByteBatches(torch.zeros(661, dtype=torch.uint8), 64).get("val", 2, torch.Generator().manual_seed(0))


def test_pretrain_gpt_under_torchrun_ddp():
    """2 CPU processes (gloo) with 2 accumulated micro-batches: the same loss on both
    ranks is logged once, and the run finishes with a checkpoint."""
    result = _program(("torchrun ddp",))
    out = Path(result.args[-1])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "on 2 x cpu" in result.stdout
    assert [r["step"] for r in _log(out)] == [1, 2, 3]
    assert (out / "checkpoint.pt").exists()


def test_torchrun_teardown_destroys_the_group_after_the_ddp_wrapper_is_freed():
    """DDP's reducer holds the gloo group; left to interpreter exit, the group's threads are
    joined mid-finalization (a rare SIGABRT on rank 1 in CI). The example frees the wrapper
    first: none is alive when the group is destroyed."""
    result = _program(("torchrun teardown",))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # One file per rank: the ranks share torchrun's stdout, where two lines can interleave.
    probe_dir = Path(result.args[-1]).parent
    counts = [(probe_dir / f"destroy_rank{r}.txt").read_text() for r in (0, 1)]
    assert counts == [f"rank {r}: 0 DDP wrappers alive at destroy_process_group" for r in (0, 1)], counts


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA-only: needs a GPU")
def test_pretrain_gpt_low_precision_on_gpu_300_steps(tmp_path):
    """On a GPU: 300 steps of the demo model in fp32, bf16 autocast, bf16 weights and fp16 +
    GradScaler; all train with finite losses, and the step size of the bf16 runs follows
    fp32's (geometric mean of the per-step ratio). The CPU counterpart (24 steps) is
    tests/test_amp.py::test_low_precision_runs_train_like_fp32. Thresholds from the issue
    ("within a few percent"); not yet calibrated on a device."""
    import math
    runs = {}
    for name, flags in {"fp32": [], "bf16-autocast": ["--dtype", "bf16-autocast"], "bf16": ["--dtype", "bf16"],
                        "fp16": ["--dtype", "fp16-autocast", "--grad-scaler"]}.items():
        out = tmp_path / name
        pretrain_gpt.train(pretrain_gpt.parse_args(["--steps", "300", "--device", "cuda", "--no-progress",
                                                    "--out", str(out), *flags]))
        runs[name] = _log(out)
    for name, log in runs.items():
        losses = [r["loss"] for r in log]
        assert all(math.isfinite(v) for v in losses), name
        assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 1.0, f"{name}: loss did not fall"
    for name, tolerance in (("bf16-autocast", 0.05), ("bf16", 0.05)):
        ratios = [math.log(a["step_size"] / b["step_size"]) for a, b in zip(runs[name], runs["fp32"])]
        drift = math.exp(sum(ratios) / len(ratios)) - 1
        assert abs(drift) < tolerance, f"{name}: step size {drift:+.1%} from fp32's over 300 steps"


def test_docs_demo_paragraph_names_every_flag_of_the_script(capsys):
    """docs/training.md lists the demo's flags; a list that left out eleven of them read as the whole
    (a new user's review). Every flag of --help is named there."""
    import re

    with pytest.raises(SystemExit):
        pretrain_gpt.parse_args(["--help"])
    flags = set(re.findall(r"(--[a-z][a-z-]+)", capsys.readouterr().out)) - {"--help", "--nproc_per_node"}
    with open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8") as handle:
        demo = handle.read().split("## The demo", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(--[a-z][a-z-]+)", demo))
    assert len(flags) > 20 and not flags - named, sorted(flags - named)


def test_the_demo_help_gives_every_flag_that_takes_a_value_its_default(capsys):
    """docs/training.md: "--help gives each with its default". argparse's defaults formatter prints one only
    for an option with help text; eight had none (a docs audit)."""
    import re

    with pytest.raises(SystemExit):
        pretrain_gpt.parse_args(["--help"])
    options = capsys.readouterr().out.split("options:", 1)[1]
    entries = re.split(r"\n  (?=-)", options)  # one entry per option, its wrapped help lines joined
    valued = [e for e in entries if re.match(r"--[a-z-]+ [A-Z{]", e)]  # takes a value: a metavar or choices
    assert len(valued) > 15
    without = [e.split()[0] for e in valued if "(default:" not in e]
    assert not without, f"--help gives no default for {without}"


@pytest.mark.parametrize("flags, message", [
    (["--optimizer", "adamw", "--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
    (["--optimizer", "adamw", "--warmup", "-5"], "--warmup must be >= 0, got -5"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0, got -1.0"),
    (["--optimizer", "adamw", "--search-direction", "momentum"], "--search-direction set, but --optimizer adamw"),
    (["--lr", "1e-2", "--warmup", "5"], "--lr, --warmup set, but --optimizer salsa does not read them"),
    # a flag the optimizer does not read, given at its default value: the preset ran its own direction silently
    (["--optimizer", "salsa-recommended", "--search-direction", "gradient"],
     "--search-direction set, but --optimizer salsa-recommended"),
    (["--lr", "3e-3"], "--lr set, but --optimizer salsa does not read it"),
    (["--block-size", "100000"], "--block-size must be at most 4096"),  # ran 9 minutes at 7 GB, unrefused
    (["--device", "meta"], "--device meta: this script runs on the CPU or CUDA"),  # mps, xpu: a traceback
])
def test_pretrain_gpt_names_a_bad_or_unread_flag_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit):
        pretrain_gpt.parse_args(flags)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--resume"], ["--device", "cpu", "--backend", "cuda"]])
def test_a_refused_run_of_pretrain_gpt_leaves_no_folder_behind(tmp_path, flags):
    """The folder of --out was made before the refusals: a mistyped resume left an empty one (an audit's run)."""
    out = tmp_path / "new_run"
    with pytest.raises((SystemExit, pretrain_gpt.ResumeError, pretrain_gpt.BackendError)):
        pretrain_gpt.train(pretrain_gpt.parse_args([*TINY, "--steps", "2", "--out", str(out), *flags]))
    assert not out.exists()


def test_pretrain_gpt_refuses_an_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        pretrain_gpt.parse_args(["--out", str(tmp_path / "file")])
    assert "is a file: name a folder" in capsys.readouterr().err


def test_pretrain_gpt_resume_names_an_unreadable_checkpoint_and_skips_a_cut_log_line(tmp_path, capsys):
    _run(tmp_path, "--steps", "3", "--checkpoint-interval", "3", "--optimizer", "salsa-recommended")
    with open(tmp_path / "log.jsonl", "a") as log:
        log.write('{"step": 2, "lo')  # a run killed while it wrote a line
    args = ["--steps", "5", "--optimizer", "salsa-recommended", "--weight-decay", "0.1", "--resume"]
    summary = _run(tmp_path, *args)  # the preset's default decay spelled out matches the checkpoint's
    assert "1 line(s) of" in capsys.readouterr().out and summary is not None
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(pretrain_gpt.ResumeError, match="is not a readable checkpoint"):
        _run(tmp_path, *args)
    checkpoint.write_text("garbage")
    with pytest.raises(pretrain_gpt.ResumeError, match="is not a readable checkpoint"):
        _run(tmp_path, *args)
