"""Run folders: the contract of what each step reads and writes, and making and reading them.

runs/<YYYY-MM-DD_HHMMSS>_<variant>/
    params.yaml        the resolved parameters
    manifest.json      status (running / ok / failed), per-step status, git commit, versions, device, times
    01_finetune.ipynb  the executed notebook of each step
    finetune/ ...      each step's products, as STEPS declares them

Every reader (the notebooks, the demo, the report, the benchmarks) finds a product with
`path(run_dir, name)` and asks `done(run_dir, step)`; `run_models.models_of` lists the models of a run.
Executing a run folder's steps is `runner`'s.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import config, settings
from .config import REPO_ROOT
from .errors import RunError

if TYPE_CHECKING:
    import torch

RUNS_DIR = REPO_ROOT / "runs"
# `vitlab run --time-limit`: the deadline (time.time() seconds) the runner hands every step through the
# environment; a training step stops at an epoch boundary before it, its state kept for --resume.
DEADLINE_ENV = "VITLAB_DEADLINE"
LIBRARIES = ("torch", "torchvision", "transformers", "peft", "bitsandbytes", "accelerate", "numpy",
             "scikit-learn", "papermill", "jupytext", "flash-attn", "torchao")


@dataclass(frozen=True)
class Step:
    notebook: str
    needs: tuple[str, ...]  # steps whose products this one reads
    products: dict[str, str]  # product name -> path inside the run folder
    reads: tuple[str, ...] = ()  # the params (sections or dotted keys) its products depend on

    def reads_key(self, key: str) -> bool:
        """Whether setting `key` (dotted) changes what this step reads."""
        return any(key == r or key.startswith(r + ".") or r.startswith(key + ".") for r in self.reads)


EVERY = ("seed", "device", "model", "data")  # every step's products depend on these


STEPS: dict[str, Step] = {
    "finetune": Step("01_finetune.py", (), {
        "checkpoint": "finetune/model",  # merged 16-bit model + image processor (save_pretrained)
        "adapter": "finetune/adapter",  # LoRA / QLoRA only
        "train_metrics": "finetune/metrics.json",
        "training_curves": "finetune/training_curves.png"}, EVERY + ("finetune",)),
    "quantize": Step("02_quantize.py", ("finetune",), {
        "quantized": "quantize/model",  # bitsandbytes serialisation (the 16-bit model when quant.bits is 16)
        "quant_summary": "quantize/quant.json",
        "layers": "quantize/layers.csv"}, EVERY + ("quant",)),
    "evaluate": Step("03_evaluate.py", ("finetune", "quantize"), {
        "results": "evaluate/results.json",
        "results_table": "evaluate/results.csv",
        "confusion": "evaluate/confusion.csv",  # every cell of every model's confusion matrix
        "predictions": "evaluate/predictions.csv",  # each test image's class and each model's top-1: pairs runs
        "confusion_figure": "evaluate/confusion.png"},
        EVERY + ("quant", "speed", "eval")),
    "ablation": Step("04_ablation.py", ("finetune",), {
        "sensitivity": "ablation/sensitivity.json",
        "sensitivity_table": "ablation/sensitivity.csv",
        "choice": "ablation/choice.json",
        "mixed_formats": "ablation/mixed_formats.json"},  # the per-layer format choice (ablation.formats)
        EVERY + ("quant", "speed", "eval", "ablation")),
    "demo": Step("05_demo.py", ("finetune", "quantize"), {}, EVERY + ("quant", "speed")),
}
assert tuple(STEPS) == settings.STEPS
PRODUCTS = {name: (step, rel) for step, s in STEPS.items() for name, rel in s.products.items()}


def path(run_dir: str | Path, product: str) -> Path:
    """Where product `product` (a name in STEPS) of run `run_dir` lives."""
    if product not in PRODUCTS:
        raise KeyError(f"unknown run product '{product}'; known: {sorted(PRODUCTS)}")
    return Path(run_dir) / PRODUCTS[product][1]


def step_folder(run_dir: str | Path, step: str) -> Path:
    """The folder a step writes its products into."""
    return Path(run_dir) / step


def resume_folder(run_dir: str | Path, step: str) -> Path:
    """Where a step keeps what lets a re-run continue (finetune's per-epoch state): not a product, kept
    when the step fails or is stopped, removed when it finishes."""
    return Path(run_dir) / ".resume" / step


def kept(run_dir: str | Path, step: str, name: str, compute) -> Any:
    """`compute()`'s JSON result, kept in the step's resume folder as `name`: a re-run of the stopped or
    failed step (--resume) reads it back instead of computing it again."""
    path = resume_folder(run_dir, step) / name
    if path.is_file():
        print(f"{step}: {name} from the stopped run's kept state", flush=True)
        return read_json(path)
    value = compute()
    write_json(path, value)
    return value


def seconds_left() -> float:
    """Seconds until `vitlab run --time-limit`'s deadline (infinite without one)."""
    return float(os.environ.get(DEADLINE_ENV) or "inf") - time.time()


def done(run_dir: str | Path, step: str) -> bool:
    """Whether `step` of the run finished (its products are complete)."""
    return manifest(run_dir)["steps"].get(step, {}).get("status") == "ok"


def with_dependents(run_steps: list[str], rerun: list[str]) -> list[str]:
    """`rerun` and every step of the run that reads their products (transitively), in run order: a step
    that runs again makes what was built on it stale."""
    stale = set(rerun)
    for step in run_steps:  # in order, so a step's needs are decided before it
        if stale & set(STEPS[step].needs):
            stale.add(step)
    return [s for s in run_steps if s in stale]


def check_rerun(run_dir: str | Path, rerun: list[str]) -> None:
    """Refuse, naming the closest one, a step to re-run that the run does not have."""
    import difflib

    have = list(manifest(run_dir)["steps"])
    for step in rerun:
        if step not in have:
            close = difflib.get_close_matches(step, have, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RunError(f"cannot re-run '{step}'{hint} (run {Path(run_dir).name} has the steps {have})")


def check_amendment(run_dir: str | Path, keys: list[str], rerun: list[str]) -> None:
    """Refuse a `--set` that a step would not see: one that finished with the earlier value (its results were
    measured with it), or one that keeps a training state made with it (resuming would continue the old
    schedule). `--rerun` of that step applies the new value from scratch."""
    man = manifest(run_dir)
    for key in keys:
        section = key.split(".", 1)[0]
        if section in ("variant", "steps"):
            raise RunError(f"--set {key}: '{section}' is fixed for an existing run (it names its folder and steps); "
                           "start a new run for another one")
        for step, entry in man["steps"].items():
            if not STEPS[step].reads_key(key) or step in rerun:
                continue
            if entry["status"] == "ok":
                raise RunError(f"--set {key} changes what {step} read, and {step} finished with the earlier value: "
                               f"add --rerun {step} to run it again with the new one, or leave it")
            if resume_folder(run_dir, step).exists():
                raise RunError(f"--set {key} changes what {step} read, and {step} keeps a training state made with the "
                               f"earlier value ({resume_folder(run_dir, step)}): add --rerun {step} to start it over")


def needs_of(steps: list[str]) -> list[str]:
    """The steps `steps` read from but do not include: what must already be done in the run folder."""
    return [n for s in steps for n in STEPS[s].needs if n not in steps]


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically, so a crash never leaves a truncated file that looks complete. On a full disk
    no temporary file stays behind, and a file that exists already (a run's manifest, which must still
    say the run failed) is rewritten in place: truncating it frees the room its new text needs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2, default=str)
    try:
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            name = f.name
            f.write(text)
    except OSError as e:
        with contextlib.suppress(OSError, NameError):
            os.unlink(name)
        if e.errno != errno.ENOSPC or not path.is_file():
            raise
        path.write_text(text)  # half-written, it does not parse: read as unreadable, never as complete
        return
    os.chmod(name, 0o644)  # a temporary file is made 0600; the run folder's files are all readable alike
    os.replace(name, path)


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


def new_folder(parent: str | Path, name: str = "") -> Path:
    """A new folder parent/<YYYY-MM-DD_HHMMSS>[_name][-N]. `mkdir` is the test for a free name, so
    folders made at the same instant (several runs, or reports) each get their own."""
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H%M%S") + (f"_{name}" if name else "")
    if Path(parent).exists() and not Path(parent).is_dir():
        raise RunError(f"{parent} is a file, not a folder: give --runs-dir a folder (it is made if missing)")
    Path(parent).mkdir(parents=True, exist_ok=True)
    for suffix in range(1, 1000):
        folder = Path(parent) / (stamp + (f"-{suffix}" if suffix > 1 else ""))
        try:
            folder.mkdir()
            return folder
        except FileExistsError:  # taken in the same second
            continue
    raise RunError(f"no free folder name under {parent} for {stamp}")


def create(params: dict[str, Any], runs_dir: str | Path = RUNS_DIR, by_hand: bool = False) -> Path:
    """A new dated run folder (`new_folder`) holding params.yaml and a manifest with every step of
    `params["steps"]` pending."""
    missing = needs_of(params["steps"])
    if missing:
        raise RunError(f"steps {params['steps']} read the products of {sorted(set(missing))}, which a new run does not "
                       f"have: add them to the steps, or resume a run that has them (--resume RUN_DIR)")
    run_dir = new_folder(runs_dir, params["variant"])
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    manifest = {"variant": params["variant"], "status": "pending", "seed": params["seed"], "created": _now(),
                "steps": {s: {"status": "pending"} for s in params["steps"]}, **environment()}
    if by_hand:  # made by a notebook opened in JupyterLab, not by `vitlab run`
        manifest["by_hand"] = True
    write_json(run_dir / "manifest.json", manifest)
    return run_dir


def amend_params(run_dir: str | Path, params: dict[str, Any], overrides: list[str]) -> None:
    """Change a run's params.yaml for the steps still to run; the manifest keeps each change and when."""
    man = manifest(run_dir)
    (Path(run_dir) / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    man.setdefault("amended", []).append({"at": _now(), "set": list(overrides)})
    write_json(Path(run_dir) / "manifest.json", man)


def note_command(run_dir: str | Path, command: str) -> None:
    """The command line that is about to execute the run (its creation, each --resume), in the manifest."""
    man = manifest(run_dir)
    man.setdefault("commands", []).append({"at": _now(), "command": command})
    write_json(Path(run_dir) / "manifest.json", man)


def manifest(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a vitlab run folder (no manifest.json)")
    try:
        return read_json(path)
    except ValueError as e:  # cut short by a full disk, or edited by hand
        raise RunError(f"{path} is not readable JSON ({e}): the run folder is damaged; start a new run "
                       "(its finished steps' products are still in the folder)") from None


def load_params(run_dir: str | Path) -> dict[str, Any]:
    """A run's params.yaml over today's defaults (keys added since it was made read as their defaults),
    checked as a new run's params are: a hand-edited value is refused, not obeyed."""
    path = Path(run_dir) / "params.yaml"
    if not path.is_file():
        raise RunError(f"{run_dir} has no params.yaml: not a vitlab run folder, or one copied without it")
    return config.load_recorded(config.load_yaml(path), path)


def list_runs(runs_dir: str | Path = RUNS_DIR) -> list[Path]:
    """Every run folder (with a manifest), oldest first."""
    return sorted(p.parent for p in Path(runs_dir).glob("*/manifest.json"))


def latest(variant: str, steps: tuple[str, ...], runs_dir: str | Path = RUNS_DIR) -> Path:
    """The newest run of `variant` where every one of `steps` finished."""
    for run_dir in reversed(list_runs(runs_dir)):
        if manifest(run_dir)["variant"] == variant and all(done(run_dir, s) for s in steps):
            return run_dir
    raise RunError(f"no run of variant '{variant}' under {runs_dir} has finished {'/'.join(steps)}; "
                   f"run it first: python -m vitlab run params/{variant}.yaml")


def open_step(step: str, params: dict[str, Any] | None, run_dir: str | None,
              params_file: str | Path, runs_dir: str | Path = RUNS_DIR) -> tuple[dict[str, Any], Path, Path, "torch.device"]:
    """What a step notebook starts with: (params, run folder, the step's output folder, device),
    with every random generator seeded from params.

    Under `vitlab run`, papermill passes params and run_dir. Opened by hand in JupyterLab, the notebook
    resolves `params_file` and works in one run, which it names (`_by_hand`); its last cell calls
    `close_step`, which marks the step finished.
    """
    if run_dir is None:
        run_dir = _by_hand(step, params_file, runs_dir)
    import transformers

    from .machine import resolve_device, use_cpu_threads

    run_dir = Path(run_dir)
    params = params or load_params(run_dir)
    transformers.set_seed(params["seed"])
    out = step_folder(run_dir, step)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(params["device"])
    if device.type == "cpu":
        use_cpu_threads()
    return params, run_dir, out, device


def _by_hand(step: str, params_file: str | Path, runs_dir: str | Path) -> Path:
    """The run a notebook opened by hand works in, with its step marked running by this kernel: for a step
    that needs none, the newest hand-made run of the variant where it has not finished (run again, the
    notebook keeps to it instead of leaving a new folder each time), else a new one; for the others, the
    newest run of the variant where what it needs finished. The steps built on this one are marked
    pending there: they were made from what this step is about to replace."""
    params = config.resolve(REPO_ROOT / params_file)
    if STEPS[step].needs:
        run_dir = latest(params["variant"], STEPS[step].needs, runs_dir)
    else:
        mine = [r for r in reversed(list_runs(runs_dir)) if manifest(r).get("by_hand")
                and manifest(r)["variant"] == params["variant"] and not done(r, step)]
        run_dir = mine[0] if mine else create(params, runs_dir, by_hand=True)
    man = manifest(run_dir)
    stale = [s for s in with_dependents(list(man["steps"]), [step]) if s != step and man["steps"][s]["status"] == "ok"]
    for s in stale:
        man["steps"][s] = {"status": "pending"}
    man["steps"][step] = {"status": "running", "by_hand": True, "pid": os.getpid(), "started": _now()}
    man["status"] = "running"
    write_json(Path(run_dir) / "manifest.json", man)
    print(f"working by hand in run {Path(run_dir).name}" + (f" ({', '.join(stale)} built on {step}: now pending)"
                                                           if stale else ""), flush=True)
    return Path(run_dir)


def close_step(run_dir: str | Path, step: str) -> None:
    """A step notebook's last cell. Opened by hand, the step is marked finished in the manifest (under
    `vitlab run` the runner marks it, and this does nothing)."""
    man = manifest(run_dir)
    entry = man["steps"].get(step, {})
    if not entry.get("by_hand") or entry.get("status") != "running":
        return
    started = dt.datetime.fromisoformat(entry["started"])
    entry.update(status="ok", ended=_now(), seconds=round((dt.datetime.now() - started).total_seconds(), 1))
    man["status"] = "ok" if all(s["status"] == "ok" for s in man["steps"].values()) else "partial"
    write_json(Path(run_dir) / "manifest.json", man)
    print(f"{step} finished by hand in run {Path(run_dir).name}", flush=True)
