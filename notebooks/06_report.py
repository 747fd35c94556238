# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # vitlab report: every run, compared
# One run answers one question; the trade-offs only show side by side. Accuracy against latency,
# size against memory, throughput against batch size, where the forward pass spends its time, and
# which layers tolerate quantization. Each figure names the runs it comes from; the first table
# lists every run, failed ones included, with its status.

# %% tags=["parameters"]
run_dirs = None  # run folders to compare; None: every run under runs_root
runs_root = "runs"

# %%
from pathlib import Path

import pandas as pd
from IPython.display import Image, Markdown, display

from vitlab import ablation, mixed, plots, report, runs

sources = [Path(r) for r in run_dirs] if run_dirs else runs.list_runs(runs_root)
data = report.collect(sources)
keep = lambda fig, name: plots.save(fig, Path(report.FIGURES) / name)
display(Markdown(f"**{len(data.status)} run{'' if len(data.status) == 1 else 's'}** under `{runs_root}` · every number below also in "
                 f"`report.csv` (raw, one row per model and batch size)"))
if not data.accuracy.empty:
    report.combined_csv(data, Path("report.csv"))
report.status_table(data.status)

# %% [markdown]
# ## Accuracy on the test split
# top-1 with its bootstrap 95% interval over the test images, top-5, macro F1; size on disk and in
# memory. Two models whose intervals overlap widely are not told apart by this test split; a quantized
# model is judged by its paired difference to its run's own 16-bit model on the same images, whose
# interval is far tighter.

# %%
if data.accuracy.empty:
    display(Markdown("_No run has a finished evaluate step yet._"))
else:
    display(report.accuracy_table(data.accuracy))

# %% [markdown]
# ## How each model trained
# Loss and accuracy per epoch on the training images (augmented) and the validation split, as the
# finetune step drew them: a gap that widens is over-fitting, curves still falling are under-training.

# %%
for label, figure in report.figures(data, "training_curves"):
    display(Markdown(f"**{label}**"), Image(filename=str(figure)))

# %% [markdown]
# ## Which classes each model confuses
# Each model's most frequent mistakes on the test split, then the confusion matrix of each run that can
# name its classes on the axes (up to 40); a larger one is the run's `evaluate/confusion.png`, and every
# cell is in its `evaluate/confusion.csv`.

# %%
pairs = report.confused_pairs_table(data)
display(pairs if not pairs.empty else Markdown("No evaluated run has a mistake on its test split."))
for label, figure in report.labelled_confusion_figures(data):
    display(Markdown(f"**{label}**"), Image(filename=str(figure)))

# %% [markdown]
# ## Accuracy against latency, per batch size

# %%
if not data.latency.empty:
    both = data.latency.merge(data.accuracy[["model", "top1", "top1_lo", "top1_hi"]], on="model")
    for bs in sorted(both["batch_size"].unique()):
        keep(plots.accuracy_vs_latency(both, int(bs)), f"accuracy_vs_latency_bs{bs}.png")

# %% [markdown]
# ## Throughput against batch size
# The table gives the median (p50) latency per model and batch size; where p95 is more than 1.5x the
# median the timing was noisy (other work on the machine) and the p95 is shown beside it.

# %%
if not data.latency.empty:
    keep(plots.throughput_vs_batch(data.latency), "throughput_vs_batch.png")
    display(report.latency_table(data.latency))

# %% [markdown]
# ## Size against memory

# %%
if not data.accuracy.empty:
    peak = data.latency.groupby("model")["peak_mem_mb"].max()
    keep(plots.size_vs_memory(data.accuracy.join(peak, on="model")), "size_vs_memory.png")

# %% [markdown]
# ## Where the forward pass goes

# %%
if not data.profile.empty:
    data.profile.attrs["clock"] = "/".join(sorted(data.profile["clock"].unique()))
    keep(plots.component_breakdown(data.profile), "component_breakdown.png")
else:
    display(Markdown("_No run here profiled its forward pass (`eval.profile: true` in an evaluate step)._"))

# %% [markdown]
# ## Per-layer quantization sensitivity, and the mixed-precision choice
# KL divergence from the 16-bit model when only that layer stays in 16-bit (lower: keeping the
# layer helps more), with bootstrap 95% intervals; then every configuration the ablation tried,
# accuracy and KL against size, with the Pareto front and the configuration it chose.

# %%
if not data.sensitivity.empty:
    for run, rows in data.sensitivity.groupby("run"):
        if "kind" not in rows or rows["kind"].isna().any():
            display(Markdown(f"_{run}: ablation written by an older vitlab (no intervals, no choice): re-run its "
                             "ablation step to include it._"))
            continue
        fig = plots.sensitivity(rows, "kl")
        fig.axes[0].set_title(f"per-layer sensitivity (KL), {run}")
        keep(fig, f"sensitivity_{run}.png")
        keep(plots.pareto(rows, data.choices[run]), f"pareto_{run}.png")
        display(Markdown(f"**{run}**: the choice per quantization type"), report.choice_table(data.choices[run]))
else:
    display(Markdown("_No run here has an ablation step._"))

# %% [markdown]
# ## The choice on held-out images
# Each ablation's choice scored on its `verify_split` against the seeds' heuristics, with paired
# bootstrap intervals of the differences: an interval that holds 0 is a tie, not a win.

# %%
for run, checks in data.checks.items():
    display(Markdown(f"**{run}**\n\n" + "\n".join(f"- {line}" for line in ablation.verdicts(checks))))
if not data.checks:
    display(Markdown("_No ablation here checked its choice on held-out images (`ablation.verify_split`)._"))

# %% [markdown]
# ## Formats per layer under a budget
# For each run whose ablation made the per-layer format choice (`ablation.formats`): every configuration
# checked on held-out images, accuracy against latency at the batch size it was chosen at (grey: the
# Pareto front), and the verdict against the uniform formats and the heuristics, with paired intervals.

# %%
for run, study in data.mixed.items():
    checked = pd.DataFrame(study["checks"]).assign(model=lambda d: d["choice"])
    fig = plots.accuracy_vs_latency(checked, study["latency_batch_size"], front=True)
    fig.axes[0].set_title(f"formats per layer, {run}, batch {study['latency_batch_size']}")
    keep(fig, f"mixed_formats_{run}.png")
    display(Markdown(mixed.verdict(study)))
if not data.mixed:
    display(Markdown("_No run here made the per-layer format choice (`ablation.formats`)._"))

