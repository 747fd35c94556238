"""The benchmark results' one shape, and docs generated from them that cannot drift from them."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import common  # noqa: E402
import summarize  # noqa: E402

RESULTS = sorted((BENCHMARKS / "results").rglob("*.json"))
SCRIPTS = {p.stem for p in BENCHMARKS.glob("*.py")} - {"run", "common", "summarize"}
RUN_PRODUCTS = {"train_speed", "evaluate"}  # `vitlab run` products kept as results (meta.command says how)


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_every_result_is_meta_and_flat_rows_named_after_its_benchmark_and_device(path):
    result = json.loads(path.read_text())
    assert set(result) == {"meta", "rows"}
    assert result["meta"]["command"] and result["meta"]["device"]["type"] in ("cuda", "cpu")
    assert result["rows"] and all(isinstance(r, dict) for r in result["rows"])
    tag = common.device_tag(result["meta"]["device"])
    match = re.fullmatch(rf"(?:(?P<bench>[a-z0-9_]+?)_{tag})(?:_[a-z0-9_]+)?", path.stem)
    assert match, f"{path.name}: not <bench>_{tag}[_tag]"
    assert match["bench"] in SCRIPTS | RUN_PRODUCTS, f"{path.name}: no benchmarks/{match['bench']}.py"


def test_write_and_by_table_round_trip_several_tables(tmp_path):
    args = argparse.Namespace(out=str(tmp_path), device="cpu", tag="check")
    path = common.write(args, "peers", 0.0, common.tables(rows=[{"path": "stock", "p50_ms": 1.0}],
                                                        kernels=[{"kernel": "gemm", "ms": 0.5}]), context={"arch": "tiny"})
    assert path.name == "peers_cpu_check.json"
    tables = common.by_table(json.loads(path.read_text()))
    assert tables["rows"] == [{"path": "stock", "p50_ms": 1.0}] and tables["kernels"] == [{"kernel": "gemm", "ms": 0.5}]
    assert tables["meta"]["context"] == {"arch": "tiny"} and tables["meta"]["device"]["type"] == "cpu"
    assert tables["meta"]["git"] and tables["meta"]["versions"]["torch"]


def test_device_tag_is_the_model_number():
    assert common.device_tag({"type": "cuda", "name": "NVIDIA H200"}) == "h200"
    assert common.device_tag({"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}) == "h100"
    assert common.device_tag({"type": "cpu", "name": "x86_64"}) == "cpu"


def test_docs_results_is_what_summarize_makes_of_the_results():
    committed = (Path(__file__).parents[1] / "docs" / "results.md").read_text()
    assert summarize.results_md() == committed, "docs/results.md drifted: run `python benchmarks/run.py summarize`"


def test_a_study_continues_a_run_only_if_it_ran_with_this_commands_params(smoke_run):
    """benchmarks' `continued` reuses or resumes an earlier run of the same name only when nothing of its
    params differs from what this command would run; otherwise the changed keys are named."""
    ran = common.runs.load_params(smoke_run)
    steps = ",".join(ran["steps"])
    assert common.changed(smoke_run, "params/smoke.yaml", steps, [], "auto") == {}
    assert common.changed(smoke_run, "params/smoke.yaml", steps, ["finetune.lr=0.5", "eval.iters=7"], "auto") == {
        "eval.iters": (ran["eval"]["iters"], 7), "finetune.lr": (ran["finetune"]["lr"], 0.5)}


def test_a_fast_transfer_run_is_paired_with_its_eager_one_on_the_same_images(tmp_path):
    """flowers_transfer.paired: the difference of two methods' runs image by image, and a refusal when
    the runs were not tested on the same images."""
    import flowers_transfer
    import numpy as np
    import pandas as pd
    import yaml

    def run(name: str, index: int, true: list[int], predicted: list[int]) -> Path:
        folder = tmp_path / name
        (folder / "evaluate").mkdir(parents=True)
        (folder / "params.yaml").write_text(yaml.safe_dump({"variant": f"vitl16_transfer_{index}"}))
        pd.DataFrame({"model": "16-bit (bfloat16)", "image": np.arange(len(true)), "true": true,
                      "predicted": predicted}).to_csv(folder / "evaluate" / "predictions.csv", index=False)
        return folder

    true = [0, 1, 2, 3] * 25
    eager = run("eager", 2, true, true)  # every image right
    fast = run("fast", 6, true, [t if i % 10 else (t + 1) % 4 for i, t in enumerate(true)])  # every tenth wrong
    row = flowers_transfer.paired(fast, eager)
    assert row["vs"] == list(flowers_transfer.METHODS)[2] and row["vs_run"] == "eager"
    assert row["top1_vs_pt"] == pytest.approx(-10.0)
    assert row["top1_vs_lo_pt"] < -10.0 < row["top1_vs_hi_pt"] < 0
    other = run("other", 2, true[::-1], true[::-1])
    with pytest.raises(ValueError, match="not tested on the same images"):
        flowers_transfer.paired(fast, other)


def test_collect_transfer_replaces_the_methods_given_keeps_the_others_and_names_each_rows_pretraining(tmp_path):
    """vitl16_flowers collect --transfer into a file of an earlier session: a method given replaces its row, a
    method not given keeps its earlier row, and every row names the half_a pretraining it started from (the
    checkpoint's path is the same for every pretraining); meta the collect does not write (the demo) stays."""
    import vitl16_flowers
    import yaml

    device = {"type": "cuda", "name": "NVIDIA H200"}

    def run(name: str, variant: str, top1: float = 0.0) -> Path:
        folder = tmp_path / name
        (folder / "finetune").mkdir(parents=True)
        (folder / "evaluate").mkdir()
        (folder / "params.yaml").write_text(yaml.safe_dump({"variant": variant}))
        (folder / "manifest.json").write_text(json.dumps({"device": device, "git": {"commit": "abc"}, "versions": {},
                                                          "commands": [], "steps": {"finetune": {"seconds": 9.0}}}))
        (folder / "finetune" / "metrics.json").write_text(json.dumps({
            "history": [{"epoch": 1, "val_acc": 0.5, "train_img_s": 100.0, "selected": True}], "class_names": ["a", "b"],
            "trainable_params": 10, "total_params": 100, "peak_vram_mb": 1.0, "s_per_epoch": 2.0}))
        (folder / "evaluate" / "results.json").write_text(json.dumps({"accuracy": [
            {"top1": top1, "top1_lo": top1 - 0.1, "top1_hi": top1 + 0.1, "top5": 1.0, "n": 10}]}))
        return folder

    old_pretrain, old_probe, old_lora = ("2026-01-01_000000_flowers_vitl16_half_a", "2026-01-01_000100_vitl16_transfer_0",
                                         "2026-01-01_000200_vitl16_transfer_2")
    into = tmp_path / "vitl16_flowers_h200.json"
    into.write_text(json.dumps({"meta": {
        "weights": "w", "versions": {}, "trainings": {}, "demo": {"run": "the demo"},
        "transfer": {"git": {"commit": "old"}, "commands": ["old command"], "pretrain": [
            {"variant": "flowers_vitl16_half_a", "run": old_pretrain}]}}, "rows": [
        {"table": "model", "run": "trained"},
        {"table": "transfer", "method": "probe", "top1": 0.7, "run": old_probe},
        {"table": "transfer", "method": list(vitl16_flowers.METHODS)[2], "top1": 0.6, "run": old_lora}]}))
    pretrain = run("2026-02-01_000000_flowers_vitl16_half_a", "flowers_vitl16_half_a")
    lora = run("2026-02-01_000100_vitl16_transfer_2", "vitl16_transfer_2", top1=0.8)
    args = argparse.Namespace(into=str(into), transfer=[str(pretrain), str(lora)], why_not_run="ran out", out=str(tmp_path),
                              device="auto", tag="")
    assert vitl16_flowers.collect_transfer(args) == into
    result = json.loads(into.read_text())
    transfer = {r["method"]: r for r in result["rows"] if r["table"] == "transfer"}
    assert set(transfer) == {"probe", list(vitl16_flowers.METHODS)[2]}
    new = transfer[list(vitl16_flowers.METHODS)[2]]
    assert (new["top1"], new["run"], new["pretrain_run"]) == (0.8, lora.name, pretrain.name)
    assert (transfer["probe"]["top1"], transfer["probe"]["pretrain_run"]) == (0.7, old_pretrain)
    assert [r["table"] for r in result["rows"]].count("model") == 1
    meta = result["meta"]
    assert meta["demo"] == {"run": "the demo"}
    assert meta["transfer"]["earlier"]["runs"] == [old_probe] and meta["transfer"]["earlier"]["commands"] == ["old command"]
    assert [p["run"] for p in meta["transfer"]["pretrain"]] == [pretrain.name]
    assert "probe" not in meta["transfer"]["not_run"] and meta["transfer"]["why_not_run"] == "ran out"


def test_mixed_formats_into_adds_a_model_to_the_other_models_studies(tmp_path, capsys):
    """mixed_formats --into: the ViT-L's study joins the ViT-S's in one file, a model collected again replaces
    its own rows, and a file this collect would not write is refused before anything is written."""
    import mixed_formats
    import yaml

    def run(name: str, top1: float) -> Path:
        folder = tmp_path / name
        (folder / "ablation").mkdir(parents=True)
        (folder / "params.yaml").write_text(yaml.safe_dump({"variant": name}))
        (folder / "manifest.json").write_text(json.dumps({"device": {"type": "cuda", "name": "NVIDIA H200"}}))
        check = {"choice": "uniform_fp8", "formats": ["fp8"] * 2, "batch_size": 256, "p50_ms": 1.0, "top1": top1,
                 "top1_lo": top1, "top1_hi": top1, "top1_delta_pt": 0.0, "delta_lo_pt": 0.0, "delta_hi_pt": 0.0,
                 "vs_choice_pt": 0.0, "vs_choice_lo_pt": 0.0, "vs_choice_hi_pt": 0.0, "kl": 0.0, "n": 10}
        (folder / "ablation" / "mixed_formats.json").write_text(json.dumps(
            {"verify_split": "test", "checks": [check], "candidates": [{**check, "choice": "candidate_0"}]}))
        return folder

    out = ["--out", str(tmp_path)]
    mixed_formats.main([str(run("small", 0.5)), "--model", "vit_s16", *out])
    into = tmp_path / "mixed_formats_h200.json"
    mixed_formats.main([str(run("large", 0.6)), "--model", "vit_l16", "--into", str(into), *out])
    mixed_formats.main([str(run("large_again", 0.7)), "--model", "vit_l16", "--into", str(into), *out])
    result = json.loads(into.read_text())
    assert sorted((r["model"], r.get("table", "check"), r["top1"]) for r in result["rows"]) == [
        ("vit_l16", "candidate", 0.7), ("vit_l16", "check", 0.7), ("vit_s16", "candidate", 0.5), ("vit_s16", "check", 0.5)]
    assert result["meta"]["runs"] == {"vit_s16": "small", "vit_l16": "large_again"}
    with pytest.raises(SystemExit, match="this collect writes"):
        mixed_formats.main([str(run("other", 0.1)), "--model", "vit_l16", "--into", str(into), "--tag", "x", *out])
    assert not (tmp_path / "mixed_formats_h200_x.json").exists()


def test_every_vitl16_variant_and_the_mixed_study_resolve_to_valid_params_before_any_device_time():
    """What `vitl16_flowers variants`/`all` would hand each `vitlab run` (its params file, the flowers changes and
    its own) is accepted by vitlab's settings, and its steps are vitlab's: a typo here would cost a device session."""
    import vitl16_flowers

    from vitlab import config, runs

    for variant in vitl16_flowers.PLANNED:
        params_file, steps, extra = vitl16_flowers.plan(variant)
        params = config.resolve(runs.REPO_ROOT / params_file, ["model.id=runs/x/finetune/model", *vitl16_flowers.FLOWERS, *extra])
        assert set(steps.split(",")) <= set(runs.STEPS), variant
        assert params["finetune"]["method"] == "none", variant
    mixed = config.resolve(runs.REPO_ROOT / vitl16_flowers.plan("mixed")[0], vitl16_flowers.plan("mixed")[2])
    assert mixed["speed"]["compile"] == "blocks" and mixed["ablation"]["formats"]
    with pytest.raises(config.ParamsError):
        config.resolve(runs.REPO_ROOT / "params/flowers_mixed.yaml", ["speed.compile=blockz"])
