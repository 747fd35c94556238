"""Run folders: the contract of what each step reads and writes, creating and executing them.

runs/<YYYY-MM-DD_HHMMSS>_<variant>/
    params.yaml        the resolved parameters
    manifest.json      status (running / ok / failed), per-step status, git commit, versions, device, times
    01_finetune.ipynb  the executed notebook of each step
    finetune/ ...      each step's products, as STEPS declares them

Every reader (the notebooks, the demo, the report, the benchmarks) finds a product with
`path(run_dir, name)`, asks `done(run_dir, step)`, and lists the models of a run with `models_of`.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import yaml

from . import config
from .config import REPO_ROOT
from .errors import RunError

if TYPE_CHECKING:
    import torch

    from .speed import SpeedSettings

RUNS_DIR = REPO_ROOT / "runs"
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
LIBRARIES = ("torch", "torchvision", "transformers", "peft", "bitsandbytes", "accelerate", "numpy",
             "scikit-learn", "papermill", "jupytext", "flash-attn", "torchao")


@dataclass(frozen=True)
class Step:
    notebook: str
    needs: tuple[str, ...]  # steps whose products this one reads
    products: dict[str, str]  # product name -> path inside the run folder


STEPS: dict[str, Step] = {
    "finetune": Step("01_finetune.py", (), {
        "checkpoint": "finetune/model",  # merged 16-bit model + image processor (save_pretrained)
        "adapter": "finetune/adapter",  # LoRA / QLoRA only
        "train_metrics": "finetune/metrics.json",
        "training_curves": "finetune/training_curves.png"}),
    "quantize": Step("02_quantize.py", ("finetune",), {
        "quantized": "quantize/model",  # bitsandbytes serialisation (the 16-bit model when quant.bits is 16)
        "quant_summary": "quantize/quant.json",
        "layers": "quantize/layers.csv"}),
    "evaluate": Step("03_evaluate.py", ("finetune", "quantize"), {
        "results": "evaluate/results.json",
        "results_table": "evaluate/results.csv",
        "confusion": "evaluate/confusion.csv"}),  # every cell of every model's confusion matrix
    "ablation": Step("04_ablation.py", ("finetune",), {
        "sensitivity": "ablation/sensitivity.json",
        "sensitivity_table": "ablation/sensitivity.csv",
        "choice": "ablation/choice.json"}),
    "demo": Step("05_demo.py", ("finetune", "quantize"), {}),
}
assert tuple(STEPS) == config.STEPS
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


def done(run_dir: str | Path, step: str) -> bool:
    """Whether `step` of the run finished (its products are complete)."""
    return manifest(run_dir)["steps"].get(step, {}).get("status") == "ok"


def needs_of(steps: list[str]) -> list[str]:
    """The steps `steps` read from but do not include: what must already be done in the run folder."""
    return [n for s in steps for n in STEPS[s].needs if n not in steps]


@dataclass(frozen=True)
class RunModel:
    """One model a run holds: its label (used by every table, figure and the demo), where its weights are,
    and the speed paths evaluate runs it with."""
    label: str
    path: Path
    speed: "SpeedSettings"


def models_of(run_dir: str | Path, params: dict[str, Any] | None = None) -> list[RunModel]:
    """The models of a run: its merged 16-bit checkpoint, and the variant this run is about (quantized
    and/or run a `speed` way) when it differs from that."""
    from .quant import QuantSettings
    from .speed import SpeedSettings

    params = params or load_params(run_dir)
    q, sp = QuantSettings.from_params(params["quant"]), SpeedSettings.from_params(params["speed"])
    out = [RunModel(f"16-bit ({params['model']['dtype']})", path(run_dir, "checkpoint"), SpeedSettings())]
    if q.bits != 16 or sp.active:
        label = q.describe() if q.bits != 16 else params["model"]["dtype"]
        out.append(RunModel(label + (f" + {sp.describe()}" if sp.active else ""), path(run_dir, "quantized"), sp))
    return out


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


def new_folder(parent: str | Path, name: str = "") -> Path:
    """A new folder parent/<YYYY-MM-DD_HHMMSS>[_name][-N]. `mkdir` is the test for a free name, so
    folders made at the same instant (several runs, or reports) each get their own."""
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H%M%S") + (f"_{name}" if name else "")
    Path(parent).mkdir(parents=True, exist_ok=True)
    for suffix in range(1, 1000):
        folder = Path(parent) / (stamp + (f"-{suffix}" if suffix > 1 else ""))
        try:
            folder.mkdir()
            return folder
        except FileExistsError:  # taken in the same second
            continue
    raise RunError(f"no free folder name under {parent} for {stamp}")


def create(params: dict[str, Any], runs_dir: str | Path = RUNS_DIR) -> Path:
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
    write_json(run_dir / "manifest.json", manifest)
    return run_dir


def amend_params(run_dir: str | Path, params: dict[str, Any], overrides: list[str]) -> None:
    """Change a run's params.yaml for the steps still to run; the manifest keeps each change and when."""
    man = manifest(run_dir)
    (Path(run_dir) / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    man.setdefault("amended", []).append({"at": _now(), "set": list(overrides)})
    write_json(Path(run_dir) / "manifest.json", man)


def manifest(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a vitlab run folder (no manifest.json)")
    return read_json(path)


def load_params(run_dir: str | Path) -> dict[str, Any]:
    return yaml.safe_load((Path(run_dir) / "params.yaml").read_text())


# Lines a step's kernel prints that say nothing to a researcher: transport and kernel-hub notices, and
# transformers naming "eetq" when an ablation keeps every linear of a model in 16-bit (nothing to quantize).
NOISE = ("Kernel is running over TCP without encryption", "Failed to load CPU gemm_4bit_forward", "USDT:",
         "no linear modules were found in your model")


class Progress:
    """A step's printed lines and progress bars, in the terminal while the notebook runs: printed lines as
    they come; a progress bar (tqdm redraws one line with carriage returns) as a line when it starts,
    every `every_s` seconds and when it ends, instead of every redraw; known noise dropped."""

    def __init__(self, step: str, stream=None, every_s: float = 10.0):
        self.prefix, self.stream, self.every_s = f"[{step}] ", stream or sys.stdout, every_s
        self.shown: dict[str, float] = {}

    def _show(self, line: str) -> None:
        self.stream.write(self.prefix + line + "\n")
        self.stream.flush()

    def write(self, text: str) -> None:
        for piece in text.replace("\r", "\n").split("\n"):
            piece = piece.strip()
            if not piece or any(n in piece for n in NOISE):
                continue
            bar = re.match(r"^(.*?):\s+(\d+)%\|", piece)
            if bar is None:
                self._show(piece)
                continue
            name, now = bar.group(1), time.monotonic()
            done = bar.group(2) == "100"
            if done or name not in self.shown or now - self.shown[name] >= self.every_s:
                self.shown[name] = now
                self._show(piece)
            if done:
                self.shown.pop(name, None)

    def flush(self) -> None:
        self.stream.flush()


def _kernel_stderr_to(path: Path) -> type:
    """A kernel manager whose kernel process writes its own stderr to `path`: what C++ libraries print
    past Python (the profiler's Kineto: `USDT: ... profiler_start`) lands there, not in the terminal.
    Cell output still travels through the notebook (and `progress`)."""
    from jupyter_client import AsyncKernelManager

    class Manager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
            with open(path, "ab") as log:  # the kernel holds its own copy of the descriptor
                await super()._async_launch_kernel(kernel_cmd, **{**kw, "stderr": log})

    return Manager


def execute_notebook(notebook: str, out_dir: Path, parameters: dict[str, Any], progress: Progress | None = None) -> Path:
    """Execute notebooks/<notebook> (a jupytext .py) with papermill into out_dir, running in out_dir; with
    `progress`, what its cells print reaches the terminal as they run. The kernel process's own stderr
    goes to out_dir/<notebook>.stderr.log (kept only when something was written)."""
    import jupytext
    import papermill

    nb = jupytext.read(NOTEBOOK_DIR / notebook)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    executed = out_dir / notebook.replace(".py", ".ipynb")
    stderr_log = out_dir / notebook.replace(".py", ".stderr.log")
    try:
        # The kernel's own warning about TCP transport on localhost is noise in every step's terminal output.
        papermill.execute_notebook(nb, str(executed), parameters=parameters, kernel_name="python3", cwd=str(out_dir),
                                   progress_bar=False, log_output=False, stdout_file=progress, stderr_file=progress,
                                   extra_arguments=["--IPKernelApp.log_level=ERROR"],
                                   kernel_manager_class=_kernel_stderr_to(stderr_log))
    finally:
        if stderr_log.is_file() and not stderr_log.stat().st_size:
            stderr_log.unlink()
    return executed


HEARTBEAT_S = 30.0  # a running run rewrites its heartbeat this often; three missed beats mean it is gone


class Interrupted(BaseException):
    """A run stopped by a signal (SIGTERM from a scheduler, SIGHUP from a closed terminal)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Interrupted in the main thread, as Ctrl-C raises KeyboardInterrupt, so the
    run is marked failed with the signal instead of dying with `running` in its manifest."""
    def handler(signum, frame):
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _Live:
    """While a run executes: an exclusive lock on <run>/.lock (a second `vitlab run --resume` of it is
    refused), pid and host in the manifest, and a heartbeat: <run>/.heartbeat touched every HEARTBEAT_S
    seconds by a thread (which never writes the manifest the main thread is changing), and the time of
    every manifest save."""

    def __init__(self, run_dir: Path, man: dict[str, Any]):
        self.run_dir, self.man, self.stop = run_dir, man, threading.Event()

    def __enter__(self) -> "_Live":
        self.lock_file = open(self.run_dir / ".lock", "a+")
        try:
            fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock_file.close()
            holder = manifest(self.run_dir)
            raise RunError(f"{self.run_dir} is being executed right now (pid {holder.get('pid')} on "
                           f"{holder.get('host')}); wait for it, or stop that process first") from None
        self.man.update(pid=os.getpid(), host=platform.node())
        self.save()
        threading.Thread(target=self._beat, daemon=True).start()
        return self

    def _beat(self) -> None:
        while True:
            (self.run_dir / ".heartbeat").touch()
            if self.stop.wait(HEARTBEAT_S):
                return

    def save(self) -> None:
        self.man["heartbeat"] = _now()
        write_json(self.run_dir / "manifest.json", self.man)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.save()
        fcntl.flock(self.lock_file, fcntl.LOCK_UN)
        self.lock_file.close()


def status(run_dir: str | Path) -> str:
    """The manifest's status, except that a `running` run whose process is gone (dead pid on this host, or
    no heartbeat for three intervals) is `interrupted`."""
    man = manifest(run_dir)
    if man["status"] != "running":
        return man["status"]
    if man.get("host") == platform.node() and man.get("pid"):
        try:
            os.kill(man["pid"], 0)
        except ProcessLookupError:
            return "interrupted"
        except PermissionError:
            pass
    beats = [dt.datetime.fromisoformat(man["heartbeat"]).timestamp()] if man.get("heartbeat") else []
    if (Path(run_dir) / ".heartbeat").exists():
        beats.append((Path(run_dir) / ".heartbeat").stat().st_mtime)
    if beats and time.time() - max(beats) > 3 * HEARTBEAT_S:
        return "interrupted"
    return "running"


def execute(run_dir: str | Path, rerun: list[str] | None = None) -> dict:
    """Execute the steps that are not `ok` yet (and those in `rerun`), in order; stop at the first
    failure and mark the run failed. A failed step's partial products are moved to <step>.failed/."""
    run_dir = Path(run_dir).resolve()
    man = manifest(run_dir)
    params = load_params(run_dir)
    for step in rerun or []:
        if step not in man["steps"]:
            raise RunError(f"cannot re-run '{step}': run {run_dir.name} has the steps {list(man['steps'])}")
        man["steps"][step]["status"] = "pending"
    with _Live(run_dir, man) as live, _signals_interrupt():
        man["status"], man["started"] = "running", man.get("started") or _now()
        if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:  # which GPU(s) of the machine it ran on
            man["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
        live.save()
        for step in man["steps"]:
            entry = man["steps"][step]
            if entry["status"] == "ok":
                continue
            # A step re-runs from scratch: nothing half-written by an earlier attempt survives.
            for old in (step_folder(run_dir, step), run_dir / f"{step}.failed"):
                shutil.rmtree(old, ignore_errors=True)
            entry.update(status="running", started=_now(), error=None)
            live.save()
            print(f"[vitlab] {run_dir.name}: {step} ...", flush=True)
            t0 = time.perf_counter()
            try:
                execute_notebook(STEPS[step].notebook, run_dir, {"params": params, "run_dir": str(run_dir)},
                                 Progress(step))
            except BaseException as e:  # Ctrl-C and signals too: the folder must say it did not finish
                error = f"{getattr(e, 'ename', type(e).__name__)}: {getattr(e, 'evalue', e)}"
                entry.update(status="failed", ended=_now(), seconds=round(time.perf_counter() - t0, 1), error=error)
                man.update(status="failed", ended=_now(), failed_step=step)
                if step_folder(run_dir, step).exists():
                    step_folder(run_dir, step).rename(run_dir / f"{step}.failed")
                live.save()
                print(f"[vitlab] {run_dir.name}: {step} FAILED: {error}\n"
                      f"[vitlab] see {run_dir / STEPS[step].notebook.replace('.py', '.ipynb')}; "
                      f"resume with: python -m vitlab run --resume {run_dir}", file=sys.stderr, flush=True)
                if not isinstance(e, Exception):
                    raise
                return man
            entry.update(status="ok", ended=_now(), seconds=round(time.perf_counter() - t0, 1))
            shutil.rmtree(resume_folder(run_dir, step), ignore_errors=True)
            live.save()
            print(f"[vitlab] {run_dir.name}: {step} ok ({entry['seconds']} s)", flush=True)
        done = all(man["steps"][s]["status"] == "ok" for s in man["steps"])
        man.update(status="ok" if done else "partial", ended=_now())
        man.pop("failed_step", None)
    return man


def side_by_side(run_dirs: list[Path], jobs: int, gpus: int) -> list[str]:
    """Execute several created runs at once, each in its own `vitlab run --resume` process: at most `jobs`
    at a time, and on a machine with GPUs each on one GPU of its own (CUDA_VISIBLE_DEVICES). Their
    output is passed on with each line led by its run's name. A signal here stops every run (each marks
    itself failed); returns each run's final status."""
    if gpus and jobs > gpus:
        raise RunError(f"{jobs} runs at once on {gpus} GPU(s): each run gets a GPU of its own")
    free, queue, running, status = list(range(jobs)), list(run_dirs), {}, {}

    def relay(proc: subprocess.Popen, name: str) -> None:
        for line in proc.stdout:
            print(f"{name} | {line}", end="", flush=True)

    def start(run_dir: Path, slot: int) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1") | ({"CUDA_VISIBLE_DEVICES": str(slot)} if gpus else {})
        proc = subprocess.Popen([sys.executable, "-m", "vitlab", "run", "--resume", str(run_dir)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT)
        reader = threading.Thread(target=relay, args=(proc, run_dir.name), daemon=True)
        reader.start()
        running[proc] = (run_dir, slot, reader)
        print(f"[vitlab] {run_dir.name}: started" + (f" on GPU {slot}" if gpus else ""), flush=True)

    try:
        with _signals_interrupt():
            while queue or running:
                while queue and free:
                    start(queue.pop(0), free.pop(0))
                for proc in [p for p in running if p.poll() is not None]:
                    run_dir, slot, reader = running.pop(proc)
                    reader.join()
                    free.append(slot)
                    status[run_dir.name] = manifest(run_dir)["status"]
                time.sleep(0.2)
    except (KeyboardInterrupt, Interrupted):
        for proc in running:  # each marks its run failed with the signal
            proc.send_signal(signal.SIGTERM)
        for proc, (_, _, reader) in running.items():
            proc.wait()
            reader.join()
        raise
    return [status[d.name] for d in run_dirs]


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

    Under `vitlab run`, papermill passes params and run_dir. Opened by hand in JupyterLab, the
    notebook resolves `params_file`, and works in a new run folder (a step that needs none) or in
    the newest run of that variant where the steps it needs finished.
    """
    if run_dir is None:
        params = config.resolve(REPO_ROOT / params_file)
        needs = STEPS[step].needs
        if needs:
            run_dir = latest(params["variant"], needs, runs_dir)
            params = load_params(run_dir)
        else:
            run_dir = create({**params, "steps": [step]}, runs_dir)
    import transformers

    from .models import resolve_device, use_cpu_threads

    run_dir = Path(run_dir)
    params = params or load_params(run_dir)
    transformers.set_seed(params["seed"])
    out = step_folder(run_dir, step)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(params["device"])
    if device.type == "cpu":
        use_cpu_threads()
    return params, run_dir, out, device


def render_html(notebook: str | Path) -> Path:
    """An executed notebook as a standalone HTML report, code cells hidden."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_filename(str(notebook))
    html = Path(notebook).with_suffix(".html")
    html.write_text(body)
    return html
