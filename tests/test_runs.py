"""End to end: `python -m vitlab run` executes the real notebooks with papermill on real (small) data."""
import json

import nbformat
import yaml

from vitlab import config, runs

from .conftest import vitlab
from .test_data import folder  # noqa: F401  (an ImageFolder tree written from digit images)


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
    for step in man["steps"]:
        notebook = smoke_run / runs.NOTEBOOKS[step].replace(".py", ".ipynb")
        assert notebook.is_file() and not _errors(notebook)
    params = yaml.safe_load((smoke_run / "params.yaml").read_text())
    assert params == config.resolve(config.PARAMS_DIR / "smoke.yaml")


def test_smoke_run_artifacts(smoke_run):
    history = json.loads((smoke_run / "finetune" / "metrics.json").read_text())["history"]
    assert len(history) == 2 and (smoke_run / "finetune" / "training_curves.png").is_file()
    q = json.loads((smoke_run / "quantize" / "quant.json").read_text())
    assert q["quantization"] == "nf4+dq" and q["disk_bytes"] < q["disk_bytes_16bit"]
    assert q["footprint_bytes"] < q["footprint_bytes_16bit"] and q["quantized_modules"] == 12
    res = json.loads((smoke_run / "evaluate" / "results.json").read_text())
    assert [a["model"] for a in res["accuracy"]] == ["16-bit (float32)", "nf4+dq"]
    assert all(a["n"] == 200 and 0 <= a["top1"] <= a["top5"] <= 1 for a in res["accuracy"])
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


def test_report_renders_every_run(smoke_run):
    runs_dir = smoke_run.parent
    proc = vitlab("report", "--runs-dir", str(runs_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report_dir = [r for r in runs.list_runs(runs_dir) if runs.manifest(r)["variant"] == "report"][0]
    html = (report_dir / "06_report.html").read_text()
    assert "smoke" in html and "def keep" not in html  # code hidden
    for fig in ("throughput_vs_batch.png", f"sensitivity_{runs.manifest(smoke_run)['variant']}.png",
                f"pareto_{runs.manifest(smoke_run)['variant']}.png"):
        assert (report_dir / "report" / fig).is_file()
    assert not _errors(report_dir / "06_report.ipynb")


def test_failed_step_marks_the_run_and_resume_finishes_it(tmp_path, folder):  # noqa: F811
    root = tmp_path / "flowers-like"
    proc = vitlab("run", "params/smoke.yaml", "--runs-dir", str(tmp_path / "runs"), "--steps", "finetune,quantize",
                  "--set", "data.source=imagefolder", "--set", f"data.root={root}")
    assert proc.returncode == 1 and "resume with" in proc.stderr
    (run_dir,) = runs.list_runs(tmp_path / "runs")
    man = runs.manifest(run_dir)
    assert man["status"] == "failed" and man["failed_step"] == "finetune"
    assert "train/<class>" in man["steps"]["finetune"]["error"] and man["steps"]["quantize"]["status"] == "pending"
    assert not (run_dir / "finetune" / "metrics.json").exists()

    root.symlink_to(folder)  # the data set arrives; resume runs what did not finish
    proc = vitlab("run", "--resume", str(run_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    man = runs.manifest(run_dir)
    assert man["status"] == "ok" and all(s["status"] == "ok" for s in man["steps"].values())


def test_speed_variant_runs_through_the_evaluate_step(tmp_path):
    proc = vitlab("run", "params/smoke.yaml", "--runs-dir", str(tmp_path), "--steps", "finetune,quantize,evaluate",
                  "--set", "quant.bits=16", "--set", "speed.compile=linears")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = runs.list_runs(tmp_path)
    res = json.loads((run_dir / "evaluate" / "results.json").read_text())
    a, b = res["accuracy"]
    assert b["model"] == "float32 + compile linears" and a["top1"] == b["top1"]
    assert {r["model"] for r in res["latency"]} == {a["model"], b["model"]}


def test_bad_params_fail_before_any_run_folder(tmp_path):
    proc = vitlab("run", "params/smoke.yaml", "--runs-dir", str(tmp_path), "--set", "quant.bitz=4")
    assert proc.returncode == 2 and "did you mean 'quant.bits'" in proc.stderr
    assert not list(tmp_path.iterdir())
