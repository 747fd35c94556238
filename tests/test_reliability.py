"""A run you can trust: signals, a live run's lock, stale runs, runs created at once, bad values refused
within seconds and before any folder, bounded image decoding. Each test reproduces a failure a
researcher hit (issue #11)."""
import io
import json
import multiprocessing
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from vitlab import config, data, demo, report, runner, runs

from .conftest import vitlab


def _start(*args):
    return subprocess.Popen([sys.executable, "-m", "vitlab", *args], cwd=config.REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_step(runs_dir, step, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = runs.list_runs(runs_dir)
        if found and runs.manifest(found[0])["steps"].get(step, {}).get("status") == "running":
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no run reached a running {step}")


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signalled_run_is_marked_failed_not_left_running(tmp_path, sig):
    proc = _start("run", "params/smoke.yaml", "--runs-dir", str(tmp_path), "--set", "finetune.epochs=200")
    run_dir = _wait_for_step(tmp_path, "finetune")
    deadline = time.monotonic() + 120
    while not (run_dir / "finetune").is_dir() and time.monotonic() < deadline:  # the notebook has started writing
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig
    man = runs.manifest(run_dir)
    assert man["status"] == "failed" and man["failed_step"] == "finetune"
    assert signal.Signals(sig).name in man["steps"]["finetune"]["error"] and "resume" in err
    assert man["pid"] == proc.pid and man["host"] and man["heartbeat"]
    assert runner.status(run_dir) == "failed" and not (run_dir / "finetune").exists()  # partial products moved aside
    assert (run_dir / "finetune.failed").is_dir()


@pytest.mark.e2e
def test_resume_of_a_live_run_is_refused_with_the_pid_that_holds_it(tmp_path):
    proc = _start("run", "params/smoke.yaml", "--runs-dir", str(tmp_path), "--set", "finetune.epochs=200")
    try:
        run_dir = _wait_for_step(tmp_path, "finetune")
        second = vitlab("run", "--resume", str(run_dir))
        assert second.returncode == 2 and f"pid {proc.pid}" in second.stderr, second.stderr
        assert runner.status(run_dir) == "running"
        with pytest.raises(runs.RunError, match="being executed right now"):  # the lock, not only the manifest
            runner.execute(run_dir)
    finally:
        proc.kill()
        proc.communicate()
    # Killed without a chance to say so (SIGKILL): its pid is gone, so it reads as interrupted.
    assert runs.manifest(run_dir)["status"] == "running" and runner.status(run_dir) == "interrupted"
    assert report.collect([run_dir]).status.iloc[0]["status"] == "interrupted"


def test_a_running_run_without_heartbeat_is_interrupted(tmp_path, smoke_params):
    run_dir = runs.create(smoke_params, tmp_path)
    man = runs.manifest(run_dir)
    man.update(status="running", host="another-host", pid=1, heartbeat="2026-01-01T00:00:00")
    runs.write_json(run_dir / "manifest.json", man)
    assert runner.status(run_dir) == "interrupted"
    man["heartbeat"] = runs._now()
    runs.write_json(run_dir / "manifest.json", man)
    assert runner.status(run_dir) == "running"


def _create(args):
    params, runs_dir = args
    return str(runs.create(params, runs_dir))


def test_runs_created_at_the_same_instant_each_get_a_folder(tmp_path, smoke_params):
    with multiprocessing.get_context("fork").Pool(8) as pool:
        made = pool.map(_create, [(smoke_params, tmp_path)] * 8)
    assert len(set(made)) == 8 and len(runs.list_runs(tmp_path)) == 8


@pytest.mark.parametrize("content, message", [
    ("", "holds no parameters"),
    ("model:\n  id: a: b\n", r"bad.yaml, line 2, column 8: not valid YAML \(mapping values are not allowed here\)"),
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary", "not a text file"),
])
def test_params_files_that_are_not_params_get_one_line(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(config.ParamsError, match=message):
        config.resolve(path)


def test_lora_targets_take_a_list_a_name_or_a_shorthand():
    for value in ("[q_proj, v_proj]", "fc1", "auto", "attention"):
        config.resolve(config.PARAMS_DIR / "smoke.yaml", [f"finetune.lora.target_modules={value}"])


def test_resume_takes_set_and_reruns_a_finished_step(smoke_run, tmp_path):
    import shutil
    run_dir = tmp_path / smoke_run.name
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("ablation", "05_demo.ipynb", "04_ablation.ipynb"))
    man = runs.manifest(run_dir)
    for step in ("ablation", "demo"):
        man["steps"][step] = {"status": "pending"}
    man["status"] = "partial"
    runs.write_json(run_dir / "manifest.json", man)
    before = runs.manifest(run_dir)["steps"]["evaluate"]["ended"]
    proc = vitlab("run", "--resume", str(run_dir), "--steps", "evaluate", "--set", "eval.iters=2",
                  "--set", "ablation.quant_types=[nf4]")
    assert proc.returncode == 0, proc.stderr
    man = runs.manifest(run_dir)
    assert man["status"] == "ok" and man["steps"]["evaluate"]["ended"] != before  # re-run, as the README says
    assert man["amended"][0]["set"] == ["eval.iters=2", "ablation.quant_types=[nf4]"]
    assert runs.load_params(run_dir)["eval"]["iters"] == 2
    sensitivity = json.loads(runs.path(run_dir, "sensitivity").read_text())
    assert {r["quant"] for r in sensitivity} == {"16-bit", "nf4"}  # the amended value reached the ablation


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")  # 144 megapixels in a few KB
    return buf.getvalue()


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = _bomb()
    assert len(bomb) < 100_000
    with pytest.raises(data.DataError, match="bomb.png is 12000 x 12000 = 144,000,000 pixels"):
        demo.read_upload("bomb.png", bomb)
    with pytest.raises(data.DataError, match="takes images up to 1 MB"):
        demo.read_upload("huge.jpg", b"\xff" * (2 * 2**20), max_bytes=2**20)
    folder = tmp_path / "train" / "c0"
    folder.mkdir(parents=True)
    (folder / "bomb.png").write_bytes(bomb)
    with pytest.raises(data.DataError, match=r"train/c0/bomb.png is 12000 x 12000"):
        data._checked_loader({"max_image_pixels": 60_000_000})(str(folder / "bomb.png"))


def test_progress_shows_printed_lines_and_thins_progress_bars_out():
    out = io.StringIO()
    progress = runner.Progress("finetune", out, every_s=3600)
    progress.write("epoch 1/2: train loss 2.3\n")
    progress.write("\rpredict:   0%|          | 0/9 [00:00<?, ?it/s]\rpredict:  11%|#         | 1/9 [00:01<00:08]")
    progress.write("\rpredict:  22%|##        | 2/9\rpredict: 100%|##########| 9/9 [00:02<00:00]\n")
    progress.write("[IPKernelApp] WARNING | Kernel is running over TCP without encryption.\n")
    assert out.getvalue().splitlines() == ["[finetune] epoch 1/2: train loss 2.3",
                                           "[finetune] predict:   0%|          | 0/9 [00:00<?, ?it/s]",
                                           "[finetune] predict: 100%|##########| 9/9 [00:02<00:00]"]


def test_an_unreachable_hub_fails_in_seconds_with_the_local_alternatives(monkeypatch):
    import socket

    import torch

    from vitlab import models

    def no_network(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    models.hub_reachable.cache_clear()
    try:
        settings = models.ModelSettings("google/vit-base-patch16-224", torch.float32, "sdpa")
        t0 = time.monotonic()
        with pytest.raises(models.ModelError, match="model.id: /path/to/checkpoint_dir"):
            models.load_processor(settings)
        with pytest.raises(models.ModelError, match="network"):
            models.build(settings, ["a"])
        assert time.monotonic() - t0 < 10  # transformers' own retries took 98 s here
    finally:
        models.hub_reachable.cache_clear()


def test_a_long_accuracy_pass_prints_its_batches(checkpoint, f32, digits_data, monkeypatch, capsys):
    import torch

    from vitlab import infer, models
    monkeypatch.setattr(infer, "PROGRESS_EVERY_S", 0.0)  # as if every batch took longer than the interval
    model = models.load_checkpoint(checkpoint, f32, torch.device("cpu"))
    batches = list(digits_data.loader("test", 64))[:3]
    infer.predict(model, batches, torch.device("cpu"), desc="test split")
    assert capsys.readouterr().out.splitlines() == [f"test split: {i}/3 batches" for i in (1, 2, 3)]
    infer.predict(model, batches, torch.device("cpu"), progress=False)
    assert capsys.readouterr().out == ""


def test_folders_made_in_the_same_second_do_not_collide(tmp_path, monkeypatch):
    import datetime as dt

    class Frozen(dt.datetime):  # every folder is made in the same second
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 2, 9, 30, 0)

    monkeypatch.setattr(runs.dt, "datetime", Frozen)
    made = [runs.new_folder(tmp_path / "reports") for _ in range(3)]
    stamp = "2026-12-02_093000"
    assert [m.name for m in made] == [stamp, f"{stamp}-2", f"{stamp}-3"]
    assert all(m.parent == tmp_path / "reports" and m.is_dir() for m in made)


def test_the_gpu_data_path_refuses_a_bomb_like_the_pil_path(tmp_path):
    import torch

    from vitlab import gpu_data
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_bomb())
    with pytest.raises(data.DataError, match=r"bomb.png is 12000 x 12000"):
        gpu_data.decode([bomb], 36, 32, torch.device("cpu"), max_pixels=60_000_000)


def test_a_strip_under_the_pixel_cap_is_refused_by_its_aspect_ratio(tmp_path):
    """A 60,000 x 1 PNG is 87 bytes and 60 K pixels, but resized to the model's input its long side
    becomes millions of pixels: refused from the header, before decoding or resizing."""
    from vitlab import images
    buf = io.BytesIO()
    Image.new("L", (60_000, 1)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 1_000
    with pytest.raises(data.DataError, match=r"strip.png is 60000 x 1, an aspect ratio over 50:1"):
        images.open_image(buf.getvalue(), name="strip.png")
    ok = io.BytesIO()
    Image.new("RGB", (400, 100)).save(ok, format="PNG")  # a panorama is fine
    assert images.open_image(ok.getvalue()).size == (400, 100)


def test_a_long_epoch_says_where_it_is_with_elapsed_and_left(digits_data, f32, smoke_params, monkeypatch, capsys):
    import torch

    from vitlab import finetune, training
    monkeypatch.setattr(training, "PROGRESS_EVERY_S", 0.0)  # as if every batch took longer than the interval
    model = finetune.build(f32, smoke_params["finetune"], digits_data.class_names, torch.device("cpu"))
    batches = list(digits_data.loader("train", 32))[:3]
    training.train(model, batches, batches, {**smoke_params["finetune"], "epochs": 1}, torch.device("cpu"))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" · ")[0] for line in lines if line.startswith("train 1:")] == ["train 1: 1/3 batches",
                                                                                     "train 1: 2/3 batches"]
    assert "left in this epoch" in lines[0]
    assert lines[-1].startswith("epoch 1/1: train loss") and "elapsed, ~0:00 left" in lines[-1]


def test_a_full_disk_leaves_no_temp_file_and_still_marks_the_manifest(tmp_path, monkeypatch):
    """Seen on a 700 KB tmpfs: the disk filled in evaluate, the manifest stayed `running` and two tmp*.tmp
    files stayed behind. A write that finds no room now removes its temporary file, and an existing file
    (the manifest) is rewritten in place, which frees the room its new text needs."""
    import errno
    import tempfile as tf

    real = tf.NamedTemporaryFile

    class Full:
        def __init__(self, *args, **kwargs):
            self.file = real(*args, **kwargs)
            self.name = self.file.name

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"status": "running"}')
    monkeypatch.setattr(runs.tempfile, "NamedTemporaryFile", Full)
    runs.write_json(manifest, {"status": "failed"})
    assert json.loads(manifest.read_text()) == {"status": "failed"} and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(OSError, match="No space left"):  # a new file has nothing to overwrite: the error stands
        runs.write_json(tmp_path / "results.json", {"rows": []})
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "results.json").exists()


@pytest.mark.e2e
def test_a_finetune_at_its_time_limit_stops_after_an_epoch_and_resume_finishes_it(tmp_path):
    epochs = 60
    proc = vitlab("run", "params/smoke.yaml", "--runs-dir", str(tmp_path), "--steps", "finetune",
                  "--set", f"finetune.epochs={epochs}", "--time-limit", "12")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    (run_dir,) = runs.list_runs(tmp_path)
    man = runs.manifest(run_dir)
    assert man["time_limit"] == "reached in finetune" and man["status"] == "failed"
    assert "TimeLimitReached: stopped at the time limit after epoch" in man["steps"]["finetune"]["error"]
    stopped_after = int(man["steps"]["finetune"]["error"].split("after epoch ")[1].split()[0])
    assert 1 <= stopped_after < epochs
    resumed = vitlab("run", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {stopped_after} of {epochs}" in resumed.stdout
    history = json.loads(runs.path(run_dir, "train_metrics").read_text())["history"]
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))
    assert "time_limit" not in runs.manifest(run_dir)


def test_a_runs_dir_that_is_a_file_or_cannot_be_written_gets_one_line(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from vitlab import __main__ as cli

    smoke = str(config.PARAMS_DIR / "smoke.yaml")
    afile = tmp_path / "runs.txt"
    afile.write_text("not a folder")
    assert cli.main(["run", smoke, "--runs-dir", str(afile)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"vitlab: error: {afile} is a file, not a folder: give --runs-dir a folder (it is made if missing)"
    # A read-only mount or a folder of someone else's: what mkdir raises there (root ignores permissions, so the
    # refusal is injected at the system call the run folder is made with).
    real_mkdir = Path.mkdir

    def refused(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refused)
    assert cli.main(["run", smoke, "--runs-dir", str(tmp_path / "ro")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"vitlab: error: Permission denied: {tmp_path / 'ro'}"


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root writes into a folder whatever its permissions")
def test_a_read_only_runs_dir_gets_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    proc = vitlab("run", "params/smoke.yaml", "--runs-dir", str(ro))
    assert proc.returncode == 1 and proc.stderr.strip().startswith("vitlab: error: Permission denied")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.e2e
def test_ctrl_c_to_the_process_group_marks_the_run_failed_and_exits_130_without_a_traceback(tmp_path):
    import os

    # As from a terminal: a test suite started in the background by a non-interactive shell (`make test &`)
    # ignores SIGINT, and a child inherits that, so the CLI would rightly ignore Ctrl-C too.
    proc = subprocess.Popen([sys.executable, "-m", "vitlab", "run", "params/smoke.yaml", "--runs-dir", str(tmp_path),
                             "--set", "finetune.epochs=200"], cwd=config.REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    run_dir = _wait_for_step(tmp_path, "finetune")
    t0 = time.monotonic()
    while not (run_dir / "finetune").is_dir() and time.monotonic() < t0 + 120:  # the notebook is at work
        time.sleep(0.2)
    waited, before = time.monotonic() - t0, proc.poll()
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does (the kernel, in its own session, is stopped by the CLI)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (f"exit {proc.returncode} (before the signal: {before}), finetune/ after {waited:.1f} s, "
                                    f"manifest {runs.manifest(run_dir)['status']}; stderr: {err[-1500:]}; stdout: {out[-3000:]}")
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("vitlab: interrupted (Ctrl-C)")
    man = runs.manifest(run_dir)
    assert man["status"] == "failed" and man["failed_step"] == "finetune" and runner.status(run_dir) == "failed"


@pytest.mark.e2e
@pytest.mark.slow
def test_a_run_killed_in_every_step_in_turn_resumes_each_time_and_finishes(tmp_path):
    """SIGKILL (nothing can be caught) to the whole process group while each step is at work, then --resume:
    the killed step reads `interrupted`, the steps before it stay done, and the last resume finishes clean."""
    import os

    def start(*args):
        return subprocess.Popen([sys.executable, "-m", "vitlab", "run", *args], cwd=config.REPO_ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    import torch

    epochs = 12  # long enough to be killed mid-training, after a kept state (checkpoint_minutes 0: every epoch)
    proc = start("params/smoke.yaml", "--runs-dir", str(tmp_path), "--set", f"finetune.epochs={epochs}",
                 "--set", "finetune.checkpoint_minutes=0")
    run_dir, saved = None, None
    for i, step in enumerate(runs.STEPS):
        if i:
            proc = start("--resume", str(run_dir))
        run_dir = _wait_for_step(tmp_path, step)  # its kernel is starting: the shortest step is still at work
        state = runs.resume_folder(run_dir, "finetune") / "last.pt"
        deadline = time.monotonic() + 120
        while step == "finetune" and not state.is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert (run_dir / runner.KERNEL_PID).is_file()  # the step's kernel, in a session of its own, outlives it
        runner.wait_for_kernel(run_dir)  # as --resume does: it goes within about a second
        if step == "finetune":
            saved = torch.load(state, weights_only=True)["history"]
            assert 1 <= len(saved) < epochs
        man = runs.manifest(run_dir)
        assert runner.status(run_dir) == "interrupted", step
        assert [s for s, e in man["steps"].items() if e["status"] == "ok"] == list(runs.STEPS)[:i], step
    final = vitlab("run", "--resume", str(run_dir))
    assert final.returncode == 0, final.stderr
    man = runs.manifest(run_dir)
    assert man["status"] == "ok" and all(e["status"] == "ok" for e in man["steps"].values())
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".failed") or p.name in (".lock", ".heartbeat")]
    history = json.loads(runs.path(run_dir, "train_metrics").read_text())["history"]
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))  # continued from the kept epoch, none twice
    assert [{k: v for k, v in r.items() if k != "selected"} for r in history[:len(saved)]] == saved
    assert not runs.resume_folder(run_dir, "finetune").exists()  # removed once the step finished


def test_a_run_folder_copied_without_its_checkpoint_or_images_demos_what_it_holds(smoke_run, digits_data, tmp_path):
    """A run brought from a GPU machine without its 16-bit checkpoint's weights (its small files came, as a
    copy of every file under a size does) and away from its images: the demo shows the quantized model on
    an uploaded photo, and says why the test-image picker is empty."""
    import shutil

    import torch
    import yaml
    run_dir = tmp_path / "runs" / smoke_run.name
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("ablation"))
    (runs.path(run_dir, "checkpoint") / "model.safetensors").unlink()
    params = yaml.safe_load((run_dir / "params.yaml").read_text())
    params["data"] |= {"source": "imagefolder", "root": "/the/gpu/machine/flowers102"}
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    quantized = [label for label in demo.variants(smoke_run) if not label.startswith("16-bit")]
    assert list(demo.variants(run_dir)) == quantized and demo.finished_runs(run_dir.parent) == [run_dir]
    with pytest.raises(data.DataError, match="/the/gpu/machine/flowers102"):
        demo.test_images(run_dir)
    image, _ = digits_data.splits["test"][0]
    top, ms = demo.Predictor(torch.device("cpu")).predict(run_dir, quantized[0], image)
    assert len(top) == 5 and abs(sum(p for _, p in top) - 1) < 1 and ms > 0
    hint = demo.app(run_dir.parent, torch.device("cpu")).children[2]
    assert "no test images here" in hint.value and "upload a photo" in hint.value
