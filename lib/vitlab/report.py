"""The cross-run report: gather the results of many run folders into tables, render them to HTML.

The report is not a run: it has no params and no manifest. `vitlab report` executes 06_report into
runs/reports/<YYYY-MM-DD_HHMMSS>/ and renders it to HTML with the code hidden; `--publish` copies
its figures to figures/ and says which tracked files it replaced.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import runner, runs
from .config import REPO_ROOT

NOTEBOOK = "06_report.py"
FIGURES = "figures"  # inside a report folder
PUBLISHED = REPO_ROOT / "figures"


@dataclass
class Collected:
    """Tables over runs. accuracy/latency/profile have `run` (the run's label) and `model` (run label ·
    model label), the column the figures in `plots` group by."""
    status: pd.DataFrame
    accuracy: pd.DataFrame = field(default_factory=pd.DataFrame)
    latency: pd.DataFrame = field(default_factory=pd.DataFrame)
    profile: pd.DataFrame = field(default_factory=pd.DataFrame)
    sensitivity: pd.DataFrame = field(default_factory=pd.DataFrame)
    choices: dict[str, dict] = field(default_factory=dict)  # run label -> the ablation's choice per quant type


def _labels(run_dirs: list[Path]) -> dict[Path, str]:
    """The variant name, with the run's time where a variant ran more than once."""
    variants = {r: runs.manifest(r)["variant"] for r in run_dirs}
    counts = pd.Series(list(variants.values())).value_counts()
    return {r: v if counts[v] == 1 else f"{v}@{r.name.split('_')[1]}" for r, v in variants.items()}


def collect(run_dirs: list[Path]) -> Collected:
    """Status of every run (failed ones included) and the results of the steps that finished."""
    labels = _labels(run_dirs)
    status, acc, lat, prof, sens, choices = [], [], [], [], [], {}
    for r in run_dirs:
        man = runs.manifest(r)
        status.append({"run": r.name, "label": labels[r], "status": runner.status(r),
                       **{s: v["status"] for s, v in man["steps"].items()},
                       "failed": man.get("failed_step"), "device": man["device"]["name"],
                       "commit": (man["git"]["commit"] or "")[:8]})
        if runs.done(r, "evaluate"):
            res = runs.read_json(runs.path(r, "results"))
            tag = lambda rows: pd.DataFrame(rows).assign(run=labels[r], device=res["device"],
                                                         model=lambda d: labels[r] + " · " + d["model"])
            acc.append(tag(res["accuracy"]))
            lat.append(tag(res["latency"]))
            if res["profile"]:
                prof.append(tag(res["profile"]))
        if runs.done(r, "ablation"):
            sens.append(pd.DataFrame(runs.read_json(runs.path(r, "sensitivity"))).assign(run=labels[r]))
            choices[labels[r]] = runs.read_json(runs.path(r, "choice"))["choices"]
    cat = lambda frames: pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return Collected(pd.DataFrame(status), cat(acc), cat(lat), cat(prof), cat(sens), choices)


def render(run_dirs: list[Path], runs_root: Path) -> Path:
    """Execute the report notebook over `run_dirs` into a new folder under runs_root/reports; its HTML."""
    out = runs.new_folder(Path(runs_root) / "reports")
    notebook = runner.execute_notebook(NOTEBOOK, out, {"run_dirs": [str(r) for r in run_dirs], "runs_root": str(runs_root)})
    return runner.render_html(notebook)


def publish(report_dir: Path, target: Path = PUBLISHED) -> list[tuple[str, bool]]:
    """Copy a report's figures into `target`; (file name, whether it replaced a file there) for each."""
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for figure in sorted((report_dir / FIGURES).glob("*.png")):
        copied.append((figure.name, (target / figure.name).exists()))
        shutil.copy(figure, target / figure.name)
    return copied
