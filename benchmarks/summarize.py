"""Tables (markdown) and figures from the benchmark JSON in benchmarks/results/ into figures/.

    python benchmarks/summarize.py
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from vitlab import plots

RESULTS = Path(__file__).parent / "results"
FIGURES = Path(__file__).parents[1] / "figures"


# Results written before the benchmarks shared vitlab.evaluate named these columns differently.
OLD_NAMES = {"variant": "model", "rel_err_vs_first": "logits_rel_err", "rel_err_vs_bf16": "logits_rel_err"}


def load(name: str) -> dict:
    data = json.loads((RESULTS / name).read_text())
    for key in ("rows", "kernels", "accuracy"):
        if key in data:
            data[key] = [{OLD_NAMES.get(k, k): v for k, v in row.items()} for row in data[key]]
    return data


def provenance(meta: dict) -> str:
    v = meta["versions"]
    # The device gets a copy of the working tree without .git: the commit is the one these results were added in.
    commit = str(meta["git"]["commit"])[:8] if meta["git"]["commit"] else "see git log of benchmarks/results"
    return (f"{meta['device']['name']}, torch {v['torch']}, transformers {v['transformers']}, bitsandbytes "
            f"{v['bitsandbytes']}, torchao {v.get('torchao')}; commit: {commit}; weights: "
            f"{meta['weights']}; command: `python benchmarks/{'precision_attention' if 'archs' in meta['args'] else 'speed_paths'}.py "
            + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in meta["args"].items() if k not in ("out",)) + "`")


def matrix() -> str:
    data = load("matrix_h100.json")
    rows = pd.DataFrame(data["rows"])
    ok, bad = rows[rows["error"].isna()].astype({"batch_size": int}), rows[rows["error"].notna()]
    img_s = ok.pivot_table(index=["arch", "precision", "attention"], columns="batch_size", values="throughput_img_s")
    p50 = ok.pivot_table(index=["arch", "precision", "attention"], columns="batch_size", values="p50_ms")
    p95 = ok.pivot_table(index=["arch", "precision", "attention"], columns="batch_size", values="p95_ms")
    p99 = ok.pivot_table(index=["arch", "precision", "attention"], columns="batch_size", values="p99_ms")
    mean = ok.pivot_table(index=["arch", "precision", "attention"], columns="batch_size", values="mean_ms")
    sizes = ok.groupby(["arch", "precision"])[["disk_mb", "footprint_mb", "logits_rel_err"]].first()
    peak = ok.groupby(["arch", "precision"])["peak_mem_mb"].max()
    for arch in ok["arch"].unique():
        d = ok[(ok["arch"] == arch) & (ok["attention"] == "sdpa")].assign(model=lambda x: x["precision"] + " · sdpa")
        fig = plots.throughput_vs_batch(d)
        fig.axes[0].set_title(f"{arch}: throughput, H100 (SDPA)")
        plots.save(fig, FIGURES / f"h100_throughput_{arch}.png")
    prof = pd.DataFrame(load("profile_h100_vitl16_bs32.json")["rows"]).assign(model=lambda d: d["precision"])
    prof.attrs["clock"] = "device"
    fig = plots.component_breakdown(prof)
    fig.axes[0].set_title("ViT-L/16, batch 32, H100: device time per component")
    plots.save(fig, FIGURES / "h100_components_vit_l16.png")
    comp = prof.pivot_table(index="component", columns="precision", values="time_ms", sort=False)
    return "\n\n".join([
        "# ViT variant matrix on the H100", provenance(data["meta"]),
        "## Throughput (img/s at p50 latency)", img_s.round(0).to_markdown(),
        "## p50 latency (ms)", p50.round(2).to_markdown(),
        "## p95 latency (ms)", p95.round(2).to_markdown(),
        "## p99 latency (ms)", p99.round(2).to_markdown(),
        "## mean latency (ms)", mean.round(2).to_markdown(),
        "## Size, memory, output drift", sizes.join(peak.rename("peak_mem_mb (max over batch sizes)")).round(3).to_markdown(),
        "## Device time per component, ViT-L/16 SDPA, batch 32 (ms per forward)",
        provenance(load("profile_h100_vitl16_bs32.json")["meta"]), comp.round(3).to_markdown(),
        "## Kernels that could not run (the errors vitlab gives)",
        bad[["arch", "precision", "attention", "error"]].drop_duplicates(["precision", "attention"]).to_markdown(index=False),
    ])


def speed_paths() -> str:
    parts = ["# ViT-L/16: quantized and fast, against stock bf16 SDPA (same process, same GPU)"]
    for name in ("fast_h100_a.json", "fast_h100_b.json", "fast_h100_d.json"):
        data = load(name)
        rows = pd.DataFrame(data["rows"])
        ok = rows[rows["p50_ms"].notna()].astype({"batch_size": int})
        stock = ok[ok["model"] == "stock"].set_index("batch_size")["p50_ms"]
        ok = ok.assign(speedup=lambda d: d["batch_size"].map(stock) / d["p50_ms"])
        table = ok.pivot_table(index="model", columns="batch_size", values=["p50_ms", "speedup"], sort=False)
        sizes = ok.groupby("model", sort=False)[["disk_mb", "logits_rel_err"]].first()
        parts += [f"## {name}", provenance(data["meta"]), table.round(3).to_markdown(), sizes.round(3).to_markdown()]
        if "error" in rows and rows["error"].notna().any():
            errors = rows[rows["error"].notna()].assign(error=lambda d: d["error"].str.split("\n").str[0])
            parts += ["Paths that failed (first line of the error):", errors[["model", "error"]].to_markdown(index=False)]
        if data["accuracy"]:
            parts += ["Accuracy of each path on the offline digits model (test split, 270 images, GPU):",
                      pd.DataFrame(data["accuracy"]).round(4).to_markdown(index=False)]
        kernels = pd.DataFrame(data["kernels"])
        if not kernels.empty:
            top = kernels.groupby("model", sort=False).head(5)
            parts += [f"Top kernels per forward at batch {int(kernels['batch_size'].iloc[0])}:",
                      top[["model", "kernel", "ms_per_forward", "calls_per_forward"]].round(3).to_markdown(index=False)]
        if name == "fast_h100_d.json":
            fig = plots.throughput_vs_batch(ok)
            fig.axes[0].set_title("ViT-L/16 speed paths, H100")
            plots.save(fig, FIGURES / "h100_speed_paths.png")
    return "\n\n".join(parts)


def main() -> None:
    FIGURES.mkdir(exist_ok=True)
    (FIGURES / "h100_matrix.md").write_text(matrix() + "\n")
    (FIGURES / "h100_speed_paths.md").write_text(speed_paths() + "\n")
    print("wrote", sorted(p.name for p in FIGURES.glob("h100_*")))


if __name__ == "__main__":
    main()
