"""Executing a run folder: each step's notebook through papermill, what it prints streamed to the terminal,
the run marked as it goes (a lock, pid, host and heartbeat while it runs; failed on an error or a signal,
with the step's partial files moved aside), and several runs side by side, one GPU each."""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from .config import REPO_ROOT
from .errors import RunError, TimeLimitReached
from .runs import DEADLINE_ENV, STEPS, _now, load_params, manifest, resume_folder, step_folder, write_json

NOTEBOOK_DIR = REPO_ROOT / "notebooks"


# Lines a step's kernel prints that say nothing to a researcher: transport and kernel-hub notices, and
# transformers naming "eetq" when an ablation keeps every linear of a model in 16-bit (nothing to quantize).
NOISE = ("Kernel is running over TCP without encryption", "Failed to load CPU gemm_4bit_forward", "USDT:",
         "no linear modules were found in your model")
# What a kernel writes on its own stderr that is not worth keeping: jupyter_client sends every kernel it shuts
# down a SIGINT, which an idle ipykernel sometimes reports. (USDT lines and the like are kept there.)
SHUTDOWN_NOISE = ("KeyboardInterrupt caught in kernel",)


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
            KERNELS.add(self.provisioner.process)
            # The kernel has a session of its own: a SIGKILL of `vitlab run` leaves it working for a moment.
            (path.parent / KERNEL_PID).write_text(str(self.provisioner.process.pid))

    return Manager


KERNEL_PID = ".kernel_pid"  # in a run folder while a step's kernel may be alive


def wait_for_kernel(run_dir: Path, seconds: float = 10.0) -> None:
    """Before a run is resumed: the kernel of its last step, if a killed `vitlab run` left it behind, gone
    (ipykernel leaves when its parent does, within about a second); else a RunError naming its pid."""
    path = Path(run_dir) / KERNEL_PID
    if not path.is_file():
        return
    pid, deadline = int(path.read_text() or 0), time.monotonic() + seconds
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        if pid:
            raise RunError(f"the kernel of {run_dir}'s last step (pid {pid}) is still running: let it end or kill it, "
                           "then resume")
    path.unlink(missing_ok=True)


# The kernels of steps executing now. A kernel busy in a cell does not stop when the run is interrupted
# (nbclient asks it to shut down, which it answers after the cell): left alone, a stopped finetune went on
# training to its last epoch behind a manifest that said failed.
KERNELS: set = set()


def _stop_kernels() -> None:
    """Interrupt every running step's kernel (KeyboardInterrupt in its cell), then kill what is left."""
    for process in list(KERNELS):
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 5
    for process in list(KERNELS):
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        KERNELS.discard(process)


def read_notebook(notebook: str):
    """notebooks/<notebook> (a jupytext percent .py whose header names the python3 kernel) as a notebook."""
    import jupytext

    return jupytext.read(NOTEBOOK_DIR / notebook)


def execute_notebook(notebook: str, out_dir: Path, parameters: dict[str, Any], progress: Progress | None = None) -> Path:
    """Execute notebooks/<notebook> (a jupytext .py) with papermill into out_dir, running in out_dir; with
    `progress`, what its cells print reaches the terminal as they run. The kernel process's own stderr
    goes to out_dir/<notebook>.stderr.log (kept only when it holds more than the shutdown notice)."""
    import papermill

    nb = read_notebook(notebook)
    executed = out_dir / notebook.replace(".py", ".ipynb")
    stderr_log = out_dir / notebook.replace(".py", ".stderr.log")
    try:
        # The kernel's own warning about TCP transport on localhost is noise in every step's terminal output.
        papermill.execute_notebook(nb, str(executed), parameters=parameters, kernel_name="python3", cwd=str(out_dir),
                                   progress_bar=False, log_output=False, stdout_file=progress, stderr_file=progress,
                                   extra_arguments=["--IPKernelApp.log_level=ERROR"],
                                   kernel_manager_class=_kernel_stderr_to(stderr_log))
    finally:
        KERNELS.difference_update({p for p in KERNELS if p.poll() is not None})
        if stderr_log.is_file() and not [line for line in stderr_log.read_text(errors="replace").splitlines()
                                         if line.strip() and not any(n in line for n in SHUTDOWN_NOISE)]:
            stderr_log.unlink()  # kept only when the kernel said something beyond known noise
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
        self.beating = threading.Thread(target=self._beat, daemon=True)
        self.beating.start()
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
        self.beating.join()  # or its last touch could bring .heartbeat back after it is removed below
        self.save()
        # The run is no longer live: its lock and heartbeat go (status() reads a finished run's manifest).
        for name in (".heartbeat", ".lock", KERNEL_PID):  # every kernel of the run has been shut down or killed
            (self.run_dir / name).unlink(missing_ok=True)
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


def execute(run_dir: str | Path, rerun: list[str] | None = None, deadline: float | None = None) -> dict:
    """Execute the steps that are not `ok` yet (and those in `rerun`), in order; stop at the first
    failure and mark the run failed. A failed step's partial products are moved to <step>.failed/.
    `deadline` (time.time() seconds, from --time-limit): no step starts after it, and a training step
    stops at the last epoch boundary before it with its state kept; the manifest says `time_limit`."""
    run_dir = Path(run_dir).resolve()
    man = manifest(run_dir)
    params = load_params(run_dir)
    for step in rerun or []:
        if step not in man["steps"]:
            raise RunError(f"cannot re-run '{step}': run {run_dir.name} has the steps {list(man['steps'])}")
        man["steps"][step]["status"] = "pending"
        shutil.rmtree(resume_folder(run_dir, step), ignore_errors=True)  # again means from the start
    if deadline is not None:
        os.environ[DEADLINE_ENV] = str(deadline)  # the steps' kernels inherit it
    else:
        os.environ.pop(DEADLINE_ENV, None)
    man.pop("time_limit", None)
    with _Live(run_dir, man) as live, _signals_interrupt():
        man["status"], man["started"] = "running", man.get("started") or _now()
        if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:  # which GPU(s) of the machine it ran on
            man["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
        live.save()
        for step in man["steps"]:
            if man["steps"][step]["status"] == "ok":
                continue
            if deadline is not None and time.time() >= deadline:
                man.update(status="partial", ended=_now(), time_limit=f"reached before {step}")
                print(f"[vitlab] {run_dir.name}: the time limit is reached before {step}; continue with: "
                      f"python -m vitlab run --resume {run_dir}", flush=True)
                return man
            if not _run_step(run_dir, step, params, man, live):
                return man
        done = all(man["steps"][s]["status"] == "ok" for s in man["steps"])
        man.update(status="ok" if done else "partial", ended=_now())
        man.pop("failed_step", None)
    return man


def _run_step(run_dir: Path, step: str, params: dict, man: dict, live: _Live) -> bool:
    """One step's notebook, its manifest entry kept as it goes; False when it failed (marked so)."""
    entry = man["steps"][step]
    # A step re-runs from scratch: nothing half-written by an earlier attempt survives.
    for old in (step_folder(run_dir, step), run_dir / f"{step}.failed"):
        shutil.rmtree(old, ignore_errors=True)
    entry.update(status="running", started=_now(), error=None)
    live.save()
    print(f"[vitlab] {run_dir.name}: {step} ...", flush=True)
    t0 = time.perf_counter()
    try:
        execute_notebook(STEPS[step].notebook, run_dir, {"params": params, "run_dir": str(run_dir)}, Progress(step))
    except BaseException as e:  # Ctrl-C and signals too: the folder must say it did not finish
        _stop_kernels()
        name = getattr(e, "ename", type(e).__name__)
        error = f"{name}: {getattr(e, 'evalue', e)}"
        entry.update(status="failed", ended=_now(), seconds=round(time.perf_counter() - t0, 1), error=error)
        man.update(status="failed", ended=_now(), failed_step=step)
        if name == TimeLimitReached.__name__:
            man["time_limit"] = f"reached in {step}"
        if step_folder(run_dir, step).exists():
            step_folder(run_dir, step).rename(run_dir / f"{step}.failed")
        live.save()
        print(f"[vitlab] {run_dir.name}: {step} {'STOPPED' if 'time_limit' in man else 'FAILED'}: {error}\n"
              f"[vitlab] see {run_dir / STEPS[step].notebook.replace('.py', '.ipynb')}; "
              f"resume with: python -m vitlab run --resume {run_dir}", file=sys.stderr, flush=True)
        if not isinstance(e, Exception):
            raise
        return False
    entry.update(status="ok", ended=_now(), seconds=round(time.perf_counter() - t0, 1))
    shutil.rmtree(resume_folder(run_dir, step), ignore_errors=True)
    with contextlib.suppress(OSError):  # .resume/ itself, once no step keeps a state there
        resume_folder(run_dir, step).parent.rmdir()
    live.save()
    print(f"[vitlab] {run_dir.name}: {step} ok ({entry['seconds']} s)", flush=True)
    return True


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


def render_html(notebook: str | Path) -> Path:
    """An executed notebook as a standalone HTML report, code cells hidden."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_filename(str(notebook))
    html = Path(notebook).with_suffix(".html")
    html.write_text(body)
    return html
