"""Gather the results of many run folders into tables for the report notebook."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import runs


@dataclass
class Collected:
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
    run_dirs = [r for r in run_dirs if runs.manifest(r)["variant"] != "report"]
    labels = _labels(run_dirs)
    status, acc, lat, prof, sens, choices = [], [], [], [], [], {}
    for r in run_dirs:
        man = runs.manifest(r)
        status.append({"run": r.name, "label": labels[r], "status": man["status"],
                       **{s: v["status"] for s, v in man["steps"].items()},
                       "failed": man.get("failed_step"), "device": man["device"]["name"],
                       "commit": (man["git"]["commit"] or "")[:8]})
        if man["steps"].get("evaluate", {}).get("status") == "ok":
            res = runs.read_json(r / "evaluate" / "results.json")
            tag = lambda rows: pd.DataFrame(rows).assign(run=labels[r], device=res["device"],
                                                         label=lambda d: labels[r] + " · " + d["model"])
            acc.append(tag(res["accuracy"]))
            lat.append(tag(res["latency"]))
            if res["profile"]:
                prof.append(tag(res["profile"]))
        if man["steps"].get("ablation", {}).get("status") == "ok":
            sens.append(pd.DataFrame(runs.read_json(r / "ablation" / "sensitivity.json")).assign(run=labels[r]))
            choices[labels[r]] = runs.read_json(r / "ablation" / "choice.json")["choices"]
    cat = lambda frames: pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return Collected(pd.DataFrame(status), cat(acc), cat(lat), cat(prof), cat(sens), choices)
