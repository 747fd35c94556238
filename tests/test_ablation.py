from pathlib import Path

import pytest
import torch

from vitlab import ablation, models, quant

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def batches(digits_data):
    return list(digits_data.loader("valid", 100))[:1]


@pytest.fixture(scope="module")
def rows(checkpoint, f32, nf4, batches):
    return ablation.sweep(checkpoint, f32, nf4, ["nf4"], batches, CPU)


def by_config(rows):
    return {r["config"]: r for r in rows if r["quant"] in ("nf4", "16-bit")}


def test_sweep_scores_every_configuration_against_16bit(rows):
    assert rows[0]["config"] == "16-bit" and rows[0]["kl"] == 0
    nf4 = [r for r in rows if r["quant"] == "nf4"]
    order = ablation.greedy_order(rows, "nf4")
    assert [r["config"] for r in nf4] == ["all quantized", "keep layer 0", "keep layer 1", "keep layer 2",
                                          "keep first+last", "keep last quarter", "keep attention", "keep mlp",
                                          *[f"greedy {k}" for k in range(1, len(order) + 1)]]
    everything = nf4[0]
    assert everything["kl"] > 0 and everything["kept_modules"] == 0
    for r in nf4[1:4]:
        assert r["kept_modules"] == 6 and r["footprint_mb"] > everything["footprint_mb"]
    for r in rows:
        assert r["top1_lo"] <= r["top1"] <= r["top1_hi"] and r["kl_lo"] <= r["kl"] <= r["kl_hi"]


def test_a_configuration_is_the_model_quantize_loads(checkpoint, f32, nf4, batches):
    # The sweep swaps once-quantized layers in and out of one loaded model instead of reloading the
    # checkpoint per configuration: the result must be exactly what the quantize step would load.
    scorer = ablation._Scorer(checkpoint, f32, batches, CPU)
    x = batches[0][0][:16]
    for q in (nf4, nf4.replace(bits=8)):
        for keep in ([], [1], "first_last"):
            kept = scorer.resolve(keep)
            size = scorer.assemble(q, kept)
            loaded = quant.quantize(checkpoint, q, f32, CPU, kept)
            assert size == models.parameter_bytes(loaded)
            with torch.inference_mode():
                assert torch.equal(scorer.model(pixel_values=x).logits, loaded(pixel_values=x).logits)
    assert len(scorer.twins) == 2 * len(scorer.originals)  # each layer quantized once per type


def test_greedy_path_keeps_layers_in_order_of_kl_saved_per_mb(rows):
    c = by_config(rows)
    order = ablation.greedy_order(rows, "nf4")
    assert order, "keeping some layer of a quantized model must bring its logits closer to 16-bit"
    per_mb = {i: (c["all quantized"]["kl"] - c[f"keep layer {i}"]["kl"]) /
              (c[f"keep layer {i}"]["footprint_mb"] - c["all quantized"]["footprint_mb"]) for i in order}
    assert [per_mb[i] for i in order] == sorted(per_mb.values(), reverse=True)
    for k in range(1, len(order) + 1):
        r = c[f"greedy {k}"]
        assert r["keep_16bit"] == sorted(order[:k]) and r["kept_modules"] == 6 * k


def test_choose_under_a_size_budget_takes_the_lowest_kl_that_fits(rows):
    c = by_config(rows)
    all_q, one = c["all quantized"], c["greedy 1"]
    assert ablation.choose(rows, "nf4", budget_mb=all_q["footprint_mb"])["keep_16bit"] == []
    pick = ablation.choose(rows, "nf4", budget_mb=one["footprint_mb"] + 1e-6)
    assert pick["config"] == ("greedy 1" if one["kl"] < all_q["kl"] else "all quantized")
    assert pick["footprint_mb"] <= pick["budget_mb"]
    with pytest.raises(ValueError, match="no nf4 configuration fits"):
        ablation.choose(rows, "nf4", budget_mb=all_q["footprint_mb"] / 2)


def test_choose_under_an_accuracy_budget_takes_the_smallest_that_fits(rows):
    c = by_config(rows)
    ref = c["16-bit"]["top1"]
    cands = [r for r in rows if r["quant"] == "nf4" and r["kind"] in ("all quantized", "greedy")]
    assert ablation.choose(rows, "nf4", max_top1_drop=1.0)["config"] == "all quantized"  # any loss allowed: smallest
    for drop in sorted({max(ref - r["top1"], 0.0) for r in cands}):
        pick = ablation.choose(rows, "nf4", max_top1_drop=drop)
        fits = [r for r in cands if ref - r["top1"] <= drop + 1e-12]
        assert pick["footprint_mb"] == min(r["footprint_mb"] for r in fits) and ref - pick["top1"] <= drop + 1e-12
    # An accuracy budget that only the 16-bit model meets: every quantized configuration is refused.
    best_loss = min(ref - r["top1"] for r in cands)
    with pytest.raises(ValueError, match="loosen a budget"):
        ablation.choose(rows, "nf4", max_top1_drop=best_loss - 1e-3)
    with pytest.raises(ValueError, match="needs a size budget"):
        ablation.choose(rows, "nf4")


def test_choose_all_applies_the_default_budget_and_writes_a_runnable_params_file(rows, smoke_params, checkpoint,
                                                                                 tmp_path):
    from vitlab import config
    budgets = {**smoke_params["ablation"], "quant_types": ["nf4"]}
    c = by_config(rows)
    choices = ablation.choose_all(rows, budgets)
    smallest, full = c["all quantized"]["footprint_mb"], c["16-bit"]["footprint_mb"]
    assert choices["nf4"]["budget_mb"] == pytest.approx(smallest + (full - smallest) / 4)
    (written,) = ablation.write_mixed(tmp_path, smoke_params, choices, checkpoint)
    mixed = config.resolve(written)
    assert written.name == "smoke_nf4_mixed.yaml" and mixed["quant"]["keep_16bit"] == choices["nf4"]["keep_16bit"]
    # The run's trained model, as it is: `vitlab run` of this file quantizes it, it does not train again.
    assert mixed["model"]["id"] == str(Path(checkpoint).resolve()) and mixed["finetune"]["method"] == "none"
    assert "ablation" not in mixed["steps"]


def test_check_choice_gives_paired_differences_against_the_heuristics(rows, checkpoint, digits_data, f32, nf4):
    held_out = list(digits_data.loader("test", 100))[:1]
    c = by_config(rows)
    choice = ablation.choose(rows, "nf4", budget_mb=c["greedy 1"]["footprint_mb"] + 1e-6)
    checks = ablation.check_choice(checkpoint, f32, nf4, choice, rows, held_out, CPU)
    groups = list(dict.fromkeys(r["comparison"] for r in checks))
    assert groups[0].startswith("budget") and groups[1:] == ["size of keep first+last", "size of keep last quarter"]
    first = [r for r in checks if r["comparison"] == groups[0]]
    assert [r["config"] for r in first][-1].startswith("chosen") and "keep first+last" in [r["config"] for r in first]
    match = ablation.choose(rows, "nf4", budget_mb=c["keep first+last"]["footprint_mb"])
    same_size = [r for r in checks if r["comparison"] == groups[1]]
    assert [r["config"] for r in same_size] == ["keep first+last", f"greedy {match['keep_16bit']} at that size"
                                                if match["keep_16bit"] else "all quantized at that size"]
    for group in groups:
        mine = [r for r in checks if r["comparison"] == group and r["chosen"]]
        assert len(mine) == 1
        chosen = mine[0]
        assert chosen["d_top1"] == 0 and chosen["d_kl"] == 0
        for r in (r for r in checks if r["comparison"] == group):
            assert r["d_top1_lo"] <= r["d_top1"] <= r["d_top1_hi"] and r["d_kl_lo"] <= r["d_kl"] <= r["d_kl_hi"]
            assert r["d_top1"] == pytest.approx(chosen["top1"] - r["top1"])
            assert r["d_kl"] == pytest.approx(chosen["kl"] - r["kl"])
    lines = ablation.verdicts(checks)
    assert len(lines) == sum(not r["chosen"] for r in checks)
    assert all(("a tie" in l) != ("a real difference" in l) for l in lines)


def test_pareto_front_holds_every_undominated_configuration(rows):
    tried = [r for r in rows if r["quant"] in ("nf4", "16-bit")]
    front = ablation.pareto_front(tried, "kl", higher_is_better=False)
    assert front[0]["config"] == "all quantized" and front[-1]["config"] == "16-bit"
    assert [r["footprint_mb"] for r in front] == sorted(r["footprint_mb"] for r in front)
    for r in tried:
        assert any(f["footprint_mb"] <= r["footprint_mb"] and f["kl"] <= r["kl"] for f in front)
    for a, b in zip(front, front[1:]):
        assert b["kl"] < a["kl"]  # each step of the front buys a lower KL with more memory


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory, digits_data):
    """A ViT whose linears take inputs in whole groups of 128 (vitlab's int4 format needs them)."""
    settings = models.ModelSettings(id=None, dtype=torch.bfloat16, attention="sdpa", config={
        "image_size": 16, "patch_size": 4, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 256})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wide") / "vit"
    models.build(settings, digits_data.class_names).save_pretrained(str(path))
    models.load_processor(settings).save_pretrained(str(path))
    return str(path), settings


def test_vitlabs_own_formats_are_swept_per_layer_like_bitsandbytes(wide_checkpoint, nf4, batches):
    from vitlab import lowbit

    path, settings = wide_checkpoint
    rows = ablation.sweep(path, settings, nf4, ["fp8", "w4a16"], batches, CPU)
    for fmt, cls in (("fp8", lowbit.Fp8Linear), ("w4a16", lowbit.Int4Linear)):
        mine = {r["config"]: r for r in rows if r["quant"] == fmt}
        assert {"all quantized", "keep layer 0", "keep layer 1", "keep first+last"} <= set(mine)
        assert mine["all quantized"]["kl"] > 0
        assert mine["keep layer 0"]["footprint_mb"] > mine["all quantized"]["footprint_mb"]
    scorer = ablation._Scorer(path, settings, batches, CPU)
    list(scorer.run(ablation.quant_settings(nf4, "fp8"), [ablation.Config("all quantized", None, [])]))
    twins = [layer for (q, _), (layer, _) in scorer.twins.items()]
    assert len(twins) == len(scorer.originals) and all(isinstance(t, lowbit.Fp8Linear) for t in twins)
    assert all(float(t.input_scale) > 0 for t in twins)  # calibrated on the sweep's images


def test_a_choice_in_vitlabs_format_becomes_speed_params_that_keep_its_layers(wide_checkpoint, nf4, batches, tmp_path):
    from vitlab import config

    path, settings = wide_checkpoint
    rows = ablation.sweep(path, settings, nf4, ["fp8"], batches, CPU)
    choice = ablation.choose(rows, "fp8", budget_mb=max(r["footprint_mb"] for r in rows))
    params = config.merge(config.defaults(), {"variant": "wide", "model": {"id": path}})
    mixed = ablation.mixed_params(params, choice, path)
    assert mixed["quant"]["bits"] == 16 and mixed["speed"]["fp8"] == "static"
    assert mixed["speed"]["keep_16bit"] == choice["keep_16bit"] and mixed["finetune"]["method"] == "none"
    config.validate(mixed)


def test_the_seeds_deep_layers_of_a_24_layer_model_are_a_group_not_one_layer():
    configs = {c.name: c for c in ablation.configurations(24)}
    assert configs["keep layers 20-23"].keep == [20, 21, 22, 23] and configs["keep layers 20-23"].layer is None
    assert ablation._kind(configs["keep layers 20-23"]) == "group" and ablation._kind(configs["keep layer 21"]) == "single layer"
    assert "keep layers 20-23" in [c.name for c in ablation.heuristics(24)]
    assert not any(c.name.startswith("keep layers") for c in ablation.configurations(6))  # the last quarter is it there
