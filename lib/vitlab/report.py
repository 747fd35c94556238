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

from . import fmt, runner, runs
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
    checks: dict[str, list[dict]] = field(default_factory=dict)  # run label -> the choice's held-out check rows
    mixed: dict[str, dict] = field(default_factory=dict)  # run label -> its formats-per-layer study (mixed.study)
    dirs: dict[str, Path] = field(default_factory=dict)  # run label -> its folder (readable runs only)


def _manifests(run_dirs: list[Path]) -> dict[Path, dict | str]:
    """Each run's manifest, or why it cannot be read: one bad folder must not hide the others."""
    out: dict[Path, dict | str] = {}
    for r in run_dirs:
        try:
            out[r] = runs.manifest(r)
        except (OSError, ValueError, runs.RunError) as e:
            out[r] = f"unreadable manifest.json ({type(e).__name__}: {str(e)[:120]})"
    return out


def _labels(mans: dict[Path, dict | str]) -> dict[Path, str]:
    """The variant name, with the run's time where a variant ran more than once."""
    variants = {r: m["variant"] if isinstance(m, dict) else r.name for r, m in mans.items()}
    counts = pd.Series(list(variants.values())).value_counts()
    return {r: v if counts[v] == 1 else f"{v}@{r.name.split('_')[1]}" for r, v in variants.items()}


def _trained(run_dir: Path) -> str:
    """How a run trained, in a few words (runs of one study differ in it and are named only by number)."""
    try:
        params = runs.load_params(run_dir)
    except (OSError, ValueError, runs.RunError) as e:
        return f"unreadable params ({type(e).__name__}: {str(e)[:120]})"
    ft = params["finetune"]
    if "finetune" not in params["steps"] or ft["method"] == "none":
        return "–"
    lora = ft["lora"]
    how = (f"{ft['method']} r={lora['r']} alpha={lora['alpha']}"
           + (f" on {','.join(lora['target_modules'])}" if isinstance(lora["target_modules"], list) else "")
           if ft["method"] in ("lora", "qlora") else ft["method"])
    return f"{how}, {ft['epochs']} epochs"


def collect(run_dirs: list[Path]) -> Collected:
    """Status of every run (failed and unreadable ones included) and the results of the steps that finished."""
    mans = _manifests(run_dirs)
    labels = _labels(mans)
    status, acc, lat, prof, sens, choices, checks, mixed = [], [], [], [], [], {}, {}, {}
    for r, man in mans.items():
        if isinstance(man, str):
            status.append({"run": r.name, "label": labels[r], "status": man})
            continue
        status.append({"run": r.name, "label": labels[r], "status": runner.status(r),
                       "trained": _trained(r),
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
            choice = runs.read_json(runs.path(r, "choice"))
            choices[labels[r]], checks[labels[r]] = choice["choices"], choice["checks"]
            study = runs.path(r, "mixed_formats")
            if study.is_file() and runs.read_json(study)["choice"]:  # older ablations, or no ablation.formats
                mixed[labels[r]] = runs.read_json(study)
    cat = lambda frames: pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    dirs = {labels[r]: r for r, man in mans.items() if isinstance(man, dict)}
    return Collected(pd.DataFrame(status), cat(acc), cat(lat), cat(prof), cat(sens), choices, checks, mixed, dirs)


# --- tables for reading: formatted once here, for the report and the end-of-run summary ---------------

def status_table(status: pd.DataFrame) -> pd.DataFrame:
    return status.set_index("run").fillna("–").replace({None: "–"})


def accuracy_table(accuracy: pd.DataFrame) -> pd.DataFrame:
    """One row per model: top-1 with its 95% interval, its paired difference to its run's 16-bit model on the
    same images (the comparison a quantized model is judged by: far tighter than the two intervals), top-5,
    macro F1, size on disk and in memory."""
    delta = accuracy.get("top1_delta_pt", pd.Series(float("nan"), index=accuracy.index))
    return pd.DataFrame({
        "top-1 [95% CI]": [fmt.pct(r.top1, r.top1_lo, r.top1_hi) for r in accuracy.itertuples()],
        "vs its run's 16-bit [95% CI]": [
            "–" if pd.isna(d) else fmt.pt(d / 100, lo / 100, hi / 100)
            for d, lo, hi in zip(delta, accuracy.get("delta_lo_pt", delta), accuracy.get("delta_hi_pt", delta))],
        "top-5": [fmt.pct(x) for x in accuracy["top5"]],
        "macro F1": [f"{x:.3f}" for x in accuracy["f1_macro"]],
        "disk": [fmt.mb(x) for x in accuracy["disk_mb"]],
        "in memory": [fmt.mb(x) for x in accuracy["footprint_mb"]],
        "images": accuracy["n"].astype(int).to_list()}, index=pd.Index(accuracy["model"], name="model"))


def latency_table(latency: pd.DataFrame) -> pd.DataFrame:
    """p50 latency per model (rows) and batch size (columns), with the spread when it is large and, then,
    the machine's load while it was timed (a load near the core count makes such a number noise)."""
    def cell(rows: pd.DataFrame) -> str:
        r = rows.iloc[0]
        noisy = "p95_ms" in r and r["p95_ms"] > 1.5 * r["p50_ms"]
        load = f", load {r['load_1min']:.1f}/{int(r['cpus'])}" if noisy and pd.notna(r.get("load_1min")) else ""
        return fmt.ms(r["p50_ms"]) + (f" (p95 {fmt.ms(r['p95_ms'])}{load})" if noisy else "")
    table = latency.groupby(["model", "batch_size"], sort=False).apply(cell, include_groups=False).unstack()
    table.columns = [f"batch {int(b)}" for b in table.columns]
    return table.fillna("–")


def confused_pairs_table(data: Collected) -> pd.DataFrame:
    """Each evaluated model's most frequent mistakes on test (evaluate's `confusions`), by class name: what a
    matrix of a hundred classes cannot label."""
    rows = [{"model": f"{label} · {model}", "true": pair["true"], "predicted as": pair["predicted"], "images": pair["count"]}
            for label, r in data.dirs.items() if runs.done(r, "evaluate")
            for model, pairs in runs.read_json(runs.path(r, "results")).get("confusions", {}).items() for pair in pairs]
    return pd.DataFrame(rows).set_index(["model", "true"]) if rows else pd.DataFrame()


def labelled_confusion_figures(data: Collected) -> list[tuple[str, Path]]:
    """The confusion matrices that can name their classes on the axes (a larger one stays in its run)."""
    from .plots import LABELLED_CLASSES  # matplotlib: not for the end-of-run summary, which imports this module
    return [(label, figure) for label, figure in figures(data, "confusion_figure")
            if pd.read_csv(runs.path(data.dirs[label], "confusion"))["true"].nunique() <= LABELLED_CLASSES]


def figures(data: Collected, product: str) -> list[tuple[str, Path]]:
    """(run label, file) of a figure product (runs.STEPS) for each run that has it, as its step drew it."""
    return [(label, runs.path(r, product)) for label, r in data.dirs.items() if runs.path(r, product).is_file()]


def choice_table(choices: dict[str, dict]) -> pd.DataFrame:
    """The ablation's choice per quantization type."""
    return pd.DataFrame({q: {"kept in 16-bit": c["keep_16bit"] or "none", "size": fmt.mb(c["footprint_mb"]),
                             "top-1 (valid)": fmt.pct(c["top1"]), "KL": f"{c['kl']:.2e}",
                             "budget": (fmt.mb(c["budget_mb"]) if c["budget_mb"] is not None else "")
                             + (f" {c['max_top1_drop'] * 100:g} pt" if c["max_top1_drop"] is not None else "")}
                         for q, c in choices.items()}).T


def summary(run_dir: Path) -> str:
    """What `vitlab run` prints at the end: each step's time, each model's top-1 with its interval, size
    and latency, the ablation's choice, and where the files are."""
    man = runs.manifest(run_dir)
    steps = " · ".join(f"{s} {v['status']}" + (f" {v['seconds']:.0f} s" if v.get("seconds") is not None else "")
                       for s, v in man["steps"].items())
    lines = [f"steps: {steps}"]
    data = collect([run_dir])
    if not data.accuracy.empty:
        acc = accuracy_table(data.accuracy)[["top-1 [95% CI]", "disk", "images"]]
        table = acc.join(latency_table(data.latency)) if not data.latency.empty else acc
        table.index = [m.split(" · ", 1)[1] for m in table.index]
        lines += [table.to_string()]
    for run, choices in data.choices.items():
        lines += [f"ablation's choice ({q}): keep {c['keep_16bit'] or 'nothing'} in 16-bit, {fmt.mb(c['footprint_mb'])}, "
                  f"valid top-1 {fmt.pct(c['top1'])}" for q, c in choices.items()]
        lines += [f"  as a params file: {p}" for p in sorted((Path(run_dir) / "ablation").glob("*_mixed.yaml"))]
    for run, study in data.mixed.items():
        c = study["choice"]
        lines += [f"formats per layer ({c['budget']}): {fmt.formats(c['formats'])}, {fmt.ms(c['p50_ms'])} at batch "
                  f"{c['batch_size']}, valid top-1 {fmt.pct(c['top1'])}"]
        lines += [f"  as a params file: {p}" for p in sorted((Path(run_dir) / "ablation").glob("*_mixed_formats.yaml"))]
    if runs.done(run_dir, "evaluate"):
        lines += [f"every number: {runs.path(run_dir, 'results_table')}"]
    lines += ["compare runs: python -m vitlab report  (-> runs/reports/<date>_<time>/06_report.html)"]
    return "\n".join(lines)


def combined_csv(data: Collected, path: Path) -> Path:
    """Every model's accuracy next to its latency at every batch size, raw numbers, one row per model and
    batch size: for a spreadsheet or pandas."""
    rows = data.latency.merge(data.accuracy.drop(columns=["run", "device"], errors="ignore"), on="model", how="outer")
    rows.to_csv(path, index=False)
    return path


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
