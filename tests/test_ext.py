"""salsa_fused/_ext.py: the JIT build (``SALSA_FUSED_JIT=1``) is a Python module like setup.py's
``salsa_fused._C``, so the bucket cache finds ``group_signature`` in it and a plain step on
unchanged tensors takes the fast path.

The build takes a minute or two of one core: it runs in a subprocess, as a background job
(tests/background.py), into a scratch ``TORCH_EXTENSIONS_DIR``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests import background

ROOT = Path(__file__).resolve().parents[1]

# Runs in the child: loads the JIT build, then four plain steps on the same tensors (counting
# the steps that took the Python path) and their weights against the torch reference.
JIT_CHILD = r"""
import json
from unittest import mock
import torch
from salsa_fused import FusedSaLSa, _ext, buckets
from salsa_fused.backends import cpp_backend

class NeverSearch:
    def scale(self, step):
        return 1.0
    def searches(self, step):
        return False

loaded = _ext.load()
module = _ext.module()
report = {"loaded": loaded, "error": repr(_ext._error), "module": getattr(module, "__name__", None),
          "group_signature": buckets._group_signature() is not None}
if loaded:
    weights = {}
    for backend in ("cpp", "torch"):
        params = [torch.linspace(-1, 1, 12).reshape(3, 4).requires_grad_(), torch.full((5,), 0.5, requires_grad=True)]
        opt = FusedSaLSa(params, backend=backend, schedule=NeverSearch(), init_step_size=1e-2)
        loss = sum((p ** 2).sum() for p in params)
        loss.backward()
        with mock.patch.object(buckets.BucketCache, "_attach_grads", wraps=buckets.BucketCache._attach_grads) as attach:
            for _ in range(4):
                opt.step(lambda: loss, loss=loss)
        report[backend] = {"backend": opt.backend.__name__, "python_path_steps": attach.call_count}
        weights[backend] = params
    report["bitwise_equal_to_torch"] = all(torch.equal(a, b) for a, b in zip(weights["cpp"], weights["torch"]))
print("REPORT " + json.dumps(report))
"""


def _jit_build(tmp: Path):
    env = {**os.environ, "SALSA_FUSED_JIT": "1", "TORCH_EXTENSIONS_DIR": str(tmp / "torch_extensions"),
           "PYTHONPATH": str(ROOT)}
    done = background.run_process([sys.executable, "-c", JIT_CHILD], cwd=ROOT, env=env, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    if done.returncode != 0 or not lines:
        raise AssertionError(f"the JIT child exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("REPORT "):])


JIT = background.job("jit build", _jit_build, seconds_hint=65)


@pytest.fixture(scope="module")
def jit():
    return JIT.result()


def test_jit_build_loads_as_a_python_module_with_group_signature(jit):
    assert jit["loaded"], jit["error"]
    assert jit["module"] == "salsa_fused_jit"
    assert jit["group_signature"]


def test_jit_build_takes_the_fast_path_and_matches_the_reference(jit):
    """Four plain steps on unchanged tensors: the Python passes run on the first only; the
    JIT-built ops give the torch reference's weights bitwise (fp32, under 64 elements)."""
    assert jit["cpp"] == {"backend": "salsa_fused.backends.cpp_backend", "python_path_steps": 1}
    assert jit["bitwise_equal_to_torch"]
