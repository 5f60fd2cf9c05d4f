"""benchmarks/plot_results.py: it draws the committed GPU suite runs, and says so when there is nothing."""
import io
import json
import tarfile

import pytest

from benchmarks import plot_results


def _suite_run(directory, smoke):
    directory.mkdir(parents=True)
    env = {"device": "NVIDIA H200" if not smoke else "cpu", "torch": "2.13.0", "date": "2026-12-02T00:00:00"}
    (directory / "rows.jsonl").write_text(json.dumps({"stage": "training", "name": "x", "env": env, "smoke": smoke})
                                          + "\n{cut by a killed stage\n")
    with tarfile.open(directory / "details.tar.gz", "w:gz") as archive:
        for name, sizes in (("adamw_fused", None), ("fused_salsa_copy", [1e-3] * 40)):
            data = json.dumps({"optimizer": name, "loss": [3.0 - 0.01 * i for i in range(40)],
                               "step_ms": [20.0] * 40, "step_size": sizes}).encode()
            info = tarfile.TarInfo(f"details/training_{name}.json")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_gpu_suite_runs_are_drawn_from_their_training_curves(tmp_path):
    _suite_run(tmp_path / "gpu" / "2026-12-02-h200-run1", smoke=False)
    written = plot_results.main(["--dir", str(tmp_path)])
    assert written == [tmp_path / "gpu" / "2026-12-02-h200-run1" / "training.png"]
    assert written[0].stat().st_size > 10_000
    _suite_run(tmp_path / "out", smoke=True)  # --dir a suite's own --out
    assert plot_results.main(["--dir", str(tmp_path / "out")]) == [tmp_path / "out" / "training.png"]


def test_nothing_to_draw_is_an_error_that_names_what_was_looked_for(tmp_path):
    with pytest.raises(SystemExit, match="nothing to draw in .*kernel_bench.*train_bench.*details.tar.gz"):
        plot_results.main(["--dir", str(tmp_path)])
