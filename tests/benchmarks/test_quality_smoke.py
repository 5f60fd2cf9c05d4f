"""The quality suite end to end at its tiny size: every task, each optimizer family, a few steps."""

import json
import math
import os

import pytest
import torch

from benchmarks.quality import run


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def test_quality_suite_runs_end_to_end(tmp_path):
    out = str(tmp_path)
    names = "salsa_faithful,salsa_recommended,prodigy,schedulefree,salsa_published"
    code = run.main(["--size", "tiny", "--tasks", "gpt,digits,seqcls,diabetes", "--optimizers", names,
                     "--adamw-lrs", "1e-3,1e-2", "--steps", "12", "--out", out, "--threads", "1"])
    assert code == 0
    with open(os.path.join(out, "summary.json")) as handle:
        tables = json.load(handle)
    assert set(tables) == {"gpt", "digits", "seqcls", "diabetes"}
    for task, table in tables.items():
        for name in names.split(",") + ["adamw_1e-3", "adamw_1e-2"]:
            row = table[name]
            assert math.isfinite(row["final_train_loss"]) and math.isfinite(row["val_loss"]), (task, name)
            assert row["forwards_per_step"] >= 1.0
        assert table["salsa_faithful"]["forwards_per_step"] > 1.0  # the first steps all search
        assert os.path.exists(os.path.join(out, f"{task}.png"))
        with open(os.path.join(out, f"{task}.json")) as handle:
            runs = json.load(handle)["runs"]
        faithful = runs["salsa_faithful"][0]
        assert len(faithful["losses"]) == 12 and faithful["searches"]
        # same weights and batches for every optimizer: the first loss (before any step) agrees
        firsts = {n: r[0]["losses"][0] for n, r in runs.items()}
        assert max(firsts.values()) - min(firsts.values()) < 1e-5, firsts
    summary = open(os.path.join(out, "summary.md")).read()
    assert "| salsa_recommended |" in summary
