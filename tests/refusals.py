"""What a refusal must leave as it was, checked once for every test file that refuses bad input.

"Unchanged" means bitwise: every weight, both moments of every parameter (and its counts of steps sat
out), the search dict (k, eta, h, s, eta_fast, eta_slow, t and the counters) and the param groups.
"""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch


def snapshot(opt) -> dict:
    """Copies of everything a refused call must not change in ``opt`` (a FusedSaLSa)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return dict(
        weights=[p.detach().clone() for p in params],
        moments=[{k: v.clone() if isinstance(v, torch.Tensor) else deepcopy(v) for k, v in opt.state[p].items()}
                 for p in params],
        search=opt.state_dict()["param_groups"][0]["search"],
        groups=[{k: deepcopy(v) for k, v in g.items() if k not in ("params", "search")} for g in opt.param_groups],
        group_sizes=[len(g["params"]) for g in opt.param_groups])


def assert_unchanged(before: dict, after: dict) -> None:
    for i, (a, b) in enumerate(zip(before["weights"], after["weights"])):
        assert torch.equal(a, b), f"weight {i} changed"
    assert len(before["weights"]) == len(after["weights"])
    for i, (a, b) in enumerate(zip(before["moments"], after["moments"])):
        assert a.keys() == b.keys(), f"state keys of param {i} changed"
        for key in a:
            same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
            assert same, f"{key} of param {i} changed"
    assert before["search"] == after["search"]
    assert before["groups"] == after["groups"] and before["group_sizes"] == after["group_sizes"]


def assert_load_refused(opt, state_dict: dict, match: str) -> None:
    """``opt.load_state_dict(state_dict)`` raises ValueError matching ``match`` and changes nothing."""
    before = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state_dict)
    assert_unchanged(before, snapshot(opt))


def give_gradient_of_another_dtype(param: torch.Tensor, gradient: torch.Tensor) -> None:
    """``param.grad = gradient`` though their dtypes differ, as a bad gradient can arrive: torch with
    ``Tensor.grad_dtype`` takes it once that is None; torch 2.4 refuses the assignment, not a ``.data`` swap."""
    if hasattr(torch.Tensor, "grad_dtype"):
        param.grad_dtype = None
        param.grad = gradient
    else:
        param.grad = torch.zeros_like(param)
        param.grad.data = gradient
