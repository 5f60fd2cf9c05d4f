"""benchmarks/fsdp_host_overhead.py on 2 gloo processes at a small size: FusedSaLSa and both
AdamWs step the same FSDP2 DTensor parameters, and the record carries every ratio."""

import torch.distributed as dist
import pytest


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_measures_fused_salsa_beside_adamw_on_dtensors():
    from benchmarks import fsdp_host_overhead as F
    (record,) = F.measure(sizes=(12,), steps=2, warmup=1)
    assert record["n_tensors"] == 12 and record["world_size"] == 2
    for key in ("fused_salsa_plain_p50_host_ms", "loss_all_reduce_p50_host_ms", "adamw_foreach_p50_host_ms"):
        assert record[key] > 0, key
    assert record["fused_salsa_plain_vs_adamw_foreach"] > 0
    assert record["fused_salsa_plain_without_all_reduce_ms"] < record["fused_salsa_plain_p50_host_ms"]


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["--sizes"], "argument --sizes: expected at least one argument"),
    (["--sizes", "0"], "argument --sizes: must be at least 1, got 0"),
    (["--out", "{tmp}"], "argument --out: "),  # a directory
])
def test_a_bad_flag_is_refused_before_anything_is_measured(tmp_path, flags, message, capsys, monkeypatch):
    from benchmarks import fsdp_host_overhead as F
    monkeypatch.setattr(F, "measure", lambda *a, **k: pytest.fail("measured before refusing"))
    with pytest.raises(SystemExit) as refused:
        F.main(["--out", str(tmp_path / "rows.jsonl"), *(f.format(tmp=tmp_path) for f in flags)])
    assert refused.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_rows_name_the_one_thread_each_worker_runs_on(tmp_path, monkeypatch):
    import json

    import torch

    from benchmarks import fsdp_host_overhead as F
    monkeypatch.setattr(F, "measure", lambda sizes, steps: [{"n_tensors": 4}])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert F.main(["--out", str(tmp_path / "rows.jsonl")]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    (row,) = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert "1 torch threads" in row["env"]["device"], row["env"]["device"]
