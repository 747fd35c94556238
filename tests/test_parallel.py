"""Data parallelism on the CPU: two real gloo processes through accelerate give the one-process answer."""
import numpy as np
import pytest

from vitlab import infer, parallel

CPU_DEVICE = "cpu"


def test_two_processes_predict_every_test_image_once_as_one_process_does(checkpoint, f32, smoke_params, digits_data):
    import torch
    from vitlab import models
    one_logits, one_labels = infer.predict(models.load_checkpoint(checkpoint, f32, torch.device(CPU_DEVICE)),
                                           digits_data.loader("test", 16), torch.device(CPU_DEVICE), progress=False)
    # 16 per batch over 2 processes: the split does not divide evenly, so gather_for_metrics must drop the padding.
    assert len(one_labels) % 32 != 0
    from vitlab import evaluate, run_models, speed
    entry = run_models.RunModel("16-bit", checkpoint, speed.SpeedSettings())
    logits, labels = evaluate.predict_in_processes(entry, f32, smoke_params["data"], 0, "test", 16, processes=2)
    np.testing.assert_array_equal(labels, one_labels)
    np.testing.assert_allclose(logits, one_logits, atol=1e-5, rtol=1e-5)


def test_launch_refuses_what_cannot_run():
    with pytest.raises(ValueError, match="at least 1"):
        parallel.launch(print, 0)


def test_evaluate_step_with_two_processes_reports_what_one_process_does(smoke_run, tmp_path):
    """03_evaluate's accuracy pass with eval.processes: 2 (every model of the smoke run: 16-bit and NF4)."""
    import copy

    import torch
    from vitlab import data, evaluate, runs
    params = runs.load_params(smoke_run)
    params["eval"].update(latency_batch_sizes=[1], warmup=0, iters=1, profile=False)  # the accuracy pass is what is compared
    ds = data.for_checkpoint(params["data"], params["seed"], runs.path(smoke_run, "checkpoint"))
    one = evaluate.evaluate_run(smoke_run, params, ds, torch.device(CPU_DEVICE), tmp_path).accuracy
    two_params = copy.deepcopy(params)
    two_params["eval"]["processes"] = 2
    two = evaluate.evaluate_run(smoke_run, two_params, ds, torch.device(CPU_DEVICE), tmp_path).accuracy
    assert len(one) == 2
    for column in ("model", "n", "top1", "top5", "f1_macro", "top1_lo", "top1_hi"):
        assert list(two[column]) == list(one[column]), column


def test_eval_processes_is_checked_before_any_step():
    from vitlab import config
    with pytest.raises(config.ParamsError, match="eval.processes"):
        config.resolve(config.PARAMS_DIR / "smoke.yaml", ["eval.processes=0"])


def _train_in(params, model, tmp_path, processes):
    import torch
    from vitlab import data, finetune, models
    out = tmp_path / f"p{processes}"
    if processes > 1:
        return finetune.train_in_processes(params, model, out, None, processes), out / "model"
    settings = models.ModelSettings.from_params(params["model"])
    ds = data.for_model(params["data"], params["seed"], models.load_processor(settings))
    history = finetune.fit(model, ds, params, torch.device(CPU_DEVICE))
    finetune.save(model, models.load_processor(settings), settings, ds.class_names, params["finetune"]["method"], out)
    return history, out / "model"


@pytest.mark.parametrize("pipeline", ["gpu", "pil"])
def test_two_processes_train_as_one_does(smoke_params, test_batch, tmp_path, pipeline):
    """finetune.processes: 2 (DDP, gloo) against one process from the same initial weights. The decoded
    path (data.pipeline gpu) shards the batches one process draws, so the runs agree to float rounding;
    the DataLoader path shuffles through accelerate's sampler, so its batches differ: a tolerance."""
    import copy

    import torch
    import transformers
    from vitlab import data, finetune, models
    params = copy.deepcopy(smoke_params)
    params["data"].update(pipeline=pipeline, crop_scale=[1.0, 1.0])  # no random crops: the same images
    params["finetune"].update(epochs=3, ema_decay=0.9, select="best_valid")
    settings = models.ModelSettings.from_params(params["model"])
    names = data.for_model(params["data"], params["seed"], models.load_processor(settings)).class_names
    results = {}
    for processes in (1, 2):
        transformers.set_seed(0)
        model = finetune.build(settings, params["finetune"], names, torch.device(CPU_DEVICE))
        # Two processes each accumulating two micro-batches: one step's gradient is still the whole batch's.
        params["finetune"]["accumulate"] = processes
        history, saved = _train_in(params, model, tmp_path, processes)
        trained = models.load_checkpoint(saved, settings, torch.device(CPU_DEVICE))
        with torch.no_grad():
            results[processes] = (history, trained(pixel_values=test_batch).logits)
    (h1, logits1), (h2, logits2) = results[1], results[2]
    assert [r["images"] if "images" in r else None for r in h2] == [r.get("images") for r in h1]
    close = 1e-4 if pipeline == "gpu" else 2e-2
    assert [r["train_loss"] for r in h2] == pytest.approx([r["train_loss"] for r in h1], rel=close)
    assert [r["val_loss"] for r in h2] == pytest.approx([r["val_loss"] for r in h1], rel=close)
    for h in (h1, h2):  # each run keeps the epoch it validated best (first of ties), whatever its batches were
        best = max(h, key=lambda r: (r["val_acc"], -r["epoch"]))["epoch"]
        assert [r["selected"] for r in h] == [r["epoch"] == best for r in h]
    if pipeline == "gpu":  # the same batches: the same validation accuracies, so the same epoch
        assert [r["selected"] for r in h2] == [r["selected"] for r in h1]
    torch.testing.assert_close(logits2, logits1, atol=close * 10, rtol=close * 10)


def test_two_processes_sweep_the_ablation_as_one_does(checkpoint, f32, nf4, smoke_params):
    import torch
    from vitlab import ablation, data
    ds = data.for_checkpoint(smoke_params["data"], 0, checkpoint)
    one = ablation.sweep(checkpoint, f32, nf4, ["nf4"], list(ds.loader("valid", 32)), torch.device(CPU_DEVICE))
    two = ablation.sweep_in_processes(checkpoint, f32, nf4, ["nf4"], smoke_params["data"], 0, "valid", 32, processes=2)
    assert [r["config"] for r in two] == [r["config"] for r in one]  # greedy path included: the same order
    for a, b in zip(one, two):
        assert b["top1"] == a["top1"] and b["footprint_mb"] == a["footprint_mb"], a["config"]
        assert b["kl"] == pytest.approx(a["kl"], abs=1e-6), a["config"]
    budgets = smoke_params["ablation"] | {"quant_types": ["nf4"]}
    assert ablation.choose_all(two, budgets) == ablation.choose_all(one, budgets)  # the same choice


def test_data_parallel_training_is_checked_before_any_work():
    from vitlab import config
    with pytest.raises(config.ParamsError, match="split evenly"):
        config.resolve(config.PARAMS_DIR / "smoke.yaml", ["finetune.processes=3"])
    with pytest.raises(config.ParamsError, match="split evenly"):
        config.resolve(config.PARAMS_DIR / "smoke.yaml", ["finetune.processes=2", "finetune.accumulate=3"])
    with pytest.raises(config.ParamsError, match="4-bit base"):
        config.resolve(config.PARAMS_DIR / "smoke.yaml", ["finetune.processes=2", "finetune.method=qlora",
                                                          "model.id=some/checkpoint"])


def test_several_params_files_run_side_by_side(tmp_path):
    """`vitlab run A B --jobs 2`: both checked first, then run at once (on a CPU: --jobs says how many),
    each in its own run folder, every output line led by its run's name."""
    from .conftest import vitlab
    from vitlab import runner, runs
    bad = vitlab("run", "params/smoke.yaml", "params/smoke.yaml", "--set", "finetune.epochs=0", "--runs-dir", str(tmp_path))
    assert bad.returncode == 2 and "finetune.epochs" in bad.stderr and not list(tmp_path.iterdir())  # nothing started
    proc = vitlab("run", "params/smoke.yaml", "params/offline.yaml", "--steps", "finetune", "--set", "finetune.epochs=1",
                  "--set", "data.max_per_class=10", "--jobs", "2", "--runs-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = runs.list_runs(tmp_path)
    assert sorted(runs.manifest(d)["variant"] for d in done) == ["offline", "smoke"]
    assert all(runner.status(d) == "ok" for d in done)
    for d in done:
        assert f"{d.name} | [finetune] epoch 1/1" in proc.stdout
    first, second = (runs.manifest(d)["steps"]["finetune"] for d in done)
    assert first["started"] <= second["ended"] and second["started"] <= first["ended"]  # they overlapped
