"""Figures shared by the notebooks. Each function takes tidy rows and returns a matplotlib Figure."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

sns.set_theme(style="whitegrid", context="notebook")


def save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def training_curves(history: list[dict]) -> plt.Figure:
    h = pd.DataFrame(history)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(h["epoch"], h["train_loss"], "o-", label="train")
    ax_loss.plot(h["epoch"], h["val_loss"], "o-", label="valid")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.plot(h["epoch"], h["train_acc"], "o-", label="train (augmented)")
    ax_acc.plot(h["epoch"], h["val_acc"], "o-", label="valid")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.legend()
    fig.tight_layout()
    return fig


def accuracy_vs_latency(rows: pd.DataFrame, batch_size: int) -> plt.Figure:
    """top-1 against p50 latency at one batch size; one point per model."""
    d = rows[rows["batch_size"] == batch_size]
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.scatterplot(data=d, x="p50_ms", y="top1", hue="model", style="model", s=120, ax=ax)
    for _, r in d.iterrows():
        ax.annotate(r["model"], (r["p50_ms"], r["top1"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set(xlabel=f"p50 latency at batch {batch_size} (ms)", ylabel="top-1 (test)",
           title=f"accuracy vs latency, batch {batch_size}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def size_vs_memory(rows: pd.DataFrame) -> plt.Figure:
    """Disk size and in-memory footprint (and peak GPU memory where measured), per model."""
    cols = [c for c in ("disk_mb", "footprint_mb", "peak_mem_mb") if c in rows and rows[c].notna().any()]
    long = rows.melt(id_vars="model", value_vars=cols, var_name="measure", value_name="MB")
    fig, ax = plt.subplots(figsize=(7, 3.8))
    sns.barplot(data=long, x="model", y="MB", hue="measure", ax=ax)
    ax.set(title="size on disk and in memory", xlabel="")
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    return fig


def throughput_vs_batch(rows: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(data=rows, x="batch_size", y="throughput_img_s", hue="model", marker="o", ax=ax)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="images / s (at p50)", title="throughput")
    fig.tight_layout()
    return fig


def component_breakdown(rows: pd.DataFrame) -> plt.Figure:
    """Stacked forward time per component, one bar per model."""
    d = rows[~rows["component"].str.startswith(("bnb", "dequant"))]
    wide = d.pivot_table(index="model", columns="component", values="time_ms", aggfunc="sum")
    fig, ax = plt.subplots(figsize=(7, 3.8))
    wide.plot.barh(stacked=True, ax=ax, colormap="tab10")
    clock = rows.attrs.get("clock", "")
    ax.set(xlabel=f"ms per forward ({clock} time)".replace(" ()", ""), ylabel="", title="where the forward pass goes")
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    return fig


def sensitivity(rows: pd.DataFrame, value: str = "kl") -> plt.Figure:
    """Per-layer sensitivity: the metric when all but one layer is quantized, per quantization type."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    sns.barplot(data=rows, x="layer", y=value, hue="quant", ax=ax)
    ax.set(xlabel="encoder layer kept in 16-bit (all others quantized)", ylabel=value,
           title=f"per-layer sensitivity ({value})")
    fig.tight_layout()
    return fig
