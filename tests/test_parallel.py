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
    from vitlab import runs, speed
    entry = runs.RunModel("16-bit", checkpoint, speed.SpeedSettings())
    logits, labels = parallel.predict(entry, f32, smoke_params["data"], 0, "test", 16, processes=2)
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
    params["eval"].update(latency_batch_sizes=[], profile=False)
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
