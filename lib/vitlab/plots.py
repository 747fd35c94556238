"""Figures shared by the notebooks. Each function takes tidy rows (a `model` column names what is
compared) and returns a matplotlib Figure drawn in vitlab's seaborn style."""
from __future__ import annotations

import functools
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from . import ablation



def _styled(draw):
    """Draw in seaborn's whitegrid style without changing the caller's matplotlib settings."""
    @functools.wraps(draw)
    def styled(*args, **kwargs):
        with sns.axes_style("whitegrid"), sns.plotting_context("notebook"), sns.color_palette("deep"):
            return draw(*args, **kwargs)
    return styled


def save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


@_styled
def training_curves(history: list[dict]) -> plt.Figure:
    h = pd.DataFrame(history)
    v = h.dropna(subset=["val_acc"])  # finetune.valid_every > 1 validates some epochs only
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(h["epoch"], h["train_loss"], "o-", label="train")
    ax_loss.plot(v["epoch"], v["val_loss"], "o-", label="valid")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.plot(h["epoch"], h["train_acc"], "o-", label="train (augmented)")
    ax_acc.plot(v["epoch"], v["val_acc"], "o-", label="valid")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.legend()
    fig.tight_layout()
    return fig


@_styled
def validation_curves(histories: dict[str, list[dict]], legend_title: str | None = None) -> plt.Figure:
    """Validation accuracy per epoch of several trainings (one line each, named by the dict's keys)."""
    fig, ax = plt.subplots(figsize=(10, 4.2))
    for name, history in histories.items():
        v = pd.DataFrame(history).dropna(subset=["val_acc"])
        ax.plot(v["epoch"], v["val_acc"], label=name, lw=1.4)
    ax.set(xlabel="epoch", ylabel="valid top-1", title="validation accuracy (EMA weights)", ylim=(0, 1))
    ax.legend(fontsize=8, loc="lower right", title=legend_title, title_fontsize=8)
    fig.tight_layout()
    return fig


@_styled
def accuracy_vs_latency(rows: pd.DataFrame, batch_size: int, front: bool = False) -> plt.Figure:
    """top-1 (with its bootstrap 95% interval) against p50 latency at one batch size; one point per model.
    The latency axis starts at 0, so distances read as ratios; when the slowest model is over 20x the
    fastest (bitsandbytes int8 at batch 1 beside a CUDA graph), it is logarithmic instead, where equal
    ratios are equal distances and the fast models do not sit on top of each other at 0. `front`: a grey
    step line through the Pareto front (no other point is both faster and more accurate)."""
    d = rows[rows["batch_size"] == batch_size]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if front:
        line = [(r["p50_ms"], r["top1"]) for r in ablation.pareto_front(d.to_dict("records"), cost="p50_ms")]
        ax.step(*zip(*line), where="post", color="0.6", lw=1.5, zorder=0, label="Pareto front")
    markers = "osDX^vP*"
    for (i, (_, r)), color in zip(enumerate(d.iterrows()), sns.color_palette(n_colors=len(d))):
        ax.errorbar(r["p50_ms"], r["top1"], yerr=[[r["top1"] - r["top1_lo"]], [r["top1_hi"] - r["top1"]]],
                    fmt=markers[i % len(markers)], ms=9, capsize=3, color=color, label=r["model"])
    wide = d["p50_ms"].max() > 20 * d["p50_ms"].min()
    if wide:
        ax.set_xscale("log")
    else:
        ax.set_xlim(left=0, right=d["p50_ms"].max() * 1.15)
    ax.set(xlabel=f"p50 latency at batch {batch_size} (ms{', log scale' if wide else ''})", ylabel="top-1 (test, bootstrap 95%)",
           title=f"accuracy vs latency, batch {batch_size}")
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")  # outside: it hid points and error bars
    fig.tight_layout()
    return fig


@_styled
def size_vs_memory(rows: pd.DataFrame) -> plt.Figure:
    """The models' sizes (on disk, in memory) beside the peak memory of running them: two panels, since a
    process's peak (on a CPU its whole resident set) can be a thousand times a small model's size."""
    sizes = rows.melt(id_vars="model", value_vars=[c for c in ("disk_mb", "footprint_mb") if c in rows],
                      var_name="measure", value_name="MB").replace({"disk_mb": "on disk", "footprint_mb": "in memory"})
    fig, (ax, ax_peak) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    sns.barplot(data=sizes, y="model", x="MB", hue="measure", ax=ax, orient="h")
    ax.set(title="model size", ylabel="", xlabel="MB")
    ax.legend(title="", fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.08), ncol=2)  # above: it hid bars
    if "peak_mem_mb" in rows and rows["peak_mem_mb"].notna().any():
        sns.barplot(data=rows, y="model", x="peak_mem_mb", ax=ax_peak, orient="h", color="grey")
        ax_peak.set(title="peak memory while timing", ylabel="", xlabel="MB (GPU: allocated; CPU: process RSS)",
                    yticklabels=[])
    else:
        ax_peak.set_axis_off()
    fig.tight_layout()
    return fig


@_styled
def throughput_vs_batch(rows: pd.DataFrame) -> plt.Figure:
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    sns.lineplot(data=rows, x="batch_size", y="throughput_img_s", hue="model", marker="o", ax=ax)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="images / s (at p50)", title="throughput")
    sizes = sorted(rows["batch_size"].unique())
    ax.xaxis.set_major_locator(FixedLocator(sizes))  # the batch sizes measured, as numbers: 1, 16, 64
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(int(b)) for b in sizes])
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    return fig


@_styled
def component_breakdown(rows: pd.DataFrame) -> plt.Figure:
    """Stacked forward time per component, one bar per model."""
    d = rows[~rows["component"].str.startswith(("bnb", "dequant"))]
    wide = d.pivot_table(index="model", columns="component", values="time_ms", aggfunc="sum")
    fig, ax = plt.subplots(figsize=(7, 3.8))
    wide.plot.barh(stacked=True, ax=ax, colormap="tab10")
    clock = rows.attrs.get("clock", "")
    batch = sorted(rows["batch_size"].dropna().unique()) if "batch_size" in rows else []
    at = f", batch {'/'.join(str(int(b)) for b in batch)}" if batch else ""
    ax.set(xlabel=f"ms per forward ({clock} time)".replace(" ()", ""), ylabel="", title=f"where the forward pass goes{at}")
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    return fig


LABELLED_CLASSES = 40  # the most classes whose names fit on a confusion matrix's axes


@_styled
def confusion(matrix: pd.DataFrame, title: str) -> plt.Figure:
    """A confusion matrix (rows: true, columns: predicted) as a heatmap of row shares; class names on
    the axes while they fit (up to LABELLED_CLASSES)."""
    shares = matrix.div(matrix.sum(axis=1).clip(lower=1), axis=0)
    n = len(matrix)
    fig, ax = plt.subplots(figsize=(min(4 + 0.22 * n, 16), min(3.5 + 0.2 * n, 15)))
    sns.heatmap(shares, ax=ax, cmap="rocket_r", vmin=0, vmax=1, square=True, cbar_kws={"label": "share of the true class"},
                xticklabels=n <= LABELLED_CLASSES, yticklabels=n <= LABELLED_CLASSES)
    ax.set(title=title, xlabel="predicted", ylabel="true")
    fig.tight_layout()
    return fig


@_styled
def sensitivity(rows: pd.DataFrame, value: str = "kl") -> plt.Figure:
    """Per-layer sensitivity: the metric (with its bootstrap 95% interval) when all but one layer is
    quantized, one panel per quantization type (their KLs differ by 10x and more, so each has its own
    scale); the all-quantized level as a dashed line."""
    layers = rows[rows["kind"] == "single layer"].astype({"layer": int})
    kinds = list(dict.fromkeys(layers["quant"]))
    colors = sns.color_palette(n_colors=len(kinds))
    fig, axes = plt.subplots(len(kinds), 1, sharex=True, squeeze=False,
                             figsize=(min(14, max(6, 0.4 * layers["layer"].nunique() + 2)), 1.2 + 2.1 * len(kinds)))
    label = {"kl": "KL to 16-bit (nats)", "top1": "top-1"}.get(value, value)
    ref = rows[rows["config"] == "16-bit"]
    for ax, q, color in zip(axes[:, 0], kinds, colors):
        d = layers[layers["quant"] == q].sort_values("layer")
        err = [d[value] - d[f"{value}_lo"], d[f"{value}_hi"] - d[value]]
        ax.bar(d["layer"], d[value], 0.7, color=color, label="keep one layer")
        ax.errorbar(d["layer"], d[value], yerr=err, fmt="none", ecolor="black", elinewidth=1, capsize=2)
        base = rows[(rows["quant"] == q) & (rows["config"] == "all quantized")]
        if not base.empty:
            ax.axhline(base[value].iloc[0], color=color, ls="--", lw=1, label="all quantized")
        if value != "kl" and not ref.empty:
            ax.axhline(ref[value].iloc[0], color="black", ls=":", lw=1, label="16-bit")
        if value == "top1":
            ax.set_ylim(max(0, d["top1_lo"].min() - 0.05), min(1, d["top1_hi"].max() + 0.02))
        ax.set_ylabel(f"{q}: {label}", fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    axes[-1, 0].set_xticks(sorted(layers["layer"].unique()))
    axes[-1, 0].set_xlabel("encoder layer kept in 16-bit (all others quantized)")
    axes[0, 0].set_title(f"per-layer sensitivity ({value}), bootstrap 95% intervals")
    fig.tight_layout()
    return fig


KIND_STYLE = {"16-bit": ("black", "s"), "all quantized": ("tab:red", "X"), "single layer": ("tab:blue", "o"),
              "group": ("tab:purple", "D"), "greedy": ("tab:green", "^")}


@_styled
def pareto(rows: pd.DataFrame, choices: dict[str, dict]) -> plt.Figure:
    """Top-1 and KL against memory footprint for every configuration the ablation tried (its rows), one
    row of panels per quantization type; the Pareto front as a step line, the size budget dashed, the
    choice starred. `choices[q]` is `ablation.choose`'s answer for quant type q."""
    quants = list(choices)
    fig, axes = plt.subplots(len(quants), 2, figsize=(11, 3.9 * len(quants)), squeeze=False)
    ref = rows[rows["config"] == "16-bit"].iloc[0]
    for (ax_acc, ax_kl), q in zip(axes, quants):
        d = pd.concat([rows[rows["quant"] == q], rows[rows["config"] == "16-bit"]])
        for ax, value in ((ax_acc, "top1"), (ax_kl, "kl")):
            for kind, (color, marker) in KIND_STYLE.items():
                k = d[d["kind"] == kind]
                if value == "kl":
                    k = k[k["kl"] > 0]  # the 16-bit model has KL 0: off a log axis
                if k.empty:
                    continue
                ax.errorbar(k["footprint_mb"], k[value], yerr=[k[value] - k[f"{value}_lo"], k[f"{value}_hi"] - k[value]],
                            fmt=marker, color=color, ms=7, elinewidth=0.8, capsize=2, alpha=0.85, label=kind)
            f = pd.DataFrame(ablation.pareto_front(d.to_dict("records"), value, higher_is_better=value == "top1"))
            f = f[f[value] > 0] if value == "kl" else f
            ax.step(f["footprint_mb"], f[value], where="post", color="grey", lw=1, zorder=0, label="Pareto front")
            pick = d[d["config"] == choices[q]["config"]].iloc[0]
            ax.scatter([pick["footprint_mb"]], [pick[value]], marker="*", s=380, facecolor="gold",
                       edgecolor="black", zorder=5, label=f"chosen ({pick['config']}: keep {pick['keep_16bit']})")
            if choices[q].get("budget_mb") is not None:
                ax.axvline(choices[q]["budget_mb"], color="tab:orange", ls="--", lw=1, label="size budget")
            ax.set(xlabel="memory footprint (MB)")
        for _, g in d[d["kind"] == "group"].iterrows():
            ax_kl.annotate(g["config"].removeprefix("keep "), (g["footprint_mb"], g["kl"]), textcoords="offset points",
                           xytext=(6, 4), fontsize=7, color="tab:purple")
        ax_acc.axhline(ref["top1"], color="black", ls=":", lw=1, label="16-bit top-1")
        ax_acc.set(ylabel=f"top-1 ({d['n'].iloc[0]} images)",
                   title=f"{q}: top-1 vs size (bootstrap 95%)")
        ax_kl.set(ylabel="KL to 16-bit (nats, log)", yscale="log", title=f"{q}: KL vs size (bootstrap 95%)")
        handles, labels = ax_kl.get_legend_handles_labels()
        more_handles, more_labels = ax_acc.get_legend_handles_labels()
        legend = dict(zip(labels + more_labels, handles + more_handles))  # one entry per label, both panels
        ax_kl.legend(legend.values(), legend.keys(), fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    return fig
