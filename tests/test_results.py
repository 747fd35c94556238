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
