"""End to end: `python -m vitlab run` executes the real notebooks with papermill on real (small) data."""
import importlib.util
import json

import nbformat
import yaml

import pytest

from vitlab import config, demo, report, run_models, runs

from .conftest import vitlab


def _errors(notebook):
    nb = nbformat.read(notebook, as_version=4)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o["output_type"] == "error"]


def test_smoke_run_executes_every_step(smoke_run):
    man = runs.manifest(smoke_run)
    assert man["status"] == "ok" and man["variant"] == "smoke" and man["seed"] == 0
    assert list(man["steps"]) == ["finetune", "quantize", "evaluate", "ablation", "demo"]
    assert all(s["status"] == "ok" for s in man["steps"].values())
    assert man["versions"]["torch"] and man["versions"]["bitsandbytes"] and man["device"]["type"] == "cpu"
    assert "commit" in man["git"]
    # No longer live: no lock or heartbeat left behind; every file of the folder readable alike.
    assert not (smoke_run / ".lock").exists() and not (smoke_run / ".heartbeat").exists()
    assert (smoke_run / "manifest.json").stat().st_mode & 0o777 == (smoke_run / "params.yaml").stat().st_mode & 0o777
    for step in man["steps"]:
        notebook = smoke_run / runs.STEPS[step].notebook.replace(".py", ".ipynb")
        assert notebook.is_file() and not _errors(notebook)
    params = yaml.safe_load((smoke_run / "params.yaml").read_text())
    assert params == config.resolve(config.PARAMS_DIR / "smoke.yaml")


def test_smoke_run_artifacts(smoke_run):
    for step, spec in runs.STEPS.items():  # every declared product exists (the adapter only for LoRA methods)
        for name in spec.products:
            assert name == "adapter" or runs.path(smoke_run, name).exists(), name
    history = json.loads(runs.path(smoke_run, "train_metrics").read_text())["history"]
    assert len(history) == 2
    q = json.loads(runs.path(smoke_run, "quant_summary").read_text())
    assert q["quantization"] == "nf4+dq" and q["disk_mb"] < q["disk_mb_16bit"]
    assert q["footprint_mb"] < q["footprint_mb_16bit"] and q["quantized_modules"] == 12
    assert 0 < q["logits_rel_err"] < 1 and 0 <= q["top1_agreement"] <= 1
    res = json.loads(runs.path(smoke_run, "results").read_text())
    assert [a["model"] for a in res["accuracy"]] == ["16-bit (float32)", "nf4+dq"]
    assert all(a["n"] == 200 and 0 <= a["top1"] <= a["top5"] <= 1 for a in res["accuracy"])
    assert res["accuracy"][1]["top1_agreement"] > 0.5 and res["accuracy"][1]["logits_rel_err"] > 0
    assert sorted((r["model"], r["batch_size"]) for r in res["latency"]) == [
        ("16-bit (float32)", 1), ("16-bit (float32)", 4), ("nf4+dq", 1), ("nf4+dq", 4)]
    assert {p["component"] for p in res["profile"]} >= {"patch_embed", "attention", "mlp", "norm"}
    for fig in ("throughput_vs_batch.png", "size_vs_memory.png", "component_breakdown.png"):
        assert (smoke_run / "evaluate" / fig).is_file()
    sens = json.loads((smoke_run / "ablation" / "sensitivity.json").read_text())
    assert {(r["quant"], r["layer"]) for r in sens if r["layer"] is not None} == {
        (q, i) for q in ("nf4", "int8") for i in range(2)}
    choice = json.loads((smoke_run / "ablation" / "choice.json").read_text())
    assert set(choice["choices"]) == {"nf4", "int8"} and choice["verify_split"] == "test"
    assert "keep first+last" in {c["config"] for c in choice["checks"]}
    groups = {(c["quant"], c["comparison"]) for c in choice["checks"]}
    assert {q for q, _ in groups} == {"nf4", "int8"} and any(g.startswith("budget") for _, g in groups)
    for group in groups:
        assert sum(c["chosen"] for c in choice["checks"] if (c["quant"], c["comparison"]) == group) == 1
    for fig in ("sensitivity_kl.png", "sensitivity_top1.png", "pareto.png"):
        assert (smoke_run / "ablation" / fig).is_file()
    for q in ("nf4", "int8"):
        mixed = config.resolve(smoke_run / "ablation" / f"smoke_{q}_mixed.yaml")
        assert mixed["quant"]["keep_16bit"] == choice["choices"][q]["keep_16bit"]
        assert mixed["quant"]["bits"] == (4 if q == "nf4" else 8)


def test_the_terminal_gets_the_steps_lines_and_library_noise_goes_to_a_log(smoke_run):
    terminal = (smoke_run.parent / "terminal.txt").read_text()
    assert "[finetune] epoch 1/" in terminal and "[evaluate]" in terminal
    assert "[evaluate] nf4+dq: profiling" in terminal and "[ablation] nf4 check on 200 held-out images" in terminal
    # The profiler's C++ side (Kineto) prints past Python on the kernel's stderr: kept in the run folder.
    assert "USDT" not in terminal and "profiler_start" not in terminal
    assert "profiler_start" in (smoke_run / "03_evaluate.stderr.log").read_text()
    assert not (smoke_run / "01_finetune.stderr.log").exists()  # nothing written, no file


def test_no_step_shows_torchaos_import_notice(smoke_run):
    """transformers imports torchao wherever it is installed (the dev extra installs it), and torch warns about
    torchao's Enums on each import: vitlab drops that one notice, so no notebook, log or terminal shows it."""
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao is not installed here: nothing imports it")
    shown = [p.name for p in [*smoke_run.glob("*.ipynb"), *smoke_run.glob("*.log"), smoke_run.parent / "terminal.txt"]
             if "register_constant() on Enum subclasses" in p.read_text()]
    assert not shown


def test_the_models_of_a_run_are_labelled_once(smoke_run):
    (base, variant) = run_models.models_of(smoke_run)
    assert (base.label, variant.label) == ("16-bit (float32)", "nf4+dq")
    assert base.path == runs.path(smoke_run, "checkpoint") and variant.path == runs.path(smoke_run, "quantized")
    assert not variant.speed.active
    res = json.loads(runs.path(smoke_run, "results").read_text())
    assert [a["model"] for a in res["accuracy"]] == list(demo.variants(smoke_run))  # evaluate and the demo agree


def test_predictions_are_each_test_image_of_each_model_and_give_its_top1(smoke_run):
    """evaluate/predictions.csv: what pairs two runs' models on the same test images."""
    import pandas as pd
    pred = pd.read_csv(runs.path(smoke_run, "predictions"))
    accuracy = {a["model"]: a for a in json.loads(runs.path(smoke_run, "results").read_text())["accuracy"]}
    assert set(pred["model"]) == set(accuracy)
    for model, rows in pred.groupby("model"):
        assert list(rows["image"]) == list(range(accuracy[model]["n"]))
        assert (rows["true"] == rows["predicted"]).mean() == pytest.approx(accuracy[model]["top1"])
    by_model = [rows["true"].tolist() for _, rows in pred.groupby("model")]
    assert all(t == by_model[0] for t in by_model)  # the same images in the same order for every model


def test_report_renders_every_run_and_is_not_a_run(smoke_run, tmp_path):
    runs_dir = smoke_run.parent
    proc = vitlab("report", "--runs-dir", str(runs_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert runs.list_runs(runs_dir) == [smoke_run]  # no params or manifest of its own
    (report_dir,) = (runs_dir / "reports").iterdir()
    html = (report_dir / "06_report.html").read_text()
    assert "smoke" in html and "keep = lambda" not in html  # code hidden
    for fig in ("throughput_vs_batch.png", "sensitivity_smoke.png", "pareto_smoke.png"):
        assert (report_dir / report.FIGURES / fig).is_file()
    assert not _errors(report_dir / "06_report.ipynb")
    target = tmp_path / "published"
    (target).mkdir()
    (target / "pareto_smoke.png").write_bytes(b"old")
    published = dict(report.publish(report_dir, target))
    assert published["pareto_smoke.png"] is True and published["throughput_vs_batch.png"] is False
    assert (target / "pareto_smoke.png").read_bytes()[:4] == b"\x89PNG"


def test_notebooks_opened_by_hand_work_in_one_run_and_mark_their_steps(smoke_run, tmp_path, capsys):
    """In JupyterLab a notebook has no run_dir: finetune keeps to one hand-made run of its variant however
    often it is run, later steps use the newest run of the variant whose needed steps finished (its steps
    built on them go back to pending), and each notebook's last cell marks its step finished."""
    import shutil
    runs_dir = tmp_path / "runs"
    copy = runs_dir / smoke_run.name
    shutil.copytree(smoke_run, copy)
    params, run_dir, out, device = runs.open_step("evaluate", None, None, "params/smoke.yaml", runs_dir)
    assert run_dir == copy and out == copy / "evaluate" and device.type == "cpu"
    man = runs.manifest(copy)
    assert man["steps"]["evaluate"]["status"] == "running" and man["steps"]["evaluate"]["by_hand"]
    assert man["steps"]["demo"]["status"] == "ok"  # demo does not read evaluate's products
    assert "working by hand in run " + copy.name in capsys.readouterr().out
    runs.close_step(copy, "evaluate")
    assert runs.manifest(copy)["steps"]["evaluate"]["status"] == "ok" and runs.manifest(copy)["status"] == "ok"

    runs.open_step("quantize", None, None, "params/smoke.yaml", runs_dir)  # evaluate and demo read quantize's model
    assert [runs.manifest(copy)["steps"][s]["status"] for s in ("quantize", "evaluate", "demo")] == [
        "running", "pending", "pending"]

    mine = tmp_path / "mine"
    _, first, _, _ = runs.open_step("finetune", None, None, "params/smoke.yaml", mine)
    _, again, _, _ = runs.open_step("finetune", None, None, "params/smoke.yaml", mine)  # the cell run twice
    assert first == again and runs.list_runs(mine) == [first] and runs.manifest(first)["by_hand"]
    runs.close_step(first, "finetune")
    assert runs.manifest(first)["steps"]["finetune"]["status"] == "ok"
    assert runs.manifest(first)["steps"]["quantize"]["status"] == "pending"
    with pytest.raises(runs.RunError, match="has finished finetune;"):
        runs.open_step("quantize", None, None, "params/offline.yaml", mine)
    runs.close_step(smoke_run, "evaluate")  # under `vitlab run` (no by-hand mark): nothing changes
    assert runs.manifest(smoke_run)["steps"]["evaluate"]["status"] == "ok"


@pytest.mark.e2e
def test_steps_without_what_they_need_are_refused_before_any_folder(tmp_path):
    proc = vitlab("run", "params/smoke.yaml", "--runs-dir", str(tmp_path), "--steps", "evaluate")
    assert proc.returncode == 2 and "finetune" in proc.stderr and "quantize" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.e2e
def test_failed_step_marks_the_run_and_resume_finishes_it(tmp_path, folder):
    import shutil
    root = tmp_path / "digits-folder"
    shutil.copytree(folder, root)
    corrupt = root / "train" / "c3" / "corrupt.png"
    corrupt.write_bytes(b"not an image")  # only reading it finds that: inside the finetune step
    proc = vitlab("run", "params/smoke.yaml", "--runs-dir", str(tmp_path / "runs"), "--steps", "finetune,quantize",
                  "--set", "data.source=imagefolder", "--set", f"data.root={root}")
    assert proc.returncode == 1 and "resume with" in proc.stderr
    (run_dir,) = runs.list_runs(tmp_path / "runs")
    man = runs.manifest(run_dir)
    assert man["status"] == "failed" and man["failed_step"] == "finetune"
    assert "corrupt.png" in man["steps"]["finetune"]["error"] and man["steps"]["quantize"]["status"] == "pending"
    assert not runs.path(run_dir, "train_metrics").exists()

    corrupt.unlink()  # the data set is mended; resume runs what did not finish
    proc = vitlab("run", "--resume", str(run_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    man = runs.manifest(run_dir)
    assert man["status"] == "ok" and all(s["status"] == "ok" for s in man["steps"].values())


@pytest.mark.e2e
def test_speed_variant_runs_through_the_evaluate_step(tmp_path):
    proc = vitlab("run", "params/smoke.yaml", "--runs-dir", str(tmp_path), "--steps", "finetune,quantize,evaluate",
                  "--set", "quant.bits=16", "--set", "speed.compile=linears")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = runs.list_runs(tmp_path)
    res = json.loads(runs.path(run_dir, "results").read_text())
    a, b = res["accuracy"]
    assert b["model"] == "float32 + compile linears" and a["top1"] == b["top1"]
    assert {r["model"] for r in res["latency"]} == {a["model"], b["model"]}




def test_a_kept_intermediate_result_is_computed_once_and_read_back(tmp_path):
    calls = []
    compute = lambda: calls.append(1) or {"rows": [1, 2]}  # noqa: E731
    assert runs.kept(tmp_path, "ablation", "sweep.json", compute) == {"rows": [1, 2]}
    assert runs.kept(tmp_path, "ablation", "sweep.json", compute) == {"rows": [1, 2]} and calls == [1]
    assert (runs.resume_folder(tmp_path, "ablation") / "sweep.json").is_file()


def test_report_says_how_each_run_trained_and_what_it_confuses(smoke_run, tmp_path):
    """Runs of one study are named by number (transfer_0, transfer_2): the status table says what each trained."""
    import yaml
    ft = runs.load_params(smoke_run)["finetune"]
    data = report.collect([smoke_run])
    (trained,) = data.status["trained"]
    assert trained == f"{ft['method']}, {ft['epochs']} epochs"
    pairs = report.confused_pairs_table(data).reset_index()  # the mistakes by class name, as evaluate counted them
    confusions = json.loads(runs.path(smoke_run, "results").read_text())["confusions"]
    assert len(pairs) == sum(map(len, confusions.values())) > 0
    assert [label for label, _ in report.labelled_confusion_figures(data)] == list(data.dirs)  # 10 digits fit the axes
    assert set(zip(pairs["true"], pairs["predicted as"])) == {(c["true"], c["predicted"]) for v in confusions.values() for c in v}
    params = yaml.safe_load((smoke_run / "params.yaml").read_text())
    params["model"]["id"] = "google/vit-base-patch16-224"  # LoRA starts from a trained model
    params["finetune"].update(method="lora", lora={**ft["lora"], "r": 8, "alpha": 32, "target_modules": ["query", "value"]})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert report._trained(tmp_path) == f"lora r=8 alpha=32 on query,value, {ft['epochs']} epochs"
    (tmp_path / "params.yaml").write_text("finetune: {method: lorra}\n")
    assert report._trained(tmp_path).startswith("unreadable params")
