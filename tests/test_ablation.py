import pytest
import torch

from vitlab import ablation

CPU = torch.device("cpu")
MODEL = {"id": None, "config": {}, "attention": "sdpa", "dtype": "float32"}
Q = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "bfloat16", "int8_threshold": 6.0,
     "keep_16bit": []}


@pytest.fixture(scope="module")
def rows(checkpoint, digits_data):
    batches = list(digits_data.loader("valid", 100))[:1]
    return ablation.sweep(checkpoint, MODEL, Q, ["nf4"], batches, CPU)


def test_sweep_scores_every_configuration_against_16bit(rows):
    assert rows[0]["config"] == "16-bit" and rows[0]["kl"] == 0
    nf4 = [r for r in rows if r["quant"] == "nf4"]
    assert [r["config"] for r in nf4] == ["all quantized", "keep layer 0", "keep layer 1", "keep layer 2",
                                          "keep first+last", "keep attention", "keep mlp"]
    everything = nf4[0]
    assert everything["kl"] > 0 and everything["kept_modules"] == 0
    for r in nf4[1:4]:
        assert r["kept_modules"] == 6 and r["footprint_mb"] > everything["footprint_mb"]
    assert all(r["top1_lo"] <= r["top1"] <= r["top1_hi"] for r in rows)


def test_choose_keep_spends_the_budget_on_the_most_kl_per_mb(rows):
    nf4 = {r["config"]: r for r in rows if r["quant"] == "nf4"}
    all_q = nf4["all quantized"]
    layer_cost = nf4["keep layer 0"]["footprint_mb"] - all_q["footprint_mb"]
    none = ablation.choose_keep(rows, "nf4", all_q["footprint_mb"])
    assert none["keep_16bit"] == [] and none["est_kl"] == pytest.approx(all_q["kl"])
    one = ablation.choose_keep(rows, "nf4", all_q["footprint_mb"] + 1.5 * layer_cost)
    best = min((nf4[f"keep layer {i}"]["kl"], i) for i in range(3))[1]
    assert one["keep_16bit"] == [best] and one["est_footprint_mb"] <= one["budget_mb"]
    with pytest.raises(ValueError, match="below the fully quantized"):
        ablation.choose_keep(rows, "nf4", all_q["footprint_mb"] / 2)
