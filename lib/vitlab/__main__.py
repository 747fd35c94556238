"""Command line: `python -m vitlab run params/X.yaml` and `python -m vitlab report`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import config, report, runs
from .data import DataError


def _run(args: argparse.Namespace) -> int:
    if args.resume:
        if args.params or args.set:
            raise config.ParamsError("--resume re-runs a folder with its recorded params.yaml; "
                                     "it takes no params file and no --set")
        run_dir = Path(args.resume)
        runs.manifest(run_dir)  # fails clearly on a folder that is not a run
    else:
        if not args.params:
            raise config.ParamsError("give a params file (e.g. params/offline.yaml) or --resume RUN_DIR")
        params = config.resolve(args.params, args.set)
        if args.steps:
            params["steps"] = args.steps.split(",")
            config.validate(params)
        run_dir = runs.create(params, args.runs_dir)
    print(f"[vitlab] run folder: {run_dir}", flush=True)
    man = runs.execute(run_dir)
    print(f"[vitlab] {man['status']}: {run_dir}", flush=True)
    return 0 if man["status"] == "ok" else 1


def _report(args: argparse.Namespace) -> int:
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
    run.add_argument("params", nargs="?", help="params file, e.g. params/offline.yaml")
    run.add_argument("--steps", help=f"comma-separated subset of {','.join(config.STEPS)}")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one parameter")
    run.add_argument("--resume", metavar="RUN_DIR", help="re-run the steps of RUN_DIR that did not finish")
    run.add_argument("--runs-dir", default=str(runs.RUNS_DIR), help="where run folders go (default: runs/)")
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
    try:
        return args.func(args)
    except (config.ParamsError, runs.RunError, DataError) as e:
        print(f"vitlab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
