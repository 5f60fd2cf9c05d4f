"""Every python snippet of README.md and docs/*.md runs as pasted.

A page's blocks run in order in one namespace, as one script (the docs pages open with the
set-up their later blocks continue). A block whose first line is ``# torchrun --nproc_per_node N
...`` is a script of its own: it runs as that line says, N CPU processes under
``torch.distributed.run`` (gloo), with its check on every rank (tests/torchrun_block.py).
In this process such a block once hung CI for the rest of its time (a C++ destructor of the
block's objects, at a later line), and torchrun gives each rank one OpenMP thread where this
process has its own settings. Everything runs in a temporary directory with
``HF_HUB_OFFLINE=1``; torch.compile uses the aot_eager backend here (inductor is exercised by
tests/test_compile.py).

Where a block has something to show, ``CHECKS`` holds it: run after the block, given the
namespace and the step counts of the optimizers it names before the block.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from salsa_fused.integrations import unwrap_salsa
from torchrun_launch import run_torchrun


ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/api.md", "docs/training.md", "docs/integrations.md", "docs/quality.md"]


def python_blocks(page: str) -> list[tuple[str, str]]:
    """(heading, code) of each ```python block of ``page``, in order (headings outside fences)."""
    blocks, heading, in_fence, code = [], None, False, None
    for line in (ROOT / page).read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("```"):
            if not in_fence:
                code = [] if line.strip() == "```python" else None  # None: another language
            elif code is not None:
                blocks.append((heading, "".join(code)))
            in_fence = not in_fence
        elif in_fence:
            if code is not None:
                code.append(line)
        elif re.match(r"#{1,3} ", line):
            heading = line.lstrip("#").strip()
    return blocks


def stepped(count, optimizer="opt"):
    """The block took ``count`` steps of the FusedSaLSa named by the expression ``optimizer``."""
    def check(namespace, before):
        after = unwrap_salsa(eval(optimizer, namespace))
        start = before.get(optimizer)
        taken = after.search_state.step - (start[1] if start and start[0] is after else 0)
        assert taken == count, f"{optimizer}: {taken} steps, expected {count}"
    check.optimizer = optimizer
    return check


def _training_loop(namespace, before):
    assert namespace["opt"].num_forward_evals > 100


def _checkpoint_saved(path):
    def check(namespace, before):
        assert os.path.exists(path), f"the block saved no {path}"
        assert "dcp" not in namespace or os.path.isdir("ckpt"), "the distributed checkpoint block saved no ckpt/"
        found, _, state = before["opt"]
        assert namespace["opt"] is found and found.search_state == state, "save and load changed the search state"
    check.optimizer = "opt"
    return check


def _seed_methods(namespace, before):
    assert namespace["opt"].search_state.num_searches == 3  # AdamSLSRule(c=0.2): a search every step
    labpal = namespace["labpal"].search_state
    assert labpal.step == 3 and labpal.num_searches >= 1 and labpal.rule_state["num_approximations"] >= 1
    assert namespace["factor_search"].calls == 4 and namespace["factor_search"].last_decision["call"] == 4


def _preset(namespace, before):
    """What the text under the block says the preset is: momentum, beta3 0.95, weight decay 0.1 on the
    matrices only, WarmupStableDecay(total_steps, warmup=0.2, decay=0.8, peak=2.0)."""
    opt = namespace["opt"]
    assert opt.search_direction == "momentum" and opt.search_config.beta3 == 0.95
    schedule = opt.schedule
    assert (schedule.total_steps, schedule.warmup, schedule.decay, schedule.peak) == (10_000, 0.2, 0.8, 2.0)
    decayed = [p.dim() for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]]
    undecayed = [p.dim() for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]]
    assert decayed == [2, 2] and undecayed == [1, 1]


CHECKS = {
    ("README.md", "A training loop"): _training_loop,
    ("docs/api.md", "The two-phase form: your own backward, gradient accumulation"): stepped(1),
    ("docs/api.md", "Learning-rate schedulers"): stepped(50),
    ("docs/api.md", "The seeds' other methods: Adam+SLS, ALSALS, LABPAL, LR-factor search"): _seed_methods,
    ("docs/training.md", "Data parallel (DDP)"): stepped(20),
    ("docs/training.md", "FSDP2 (`fully_shard`, DTensor parameters)"): stepped(20),
    ("docs/training.md", "Mixed precision"): stepped(1),
    ("docs/training.md", "Gradient accumulation"): stepped(1),
    ("docs/training.md", "A second optimizer on other parameters"): stepped(3, "body_opt"),
    ("docs/training.md", "Checkpoints"): _checkpoint_saved("checkpoint.pt"),
    ("docs/training.md", "Distributed checkpoint state dicts before the first step"): stepped(0),
    ("docs/integrations.md", "Hugging Face Trainer"): stepped(2, "trainer.salsa_optimizer"),
    ("docs/integrations.md", "accelerate"): stepped(4, "optimizer"),
    ("docs/integrations.md", "PyTorch Lightning"): stepped(4, "trainer.optimizers[0]"),
    ("docs/integrations.md", "torch.compile"): stepped(6),
    ("docs/quality.md", "Quality: no learning rate against a tuned AdamW"): _preset,
}


def _reset_accelerate():
    """accelerate keeps process-wide singletons; a page may build more than one Accelerator."""
    try:
        from accelerate.state import AcceleratorState, GradientState, PartialState
    except ImportError:
        return
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    original = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: original(model, **{"backend": "aot_eager", **kw}))
    torch.manual_seed(0)
    yield tmp_path
    _reset_accelerate()


def test_every_check_names_a_block():
    """A renamed heading must not silently drop its check."""
    for page, heading in CHECKS:
        assert heading in [h for h, _ in python_blocks(page)], f"{page}: no python block under {heading!r}"


def _heading_slugs(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation but ``-`` and ``_`` dropped,
    spaces to ``-`` (fenced code left out: a ``#`` comment there is no heading)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    headings = re.findall(r"^#+\s+(.*?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES + ["docs/performance.md"])
def test_relative_links_lead_to_files(page):
    """Every relative link leads to a file, and every ``#fragment`` to a heading of its page."""
    text = (ROOT / page).read_text(encoding="utf-8")
    links = [link for link in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in link]
    for link in links:
        path, _, fragment = link.partition("#")
        target = (ROOT / page).parent / path if path else ROOT / page
        assert target.exists(), f"{page}: {path} does not exist"
        if fragment and target.suffix == ".md":
            slugs = _heading_slugs(target.read_text(encoding="utf-8"))
            assert fragment in slugs, f"{page}: {link} names no heading of {target.name}"


COMMAND_PAGES = PAGES + ["docs/performance.md", "benchmarks/quality/ZOO.md", "benchmarks/quality/NOTES.md"]


def _benchmark_commands(text: str) -> list[tuple[str, list[str]]]:
    """``(source files, --flags)`` of each ``python -m benchmarks.X`` / ``bash benchmarks/X.sh``
    command in ``text``, backslash continuations joined."""
    text = re.sub(r"\\\n\s*", " ", text)
    commands = []
    for match in re.finditer(r"(?:python -m (benchmarks(?:\.\w+)+)|bash (benchmarks/\w+)\.sh)([^`\n]*)", text):
        module, script, rest = match.groups()
        if module:
            path = ROOT / Path(*module.split("."))
            sources = sorted(path.glob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
        else:
            sources = [ROOT / f"{script}.sh", ROOT / f"{script}.py"]
        commands.append((match.group(0).strip(), sources, re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest)))
    return commands


@pytest.mark.parametrize("page", COMMAND_PAGES)
def test_documented_benchmark_commands_name_options_that_exist(page):
    """Every option of a documented ``python -m benchmarks...`` or ``bash benchmarks/...sh`` command
    is one its sources define (``gpu_suite.sh --quality``, an option of another script, was documented)."""
    commands = _benchmark_commands((ROOT / page).read_text(encoding="utf-8"))
    assert commands or page not in ("docs/performance.md", "benchmarks/quality/ZOO.md"), page
    for command, sources, flags in commands:
        existing = [source for source in sources if source.exists()]
        assert existing, f"{page}: {command!r} names no file"
        text = "\n".join(source.read_text(encoding="utf-8") for source in existing)
        missing = [flag for flag in flags if f'"{flag}"' not in text and f"{flag})" not in text
                   and f"'{flag}'" not in text]
        assert not missing, f"{page}: {command!r} uses {missing}, which {[str(s.relative_to(ROOT)) for s in existing]} do not define"


def test_ci_runs_the_readme_commands_as_written():
    """The two commands of the README's front page are what .ci/run runs, character for character."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Two commands"):readme.index("\n## ", readme.index("## Two commands") + 1)]
    commands = re.findall(r"^```bash\n(.*?)\n```", section, flags=re.MULTILINE | re.DOTALL)
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for command in commands:
        assert re.search(r"\n[ \t]*" + re.escape(command) + r" \|\|", ci), \
            f".ci/run does not run the README's {command!r}"


def _run_under_torchrun(page: str, heading: str, code: str) -> None:
    """``torchrun --nproc_per_node N`` as the block's first line says; every rank must pass."""
    processes = int(re.match(r"# torchrun --nproc_per_node (\d+) ", code).group(1))
    result = run_torchrun(processes, ROOT / "tests" / "torchrun_block.py", page, heading)
    assert result.returncode == 0, f"{page}: {heading!r}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    passed = sorted(re.findall(r"rank (\d+): the block ran and passed its check", result.stdout), key=int)
    assert passed == [str(rank) for rank in range(processes)], result.stdout  # ranks' lines may interleave


@pytest.mark.parametrize("page", PAGES)
def test_page_snippets_run_as_pasted(page, sandbox, capsys):
    blocks = python_blocks(page)
    assert blocks, f"{page} has no python block"
    namespace = {"__name__": "__main__"}
    for index, (heading, code) in enumerate(blocks):
        if code.startswith("# torchrun"):
            _run_under_torchrun(page, heading, code)
            continue
        _reset_accelerate()
        before = {}
        for expression in {getattr(check, "optimizer", "opt") for check in CHECKS.values()}:
            try:
                found = unwrap_salsa(eval(expression, namespace))
                before[expression] = (found, found.search_state.step, copy.deepcopy(found.search_state))
            except Exception:  # not defined (yet) on this page
                pass
        try:
            exec(compile(code, f"{page}:{heading}:block{index}", "exec"), namespace)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        check = CHECKS.get((page, heading))
        if check is not None:
            check(namespace, before)
    if page == "README.md":
        assert "level" in capsys.readouterr().out  # the quickstart printed its figures


def test_a_test_skips_only_for_want_of_cuda(tmp_path):
    """The README's promise, held by tests/conftest.py: a skip that does not name CUDA or a
    GPU (a missing test dependency) fails the run, and a skipped Triton test names the fix."""
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text(encoding="utf-8"))
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n"
        "def test_missing_package():\n"
        "    pytest.importorskip('a_package_nobody_installed')\n"
        "@pytest.mark.skipif(True, reason='needs a CUDA device')\n"
        "def test_needs_cuda():\n"
        "    pass\n"
        "def test_runs():\n"
        "    pass\n")
    # the copied conftest imports tests.background from the repository
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 1, done.stdout
    assert "1 failed, 1 passed, 1 skipped" in done.stdout, done.stdout
    assert 'pip install --no-build-isolation -e ".[test]"' in done.stdout
    assert "a_package_nobody_installed" in done.stdout


def test_a_stalled_test_fails_the_run_instead_of_holding_it(tmp_path):
    """pyproject.toml's pytest settings end a run whose test stalls (pytest-timeout, its limit here
    lowered to 3 s): the run fails with the stalled test's stack instead of waiting forever."""
    settings = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    (tmp_path / "pyproject.toml").write_text(settings[settings.index("[tool.pytest.ini_options]"):])
    (tmp_path / "test_stall.py").write_text("import time\ndef test_stalls():\n    time.sleep(600)\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=3",
                           str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, done.stdout
    assert "Timeout" in done.stdout + done.stderr and "test_stalls" in done.stdout + done.stderr, done.stdout + done.stderr
