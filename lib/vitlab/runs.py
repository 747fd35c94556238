"""Run folders: create them, record what made them, execute the step notebooks into them with papermill.

runs/<YYYY-MM-DD_HHMMSS>_<variant>/
    params.yaml        the resolved parameters
    manifest.json      status (running / ok / failed), per-step status, git commit, versions, device, times
    01_finetune.ipynb  the executed notebook of each step
    finetune/ ...      each step's artifacts, found by later steps through this folder
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import config
from .config import REPO_ROOT

if TYPE_CHECKING:
    import torch

RUNS_DIR = REPO_ROOT / "runs"
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = {"finetune": "01_finetune.py", "quantize": "02_quantize.py", "evaluate": "03_evaluate.py",
             "ablation": "04_ablation.py", "demo": "05_demo.py", "report": "06_report.py"}
LIBRARIES = ("torch", "torchvision", "transformers", "peft", "bitsandbytes", "accelerate", "numpy",
             "scikit-learn", "papermill", "jupytext", "flash-attn", "torchao")


class RunError(RuntimeError):
    """A run folder that is missing, incomplete or cannot be resumed."""


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically, so a crash never leaves a truncated file that looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(f.name, path)


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def _git() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def environment() -> dict[str, Any]:
    """Git commit, library versions and the device, for the manifest."""
    import torch

    versions = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    if torch.cuda.is_available():
        device = {"type": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                  "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                  "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    else:
        device = {"type": "cpu", "name": platform.processor() or platform.machine(), "count": os.cpu_count(),
                  "torch_threads": torch.get_num_threads()}
    return {"git": _git(), "versions": versions, "device": device, "platform": platform.platform(),
            "hostname": platform.node()}


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


def create(params: dict[str, Any], runs_dir: str | Path = RUNS_DIR, steps: list[str] | None = None) -> Path:
    """A new dated run folder holding params.yaml and a manifest with every step pending."""
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    run_dir = Path(runs_dir) / f"{stamp}_{params['variant']}"
    suffix = 1
    while run_dir.exists():  # two runs in the same second
        suffix += 1
        run_dir = Path(runs_dir) / f"{stamp}_{params['variant']}-{suffix}"
    run_dir.mkdir(parents=True)
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    steps = steps or params["steps"]
    manifest = {"variant": params["variant"], "status": "pending", "seed": params["seed"], "created": _now(),
                "steps": {s: {"status": "pending"} for s in steps}, **environment()}
    write_json(run_dir / "manifest.json", manifest)
    return run_dir


def manifest(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a vitlab run folder (no manifest.json)")
    return read_json(path)


def load_params(run_dir: str | Path) -> dict[str, Any]:
    return yaml.safe_load((Path(run_dir) / "params.yaml").read_text())


def step_dir(run_dir: str | Path, step: str) -> Path:
    path = Path(run_dir) / step
    path.mkdir(parents=True, exist_ok=True)
    return path


def step_ok(run_dir: str | Path, step: str) -> bool:
    return manifest(run_dir)["steps"].get(step, {}).get("status") == "ok"


def _execute_notebook(step: str, run_dir: Path, parameters: dict[str, Any]) -> None:
    import jupytext
    import papermill

    nb = jupytext.read(NOTEBOOK_DIR / NOTEBOOKS[step])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    papermill.execute_notebook(nb, str(run_dir / NOTEBOOKS[step].replace(".py", ".ipynb")),
                               parameters=parameters, kernel_name="python3", cwd=str(run_dir),
                               progress_bar=False, log_output=False)


def execute(run_dir: str | Path, steps: list[str] | None = None, extra: dict[str, Any] | None = None) -> dict:
    """Execute the steps that are not `ok` yet, in order; stop at the first failure and mark the run failed."""
    run_dir = Path(run_dir).resolve()
    man = manifest(run_dir)
    params = load_params(run_dir)
    steps = steps or list(man["steps"])
    man["status"], man["started"] = "running", man.get("started") or _now()
    for step in steps:
        man["steps"].setdefault(step, {"status": "pending"})
    write_json(run_dir / "manifest.json", man)
    for step in steps:
        entry = man["steps"][step]
        if entry["status"] == "ok":
            continue
        # A step re-runs from scratch: nothing half-written by an earlier attempt survives.
        shutil.rmtree(run_dir / step, ignore_errors=True)
        entry.update(status="running", started=_now(), error=None)
        write_json(run_dir / "manifest.json", man)
        print(f"[vitlab] {run_dir.name}: {step} ...", flush=True)
        t0 = time.perf_counter()
        try:
            _execute_notebook(step, run_dir, {"params": params, "run_dir": str(run_dir), **(extra or {})})
        except BaseException as e:  # KeyboardInterrupt too: the folder must say it did not finish
            error = f"{getattr(e, 'ename', type(e).__name__)}: {getattr(e, 'evalue', e)}"
            entry.update(status="failed", ended=_now(), seconds=round(time.perf_counter() - t0, 1), error=error)
            man.update(status="failed", ended=_now(), failed_step=step)
            write_json(run_dir / "manifest.json", man)
            print(f"[vitlab] {run_dir.name}: {step} FAILED: {error}\n"
                  f"[vitlab] see {run_dir / NOTEBOOKS[step].replace('.py', '.ipynb')}; "
                  f"resume with: python -m vitlab run --resume {run_dir}", file=sys.stderr, flush=True)
            if not isinstance(e, Exception):
                raise
            return man
        entry.update(status="ok", ended=_now(), seconds=round(time.perf_counter() - t0, 1))
        write_json(run_dir / "manifest.json", man)
        print(f"[vitlab] {run_dir.name}: {step} ok ({entry['seconds']} s)", flush=True)
    done = all(man["steps"][s]["status"] == "ok" for s in man["steps"])
    man.update(status="ok" if done else "partial", ended=_now())
    man.pop("failed_step", None)
    write_json(run_dir / "manifest.json", man)
    return man


def list_runs(runs_dir: str | Path = RUNS_DIR) -> list[Path]:
    """Every run folder (with a manifest), oldest first."""
    return sorted(p.parent for p in Path(runs_dir).glob("*/manifest.json"))


def latest(variant: str, step: str, runs_dir: str | Path = RUNS_DIR) -> Path:
    """The newest run of `variant` whose `step` finished."""
    for run_dir in reversed(list_runs(runs_dir)):
        man = manifest(run_dir)
        if man["variant"] == variant and man["steps"].get(step, {}).get("status") == "ok":
            return run_dir
    raise RunError(f"no run of variant '{variant}' under {runs_dir} has a finished '{step}' step; "
                   f"run it first: python -m vitlab run params/{variant}.yaml")


PREVIOUS = {"quantize": "finetune", "evaluate": "quantize", "ablation": "finetune", "demo": "quantize"}


def open_step(step: str, params: dict[str, Any] | None, run_dir: str | None,
              params_file: str | Path) -> tuple[dict[str, Any], Path, Path, "torch.device"]:
    """What a step notebook starts with: (params, run folder, the step's output folder, device),
    with every random generator seeded from params.

    Under `vitlab run`, papermill passes params and run_dir. Opened by hand in JupyterLab, the
    notebook resolves `params_file`, and works in a new run folder (finetune) or in the newest
    run of that variant whose previous step finished.
    """
    if run_dir is None:
        params = config.resolve(REPO_ROOT / params_file)
        if step in PREVIOUS:
            run_dir = latest(params["variant"], PREVIOUS[step])
            params = load_params(run_dir)
        else:
            run_dir = create(params, steps=[step])
    import transformers

    from .models import resolve_device

    run_dir = Path(run_dir)
    params = params or load_params(run_dir)
    transformers.set_seed(params["seed"])
    return params, run_dir, step_dir(run_dir, step), resolve_device(params["device"])


def render_html(notebook: str | Path) -> Path:
    """An executed notebook as a standalone HTML report, code cells hidden."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_filename(str(notebook))
    html = Path(notebook).with_suffix(".html")
    html.write_text(body)
    return html
