"""benchmarks/cpu_kernel_bench.py end to end at a tiny size: every provider runs, the ratios
and the thread list come out, and the compiled passes it times change what they should."""

from __future__ import annotations

import pytest
import torch

from salsa_fused.backends import cpp_backend

pytestmark = pytest.mark.skipif(not cpp_backend.supports(torch.device("cpu")),
                                reason="the C++ extension is not built (nvcc/compiler-free install)")


def test_every_provider_runs_and_moves_its_tensors(monkeypatch):
    from benchmarks import cpu_kernel_bench as B
    shapes = [(8, 4), (16,)]
    fns = B.build(shapes, torch.float32)
    assert {"adamw_fused", "adamw_foreach", "cpp_plain", "torch_plain", "cpp_pass_a", "cpp_pass_b",
            "cpp_slope", "cpp_plain_raw", "cpp_pass_a_raw", "cpp_slope_raw", "cpp_restore_inplace"} <= set(fns)
    restored = []  # the buckets restore ran on, their weights after it
    restore = cpp_backend.restore
    monkeypatch.setattr(cpp_backend, "restore", lambda bucket, args: restored.append(
        (bucket, [p.clone() for p in bucket.params], restore(bucket, args))))
    with torch.no_grad():
        for name, fn in fns.items():
            out = fn()
            if name in ("cpp_slope", "cpp_slope_raw"):
                assert out.dim() == 0 and float(out) > 0
    (bucket, before, _), = restored
    assert bucket.saved is None  # in place, not the copy
    assert not all(torch.equal(a, b) for a, b in zip(bucket.params, before))


def test_run_measures_each_thread_count(tmp_path):
    from benchmarks import cpu_kernel_bench as B
    record = B.run(scale=0.002, repeats=2, threads_list=[1, 2], dtypes=["float32"], warmup=1)
    assert [r["threads"] for r in record["results"]] == [1, 2]
    for result in record["results"]:
        assert result["vs_adamw_fused"]["adamw_fused"] == 1.0
        assert set(result["targets_met"]) == set(B.TARGETS)
    B.write(record, tmp_path)
    assert (tmp_path / "cpu_kernel_bench.json").exists() and (tmp_path / "cpu_kernel_bench.md").exists()
    smaller = B.run(scale=0.001, repeats=2, threads_list=[1], dtypes=["float32"], warmup=1)
    B.write(smaller, tmp_path)
    text = (tmp_path / "cpu_kernel_bench.md").read_text()
    history = text.split("## Every run")[1].split("\n## ")[0]
    for run in (record, smaller):  # each run's size and repeats beside its ratios, and its own full table
        assert f"| {run['size']} | 2 |" in history
        assert text.count(f"commit {run['environment']['git_commit']}: {run['size']}") == 1
    assert text.index(f": {smaller['size']}") < text.index(f": {record['size']}")  # newest first


@pytest.mark.parametrize("flags, message", [
    (["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    (["--threads", "1", "0"], "argument --threads: must be at least 1, got 0"),
    (["--dtypes", "foo"], "argument --dtypes: invalid choice: 'foo'"),
    (["--dtypes", "int32"], "argument --dtypes: invalid choice: 'int32'"),
    (["--scale", "0"], "argument --scale: must be a finite number > 0"),
])
def test_a_bad_flag_is_refused_before_anything_is_measured(tmp_path, flags, message, capsys, monkeypatch):
    from benchmarks import cpu_kernel_bench as B
    monkeypatch.setattr(B, "run", lambda *a, **k: pytest.fail("measured before refusing"))
    with pytest.raises(SystemExit) as refused:
        B.main([*flags, "--out-dir", str(tmp_path)])
    assert refused.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_an_out_dir_that_is_a_file_or_an_unreadable_results_file_is_refused_before_measuring(tmp_path, capsys,
                                                                                             monkeypatch):
    from benchmarks import cpu_kernel_bench as B
    monkeypatch.setattr(B, "run", lambda *a, **k: pytest.fail("measured before refusing"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    damaged = tmp_path / "cpu_kernel_bench.json"
    damaged.write_text('{"runs": [')
    for out_dir, message in ((a_file, "argument --out-dir: "), (tmp_path, f"{damaged} is not a results file")):
        with pytest.raises(SystemExit) as refused:
            B.main(["--out-dir", str(out_dir)])
        assert refused.value.code == 2 and message in capsys.readouterr().err
    assert damaged.read_text() == '{"runs": [' and a_file.read_text() == "x"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only check")
def test_device_cuda_without_a_gpu_says_so(tmp_path, capsys, monkeypatch):
    """Building the extension would not help: there is no CUDA device (or CUDA torch) to run on."""
    from benchmarks import cpu_kernel_bench as B
    monkeypatch.setattr(B, "run", lambda *a, **k: pytest.fail("measured before refusing"))
    with pytest.raises(SystemExit) as refused:
        B.main(["--device", "cuda", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "--device cuda: no CUDA device here" in err and "build" not in err
