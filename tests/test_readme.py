"""The README's python snippets run: the training-stack recipes cannot drift from the code.

Each ```python block is run with ``exec`` in a fresh namespace (the two-phase block
shares the namespace of "A training loop", which it continues), in a temporary
directory, with ``HF_HUB_OFFLINE=1``.
"""

import os
import re

import pytest
import torch


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


README = os.path.join(os.path.dirname(__file__), "..", "README.md")

# heading -> the python blocks under it (until the next heading of any level)
CONTINUED = [("A training loop", "The two-phase form: your own backward, gradient accumulation")]
RECIPES = ["Learning-rate schedulers", "Hugging Face Trainer", "accelerate", "PyTorch Lightning",
           "torch.compile", "Distributed checkpoint state dicts"]


def python_blocks_by_heading():
    text = open(README, encoding="utf-8").read()
    sections, heading = {}, None
    for part in re.split(r"(^#{2,3} .*$)", text, flags=re.MULTILINE):
        if re.match(r"^#{2,3} ", part):
            heading = part.lstrip("#").strip()
            continue
        if heading is not None:
            blocks = re.findall(r"^```python\n(.*?)^```", part, flags=re.MULTILINE | re.DOTALL)
            sections.setdefault(heading, []).extend(blocks)
    return sections


SECTIONS = python_blocks_by_heading()


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    try:
        from accelerate.state import AcceleratorState, GradientState, PartialState
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    except ImportError:
        pass
    yield tmp_path


def test_every_recipe_section_has_one_snippet():
    for heading in RECIPES + [h for pair in CONTINUED for h in pair]:
        assert len(SECTIONS.get(heading, [])) == 1, f"README section {heading!r}: expected one python block"


@pytest.mark.parametrize("first, second", CONTINUED)
def test_training_loop_snippets_run(first, second, sandbox, capsys):
    namespace = {"__name__": "readme"}
    exec(compile(SECTIONS[first][0], f"README:{first}", "exec"), namespace)
    exec(compile(SECTIONS[second][0], f"README:{second}", "exec"), namespace)
    assert namespace["opt"].num_forward_evals > 100
    assert "step size" in capsys.readouterr().out


@pytest.mark.parametrize("heading", RECIPES)
def test_recipe_snippet_runs(heading, sandbox, monkeypatch):
    if heading == "torch.compile":  # inductor is exercised by tests/test_compile.py; skip its C++ build here
        original = torch.compile
        monkeypatch.setattr(torch, "compile", lambda model, **kw: original(model, **{"backend": "aot_eager", **kw}))
    namespace = {"__name__": "readme"}
    exec(compile(SECTIONS[heading][0], f"README:{heading}", "exec"), namespace)
    opt = namespace.get("opt") or namespace.get("optimizer") or getattr(namespace.get("trainer"), "optimizer", None)
    if heading == "PyTorch Lightning":
        opt = namespace["trainer"].optimizers[0]
    assert opt is not None
    from salsa_fused.integrations import unwrap_salsa
    if heading != "Distributed checkpoint state dicts":  # that one round-trips an unstepped optimizer
        assert unwrap_salsa(opt).search_state.step > 0, "the snippet never stepped the optimizer"
