import torch

from vitlab import bench, models

CPU = torch.device("cpu")


def test_latency_rows(checkpoint, f32):
    model = models.load_checkpoint(checkpoint, f32, CPU)
    rows = [bench.latency(model, bs, 16, CPU, warmup=1, iters=5) for bs in (1, 4)]
    assert [r["batch_size"] for r in rows] == [1, 4]
    for r in rows:
        assert r["n"] == 5 and r["peak_mem_kind"] == "process peak RSS"
        assert 10 < r["peak_mem_mb"] < 24 * 2**10  # this Python process: more than 10 MB, less than the machine
        assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["throughput_img_s"] == r["batch_size"] / r["p50_ms"] * 1e3


def test_profile_breakdown_covers_every_component(checkpoint, f32):
    model = models.load_checkpoint(checkpoint, f32, CPU)
    x = bench.random_batch(model, 4, 16, CPU)
    table = bench.profile_components(model, x, iters=2)
    assert list(table["component"]) == ["patch_embed", "attention", "mlp", "norm", "classifier", "other"]
    assert (table.set_index("component").loc[["patch_embed", "attention", "mlp", "norm"], "time_ms"] > 0).all()
    assert abs(table["share"].sum() - 1) < 1e-6
    assert table.attrs["clock"] == "cpu" and table.attrs["forward_ms"] > 0
    # The hooks are gone afterwards.
    assert not any(m._forward_pre_hooks for m in model.modules())
