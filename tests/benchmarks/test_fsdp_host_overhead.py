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
