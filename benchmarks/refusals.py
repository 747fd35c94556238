"""Every bad input and fault of the reliability audit (issue #22) as a user meets it: the real `python -m
vitlab` in a fresh process, its exit code, its message and the seconds until it answered.

    python benchmarks/run.py refusals --device cpu          # -> results/refusals_cpu.json

Each case builds what it needs under a temporary folder (real images from scikit-learn's digits, a
params file with a typo, a run folder edited by hand, a planted pickle, ...) and runs one command. A
case passes when the exit code is the expected one, the message holds the expected words, stderr has no
traceback, and nothing was made or run that should not be (`check`). The tests hold the same classes
in-process (tests/test_settings.py, test_resume.py, test_reliability.py); this script times them.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from common import parser, write
from PIL import Image
from sklearn.datasets import load_digits

from vitlab import runs

REPO = runs.REPO_ROOT
SMOKE = "params/smoke.yaml"
MARK = Path(tempfile.gettempdir()) / "vitlab-planted-pickle-ran"


class Case(NamedTuple):
    name: str
    setup: Callable[[Path], list[str]]  # the work folder -> the command's arguments after `python -m vitlab`
    exit: int
    words: str
    check: Callable[[Path], bool] = lambda work: not (work / "runs").exists()  # default: refused before any folder


def _set(*pairs: str) -> Callable[[Path], list[str]]:
    return lambda work: ["run", SMOKE, "--runs-dir", str(work / "runs"), *[a for p in pairs for a in ("--set", p)]]


def _file(text: str, *more: str) -> Callable[[Path], list[str]]:
    def setup(work: Path) -> list[str]:
        (work / "bad.yaml").write_text(text)
        return ["run", str(work / "bad.yaml"), "--runs-dir", str(work / "runs"), *more]
    return setup


def _images(work: Path, classes: int = 3, per_split: int = 4) -> Path:
    """A real ImageFolder (train/valid/test/<class>/*.png) of digit images."""
    digits = load_digits()
    root = work / "folder"
    for split in ("train", "valid", "test"):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(digits.target == c)[:per_split]:
                Image.fromarray((digits.images[i] * 16).astype(np.uint8)).convert("RGB").save(root / split / f"c{c}" / f"{i}.png")
    return root


def _folder(spoil: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def setup(work: Path) -> list[str]:
        root = _images(work)
        spoil(root)
        return _set("data.source=imagefolder", f"data.root={root}")(work)
    return setup


def _stopped_run(work: Path, *sets: str) -> Path:
    """A run folder whose steps have not run (created, then stopped at a time limit before its first step)."""
    subprocess.run([sys.executable, "-m", "vitlab", "run", SMOKE, "--runs-dir", str(work / "made"), "--time-limit",
                    "0.001", *[a for s in sets for a in ("--set", s)]], cwd=REPO, capture_output=True, check=False)
    return runs.list_runs(work / "made")[0]


def _edited(key: str, value) -> Callable[[Path], list[str]]:
    def setup(work: Path) -> list[str]:
        import yaml

        run = _stopped_run(work)
        params = yaml.safe_load((run / "params.yaml").read_text())
        section, _, leaf = key.rpartition(".")
        (params[section] if section else params)[leaf] = value
        (run / "params.yaml").write_text(yaml.safe_dump(params))
        return ["run", "--resume", str(run)]
    return setup


class _Planted:
    def __reduce__(self):
        return os.system, (f"touch {MARK}",)


def _planted_pickle(work: Path) -> list[str]:
    run = _stopped_run(work, "steps=[finetune]")
    state = runs.resume_folder(run, "finetune") / "last.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(pickle.dumps({"model": _Planted(), "history": [], "best": (0, 0, None)}))
    MARK.unlink(missing_ok=True)
    return ["run", "--resume", str(run)]


def _pickled_model(work: Path) -> list[str]:
    model = work / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTForImageClassification"]}))
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Planted()))
    MARK.unlink(missing_ok=True)
    return _set(f"model.id={model}", "finetune.method=none")(work)


def _too_large_to_grow(work: Path) -> list[str]:
    """A real checkpoint twice as wide as the smoke model, named as the model the smoke model grows from."""
    from transformers import ViTConfig, ViTForImageClassification

    ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=128)).save_pretrained(work / "wide")
    return _set(f"model.grow_from={work / 'wide'}")(work)


def _corrupt_manifest(work: Path) -> list[str]:
    run = _stopped_run(work)
    (run / "manifest.json").write_text("{ not json")
    return ["run", "--resume", str(run)]


def _empty_root(work: Path) -> list[str]:
    (work / "empty").mkdir()
    return _set("data.source=imagefolder", f"data.root={work / 'empty'}")(work)


def _runs_dir_a_file(work: Path) -> list[str]:
    (work / "f").write_text("not a folder")
    return ["run", SMOKE, "--runs-dir", str(work / "f")]


def _symlink_loop(root: Path) -> None:
    (root / "train" / "c0" / "loop").symlink_to(root / "train")


def _bomb(root: Path) -> None:
    Image.new("L", (60000, 1)).save(root / "train" / "c0" / "strip.png")


CASES = [
    Case("a typo in a key", _set("quant.bitz=4"), 2, "did you mean 'quant.bits'"),
    Case("a value out of range", _set("finetune.epochs=0"), 2, "'finetune.epochs' is 0; it must be at least 1"),
    Case("not a number", _set("finetune.lr=fast"), 2, "must be float"),
    Case("an infinite learning rate", _set("finetune.lr=.inf"), 2, "finite number"),
    Case("a choice that is not one", _set("quant.bits=3"), 2, "choose one of [16, 8, 4]"),
    Case("a section given a number", _set("finetune.lora=5"), 2, "'finetune.lora' must be a mapping"),
    Case("device null", _set("device=null"), 2, "'device' must be str"),
    Case("device tpu", _set("device=tpu"), 2, "auto, cpu, cuda or cuda:N"),
    Case("model.config null", _set("model.config=null"), 2, "'model.config' must be a mapping"),
    Case("a geometry that cannot be", _set("model.config.hidden_size=33"), 2, "split evenly into num_attention_heads"),
    Case("a dropout of 2", _set("model.config.hidden_dropout_prob=2"), 2, "0 <= x < 1"),
    Case("a variant that escapes runs/", _set("variant=../../x/ESCAPED"), 2, "names the run folder"),
    Case("steps out of order", _set("steps=[quantize,finetune]"), 2, "in the order they run"),
    Case("a GPU path on a CPU", _set("speed.cuda_graph=true"), 2, "needs a CUDA GPU"),
    Case("a --set without =", _set("nonsense"), 2, "--set expects key=value"),
    Case("broken YAML in --set", _set("quant.bits=[8"), 2, "not valid YAML"),
    Case("a key given twice in a file", _file("finetune:\n  epochs: 3\nfinetune:\n  lr: 0.1\n"), 2,
         "the key 'finetune' is given twice"),
    Case("an empty params file", _file(""), 2, "holds no parameters"),
    Case("lr: 1e-3 in a file (accepted)", _file("finetune:\n  lr: 1e-3\n", "--time-limit", "0.001"), 3, "time limit",
         lambda work: (work / "runs").is_dir()),
    Case("formats for 3 layers of a 2-layer model", _set("quant.bits=16", "speed.layer_formats=[fp8,fp8,fp8]"), 2,
         "give one per layer"),
    Case("QAT without its format", _set("finetune.method=qat"), 2, "set finetune.qat_format"),
    Case("a teacher folder that is not there", _set("finetune.teacher=runs/nowhere/finetune/model"), 2,
         "does not exist"),
    Case("growing from a model wider than the one to train", _too_large_to_grow, 2, "hidden_size 32 is smaller than its 64"),
    Case("a latency budget without formats", _set("ablation.latency_budget_ms=5"), 2, "list them"),
    Case("a bad --time-limit", lambda work: ["run", SMOKE, "--time-limit", "9x"], 2, "is not a duration"),
    Case("an empty data.root", _empty_root, 2, "has no train/valid/test folder"),
    Case("a test split missing a class", _folder(lambda root: shutil.rmtree(root / "test" / "c2")), 2,
         "hold different class folders"),
    Case("one class only", _folder(lambda root: [shutil.rmtree(root / s / "c1") or shutil.rmtree(root / s / "c2")
                                                 for s in ("train", "valid", "test")]), 2, "1 class folder(s)"),
    Case("a symlink loop in data.root", _folder(_symlink_loop), 2, "is a link to a folder above it"),
    Case("an 87-byte 60000x1 PNG", _folder(_bomb), 1, "strip.png", lambda work: True),
    Case("a runs dir that is a file", _runs_dir_a_file, 2, "is a file, not a folder"),
    Case("--resume of a folder that is no run", lambda work: ["run", "--resume", str(work)], 2, "manifest"),
    Case("--resume with a hand-edited epochs: 0", _edited("finetune.epochs", 0), 2, "'finetune.epochs' is 0",
         lambda work: True),
    Case("--resume with a hand-edited bits: 3", _edited("quant.bits", 3), 2, "'quant.bits' is 3", lambda work: True),
    Case("--resume with a variant that escapes", _edited("variant", "../../../../x/ESCAPED"), 2,
         "names the run folder", lambda work: True),
    Case("--resume with a corrupt manifest", _corrupt_manifest, 2, "is not readable JSON", lambda work: True),
    Case("--resume of a planted pickle", _planted_pickle, 1, "holds more than tensors",
         lambda work: not MARK.exists()),
    Case("a model folder of a pickled .bin only", _pickled_model, 2, "which vitlab does not load",
         lambda work: not MARK.exists() and not (work / "runs").exists()),
]


def measure(case: Case) -> dict:
    """One case in a fresh process: the flat row of the refusal table."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        argv = case.setup(work)
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "vitlab", *argv], cwd=REPO, capture_output=True, text=True,
                              timeout=600)
        seconds = time.monotonic() - t0
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        message = next((line for line in reversed(lines) if line.startswith("vitlab:") or "FAILED" in line),
                       lines[-1] if lines else proc.stdout.strip().splitlines()[-1])
        ok = (proc.returncode == case.exit and case.words in proc.stdout + proc.stderr
              and "Traceback" not in proc.stderr and case.check(work))
        return {"case": case.name, "command": "python -m vitlab " + " ".join(a.replace(tmp, "$TMP") for a in argv),
                "exit": proc.returncode, "expected_exit": case.exit, "seconds": round(seconds, 2),
                "message": message.replace(tmp, "$TMP")[:300], "stderr_lines": len(lines), "ok": ok}


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__, device="cpu").parse_args(argv)
    t0, rows = time.time(), []
    for case in CASES:
        rows.append(measure(case))
        r = rows[-1]
        print(f"{'ok ' if r['ok'] else 'BAD'} {r['seconds']:6.2f} s  exit {r['exit']}  {r['case']}: {r['message']}", flush=True)
    print(write(args, "refusals", t0, rows, weights="none (bad inputs)"))
    bad = [r["case"] for r in rows if not r["ok"]]
    if bad:
        print(f"{len(bad)} case(s) not handled as expected: {bad}", file=sys.stderr)


if __name__ == "__main__":
    main()
