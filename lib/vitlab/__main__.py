"""Command line: `python -m vitlab run params/X.yaml` and `python -m vitlab report`."""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

from . import config, machine, runner, runs
from .errors import TIME_LIMIT_EXIT, VitlabError


def _duration(text: str) -> float:
    """Seconds from '90', '90s', '9m' or '2h'."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration: give seconds (90), or 9m, 2h") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"'{text}': a time limit is a positive duration")
    return seconds


def _split(value: str | None) -> list[str]:
    return [v for v in (value or "").split(",") if v]


def _check_on_this_machine(params: dict) -> None:
    """What would fail only inside a step, checked before any (after every value is checked)."""
    machine.check(config.validate(params))


def _resolved(params_file: str, args: argparse.Namespace) -> dict:
    params = config.resolve(params_file, args.set)
    if args.steps:
        params["steps"] = _split(args.steps)
        config.validate(params)
    _check_on_this_machine(params)
    return params


def _side_by_side(args: argparse.Namespace) -> int:
    """Several params files: every one checked before any starts, then run at once, one GPU each."""
    if args.time_limit:
        raise config.ParamsError("--time-limit stops one run at a step or epoch boundary: give one params file")
    if args.jobs is not None and args.jobs < 1:
        raise config.ParamsError(f"--jobs is how many runs go at once: at least 1, got {args.jobs}")
    every = [_resolved(f, args) for f in args.params]
    wide = [p["variant"] for p in every if max(p[s]["processes"] for s in ("finetune", "eval", "ablation")) > 1]
    if wide and len(every) > 1:
        raise config.ParamsError(f"side by side, each run gets one GPU; {wide} ask for several processes: run those alone")
    import torch

    gpus = torch.cuda.device_count()
    jobs = args.jobs or max(gpus, 1)
    run_dirs = [runs.create(p, args.runs_dir) for p in every]
    for d in run_dirs:
        print(f"[vitlab] run folder: {d}", flush=True)
    statuses = runner.side_by_side(run_dirs, jobs, gpus)
    for d, status in zip(run_dirs, statuses):
        print(f"[vitlab] {status}: {d}", flush=True)
    return 0 if all(s == "ok" for s in statuses) else 1


def _resume(args: argparse.Namespace) -> tuple[Path, list[str]] | None:
    """The run folder and the steps to run again, every change checked before anything runs; None when
    there is nothing to do."""
    if args.params:
        raise config.ParamsError("--resume continues a run with its recorded params.yaml: give no params file "
                                 "(--set changes what the steps still to run use)")
    run_dir = Path(args.resume)
    man = runs.manifest(run_dir)  # fails clearly on a folder that is not a run
    if runner.status(run_dir) == "running":
        raise runs.RunError(f"{run_dir} is being executed right now (pid {man.get('pid')} on {man.get('host')})")
    runner.wait_for_kernel(run_dir)
    asked = _split(args.rerun) + _split(args.steps)
    runs.check_rerun(run_dir, asked)
    rerun = runs.with_dependents(list(man["steps"]), asked)
    params = runs.load_params(run_dir)  # checked as a new run's: a hand-edited value is refused
    if args.set:
        runs.check_amendment(run_dir, [a.split("=", 1)[0].strip() for a in args.set], rerun)
        params = config.merge(params, config.parse_set(args.set))
        config.validate(params)
    _check_on_this_machine(params)
    if not rerun and all(v["status"] == "ok" for v in man["steps"].values()):
        print(f"[vitlab] nothing to do: every step of {run_dir} finished (--rerun STEP runs one again)", flush=True)
        return None
    if args.set:
        runs.amend_params(run_dir, params, args.set)
    if set(rerun) - set(asked):
        print(f"[vitlab] {', '.join(s for s in rerun if s not in asked)} read what {', '.join(asked)} makes: "
              "they run again too", flush=True)
    return run_dir, rerun


def _run(args: argparse.Namespace) -> int:
    if args.resume:
        resumed = _resume(args)
        if resumed is None:
            return 0
        run_dir, rerun = resumed
    else:
        if not args.params:
            raise config.ParamsError("give a params file (e.g. params/offline.yaml) or --resume RUN_DIR")
        if args.rerun:
            raise config.ParamsError("--rerun re-runs steps of an existing run: use it with --resume RUN_DIR")
        if len(args.params) > 1 or args.jobs:
            return _side_by_side(args)
        params = _resolved(args.params[0], args)
        run_dir, rerun = runs.create(params, args.runs_dir), []
    print(f"[vitlab] run folder: {run_dir}", flush=True)
    runs.note_command(run_dir, " ".join(["python -m vitlab", *map(shlex.quote, args.argv)]))
    # A step stopped by Ctrl-C leaves nbclient's task waiting on a kernel that is then killed; asyncio would
    # print that task's DeadKernelError traceback at exit. The run's own lines already say what happened.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    man = runner.execute(run_dir, rerun, deadline=args.started + args.time_limit if args.time_limit else None)
    print(f"[vitlab] {man['status']}" + (f" (time limit {man['time_limit']})" if "time_limit" in man else "")
          + f": {run_dir}", flush=True)
    _print_summary(run_dir)
    return 0 if man["status"] == "ok" else TIME_LIMIT_EXIT if "time_limit" in man else 1


def _print_summary(run_dir: Path) -> None:
    from . import report

    try:
        text = report.summary(run_dir)
    except Exception as e:  # the run is recorded whatever the summary says; never fail a run for its summary
        text = f"(no summary: {type(e).__name__}: {e})"
    print("\n".join("[vitlab] " + line for line in text.splitlines()), flush=True)


def _report(args: argparse.Namespace) -> int:
    from . import report

    sources = [Path(p).resolve() for p in args.runs] or runs.list_runs(args.runs_dir)
    for source in sources:
        runs.manifest(source)  # fails clearly on a folder that is not a run
    try:
        html = report.render(sources, Path(args.runs_dir).resolve())
    except Exception as e:  # papermill's execution error carries the failing cell's exception
        print(f"vitlab: report failed: {getattr(e, 'ename', type(e).__name__)}: {getattr(e, 'evalue', e)}",
              file=sys.stderr)
        return 1
    print(f"[vitlab] report: {html}", flush=True)
    if args.publish:
        for name, replaced in report.publish(html.parent):
            print(f"[vitlab] published figures/{name}{' (replaced the existing file)' if replaced else ''}", flush=True)
    return 0


def _flowers102_layout(args: argparse.Namespace) -> int:
    from . import data

    target = data.flowers102_layout(args.source, args.target)
    n = len(list((target / "flowers-102" / "jpg").iterdir()))
    print(f"[vitlab] {target}: torchvision's Flowers102 layout, {n} images linked; use it with "
          f"--set data.source=flowers102 --set data.root={target}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the step notebooks of a variant into a new run folder")
    run.add_argument("params", nargs="*", help="params file(s), e.g. params/offline.yaml; several run side by side, "
                     "one GPU each")
    run.add_argument("--jobs", type=int, help="with several params files: how many run at once (default: one per "
                     "GPU, or 1 on a machine without)")
    run.add_argument("--steps", help=f"comma-separated subset of {','.join(runs.STEPS)}")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one parameter")
    run.add_argument("--resume", metavar="RUN_DIR", help="run the steps of RUN_DIR that did not finish "
                     "(with --steps or --rerun: those steps again too; with --set: changed params for what runs)")
    run.add_argument("--rerun", metavar="STEPS", help="with --resume: comma-separated finished steps to run again")
    run.add_argument("--runs-dir", default=str(runs.RUNS_DIR), help="where run folders go (default: runs/)")
    run.add_argument("--time-limit", type=_duration, metavar="DURATION", help="stop before DURATION (90, 9m, 2h) is "
                     "up, at a step or training-epoch boundary, the state kept: --resume continues (exit 3)")
    run.set_defaults(func=_run)
    rep = sub.add_parser("report", help="render the comparison report of finished runs to HTML")
    rep.add_argument("runs", nargs="*", help="run folders to compare (default: every run under --runs-dir)")
    rep.add_argument("--publish", action="store_true", help="also copy the figures to figures/")
    rep.add_argument("--runs-dir", default=str(runs.RUNS_DIR))
    rep.set_defaults(func=_report)
    lay = sub.add_parser("flowers102-layout", help="link a train/valid/test Flowers-102 copy into torchvision's layout")
    lay.add_argument("source", help="a copy laid out as train/ valid/ test/ <class>/ with official_split/*.mat")
    lay.add_argument("target", help="where flowers-102/ is made (use it as data.root with data.source: flowers102)")
    lay.set_defaults(func=_flowers102_layout)
    args = parser.parse_args(argv)
    args.started, args.argv = time.time(), sys.argv[1:] if argv is None else argv
    try:
        return args.func(args)
    except runner.Interrupted as e:
        print(f"vitlab: {e}; the run is marked failed: resume it with --resume", file=sys.stderr)
        return 128 + e.signum
    except VitlabError as e:
        print(f"vitlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitlab: interrupted (Ctrl-C); a run that had started is marked failed: resume it with --resume",
              file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a read-only or missing folder: the system's own words, once
        print(f"vitlab: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
