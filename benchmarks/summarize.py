"""Tables and figures from the benchmark JSON in benchmarks/results/: docs/results.md, the README's
headline table (between its `results:begin` / `results:end` markers) and figures/. Numbers are only
ever typed by the benchmarks; this file formats them.

    python benchmarks/summarize.py
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from common import by_table
from flowers_transfer import METHODS
from vitl16_flowers import VARIANTS

from vitlab import fmt, plots

RESULTS = Path(__file__).parent / "results"
FIGURES = Path(__file__).parents[1] / "figures"
DOCS = Path(__file__).parents[1] / "docs"
README = Path(__file__).parents[1] / "README.md"


# Results written before the benchmarks shared vitlab.evaluate named these columns differently.
OLD_NAMES = {"variant": "model", "rel_err_vs_first": "logits_rel_err", "rel_err_vs_bf16": "logits_rel_err"}


def load(name: str) -> dict:
    """A result's tables by name (common.by_table), with the columns' current names."""
    data = by_table(json.loads((RESULTS / name).read_text()))
    for key in ("rows", "kernels", "accuracy"):
        if key in data:
            data[key] = [{OLD_NAMES.get(k, k): v for k, v in row.items()} for row in data[key]]
    data.setdefault("accuracy", [])
    data.setdefault("kernels", [])
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
    data = load("precision_attention_h100.json")
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
    prof = pd.DataFrame(load("precision_attention_h100_profile.json")["rows"]).assign(model=lambda d: d["precision"])
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
        provenance(load("precision_attention_h100_profile.json")["meta"]), comp.round(3).to_markdown(),
        "## Kernels that could not run (the errors vitlab gives)",
        bad[["arch", "precision", "attention", "error"]].drop_duplicates(["precision", "attention"]).to_markdown(index=False),
    ])


def speed_paths() -> str:
    parts = ["# ViT-L/16: quantized and fast, against stock bf16 SDPA (same process, same GPU)"]
    for name in ("speed_paths_h100_a.json", "speed_paths_h100_b.json", "speed_paths_h100_d.json"):
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
        if name == "speed_paths_h100_d.json":
            fig = plots.throughput_vs_batch(ok)
            fig.axes[0].set_title("ViT-L/16 speed paths, H100")
            plots.save(fig, FIGURES / "h100_speed_paths.png")
    return "\n\n".join(parts)


def _device(meta_or_device: dict) -> str:
    device = meta_or_device.get("device", meta_or_device)
    return device["name"] if device.get("type") == "cuda" else f"CPU ({device.get('count')} cores)"


def _table(rows: list[dict], columns: dict[str, str]) -> str:
    """A markdown table of `rows` with `columns` (header -> key of the already formatted row)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(r[k]) for k in columns.values()) + " |" for r in rows]
    return "\n".join(lines)


def peers_headline(name: str = "peers_h200.json") -> str:
    """ViT-L/16 inference: p50 at batch 256 / 32 / 1 and the ratio to stock timed in the same process."""
    data = load(name)
    rows = pd.DataFrame(data["rows"])
    keep = ["stock", "timm_compile", "timm_compile_fp8", "vitlab_bf16_fast", "vitlab_fp8_triton", "vitlab_w4a8_triton"]
    rows = rows[rows["path"].isin(keep)]
    out = []
    for path in keep:
        mine = rows[rows["path"] == path]
        if "process" in mine:  # collected from several processes: process 1 ran the current kernel
            mine = mine[mine["process"] == mine["process"].min()]
        mine = mine.set_index("batch_size")
        if mine.empty:
            continue
        cell = lambda b: (f"{fmt.ms(mine.loc[b, 'p50_ms'])} ({fmt.ratio(mine.loc[b, 'ratio_vs_stock'])})"
                          if b in mine.index and not pd.isna(mine.loc[b, "p50_ms"]) else "–")
        out.append({"path": f"`{path}`", "bits": int(mine["weight_bits"].iloc[0]), "b256": cell(256), "b32": cell(32),
                    "b1": cell(1)})
    return (f"ViT-L/16, 224 px, random init, p50 of CUDA-event timings; ratio to stock transformers bf16 timed in the "
            f"same process ({_device(data['meta'])}, `benchmarks/results/{name}`):\n\n"
            + _table(out, {"path": "path", "weight bits": "bits", "batch 256 (x stock)": "b256",
                           "batch 32 (x stock)": "b32", "batch 1 (x stock)": "b1"}))


def flowers_headline() -> str:
    scratch_file = load("flowers_scratch_h100.json")
    scratch = scratch_file["model"][0]
    variants = by_table(json.loads((RESULTS / "flowers_variants_h100.json").read_text()))  # its own names, not OLD_NAMES
    rows = pd.DataFrame(variants["rows"])
    first = rows.groupby(["variant", "model"], sort=False).first().reset_index()
    out = [{"variant": f"`{r.variant}`", "model": r.model, "top1": fmt.pct(r.top1, r.top1_lo, r.top1_hi),
            "f1": f"{r.f1_macro:.3f}", "disk": fmt.mb(r.disk_mb)} for r in first.itertuples()]
    return (f"A ViT-S/16 ({scratch['parameters'] / 1e6:.1f} M parameters) trained from scratch on Flowers-102's "
            f"6,552 training photographs by `params/flowers_scratch.yaml`: **{fmt.pct(scratch['test_top1'], scratch['test_top1_lo'], scratch['test_top1_hi'])}** "
            f"test top-1 on {scratch['test_images']} images ({_device(scratch_file['meta'])}, `benchmarks/results/flowers_scratch_h100.json`). "
            "The seeds' variants of an earlier, 75% model of the same recipe, each by `vitlab run` "
            f"(`benchmarks/results/flowers_variants_h100.json`, {_device(variants['meta'])}):\n\n"
            + _table(out, {"variant": "variant", "model": "model", "test top-1 [95% CI]": "top1", "macro F1": "f1",
                           "disk": "disk"}))


def transfer_table() -> str:
    data = load("flowers_transfer_h100.json")
    out = [{"method": r["method"], "top1": fmt.pct(r["test_top1"], r["lo"], r["hi"]),
            "trainable": f"{r['trainable_params']:,}", "vram": fmt.mb(r["peak_vram_mb"]),
            "s": f"{r['s_per_epoch']:.1f}"} for r in data["rows"]]
    return (f"Pretrained from scratch on `half_a` of the classes, fine-tuned on `half_b` "
            f"(`benchmarks/results/flowers_transfer_h100.json`, {_device(data['meta'])}):\n\n"
            + _table(out, {"method": "method", "test top-1 [95% CI]": "top1", "trainable parameters": "trainable",
                           "peak VRAM": "vram", "s/epoch": "s"}))


def train_speed_table() -> str:
    data = load("train_speed_h200.json")
    out = [{"model": r["model"], "method": r["method"], "size": f"{r['image_size']} px", "batch": r["batch_size"],
            "img_s": fmt.rate(r["img_s"]), "tflops": f"{r['tflops_6nt']:.0f} ({r['pct_bf16_dense_peak']:.0f}% of dense bf16)",
            "vram": fmt.mb(r["peak_vram_mb"])} for r in data["rows"]]
    return (f"Training speed on {_device(data['meta'])} (`benchmarks/results/train_speed_h200.json`; TFLOP/s as "
            f"6 x parameters x tokens):\n\n"
            + _table(out, {"model": "model", "method": "method", "image size": "size", "batch": "batch",
                           "training": "img_s", "TFLOP/s": "tflops", "peak VRAM": "vram"}))


def train_step_table(names: tuple[str, ...] = ("train_step_h200.json", "train_step_h200_blocks.json"),
                     today: str = "vitl16_cost_h100.json") -> str:
    """benchmarks/train_step.py's commands, one table each: each (method, path, settings)'s img/s against
    the H100's LoRA and QLoRA of the issue (vitl16_cost's, the 'today' of #25), and where a step's device
    time goes, against the step's measured time."""
    before = {r["method"]: r for r in load(today)["training"]}
    case = lambda r: f"`{r['path']}`" + (f" ({r['set']})" if r.get("set") else "")  # noqa: E731
    out = [f"One training step of a random-init ViT-L/16 at 224 px by vitlab's own loop (`training.train`, as `vitlab run` "
           "trains) on batches already on the GPU; img/s of the second epoch (the first compiles and captures). "
           f"`x today`: against the same method on the H100 in `benchmarks/results/{today}` (LoRA "
           f"{before['lora']['train_img_per_s']:.0f} img/s, QLoRA {before['qlora']['train_img_per_s']:.0f}), the issue's "
           "baseline; TFLOP/s counts the matmuls, x3 the forward for full fine-tuning, x2 for (Q)LoRA's frozen base. "
           "Each table is one process; LoRA is vitlab's default (r=16, alpha=16, dropout 0.1, every block linear) "
           "unless its row says otherwise."]
    for name in names:
        data = load(name)
        a, ms_per_step = data["meta"]["args"], {}
        rows = []
        for r in data["rows"]:
            if "img_s" in r:
                ms_per_step[f"{r['method']} {case(r)}"] = 1e3 * r["batch_size"] / r["img_s"]
            rows.append({"method": r["method"], "path": case(r),
                         "img_s": fmt.rate(r["img_s"]) if "img_s" in r else
                         f"refused ({r['refused'].split(':')[0]})" if "refused" in r else f"failed ({r['error']})",
                         "x": f"{r['img_s'] / before[r['method']]['train_img_per_s']:.2f}x"
                              if "img_s" in r and r["method"] in before else "-",
                         "tflops": f"{r['model_tflops']:.0f} ({r['pct_bf16_dense_peak']:.0f}%)" if "img_s" in r else "-",
                         "vram": fmt.mb(r.get("peak_vram_mb"))})
        groups = sorted({k["group"] for k in data["kernels"]})
        steps: dict[str, dict] = {}
        for k in data["kernels"]:
            steps.setdefault(f"{k['method']} {case(k)}", {})[k["group"]] = k["ms_per_step"]
        steps_rows = [{"case": c, **{g: f"{v:.1f}" for g, v in ms.items()}, "sum": f"{sum(ms.values()):.1f}",
                       "step": f"{ms_per_step[c]:.1f}" if c in ms_per_step else "-"} for c, ms in steps.items()]
        note = data["meta"].get("kernels_note")
        out += [f"`{data['meta']['command'].split(' --out')[0]}` (batch {a['batch']}, {a['steps']} steps per epoch; "
                f"{_device(data['meta'])}, `benchmarks/results/{name}`):",
                _table(rows, {"method": "method", "path": "path", "training": "img_s", "x today": "x",
                              "TFLOP/s (% dense bf16)": "tflops", "peak VRAM": "vram"}),
                "Where a step's device time goes (ms per step, the profiled third epoch; `other` is elementwise work, "
                "casts and copies; `step` is the second epoch's measured time per step)"
                + (f". Caution, {note}:" if note else ":"),
                _table(steps_rows, {"case": "case", **{g: g for g in groups}, "sum": "sum", "step": "step"})]
    return "\n\n".join(out)


def _ablation_frame(rows: list[dict]) -> pd.DataFrame:
    """The result's ablation rows in the shape plots.sensitivity takes (quant, layer, config, kind, kl, ...)."""
    frame = pd.DataFrame(rows).rename(columns={"quant_type": "quant"})
    frame["layer"] = [k[0] if kind == "single layer" else None for k, kind in zip(frame["kept"], frame["kind"])]
    return frame


def _variant_table(variants: list[dict], trained: dict[str, str] | None = None) -> str:
    """One row per variant; with `trained` (run -> label), the training each variant's checkpoint came from."""
    rows = [{"variant": f"`{r['variant']}`", "trained": (trained or {}).get(r.get("trained_run"), ""),
             "top1": fmt.pct(r["top1"], r["top1_lo"], r["top1_hi"]),
             "delta": "(the 16-bit model itself)" if r["model"].startswith("16-bit") else
                      f"{r['top1_delta_pt']:+.2f} pt [{r['delta_lo_pt']:+.2f}, {r['delta_hi_pt']:+.2f}]",
             **{f"b{b}": fmt.ms(r[f"p50_ms_bs{b}"]) for b in (1, 32, 256)}, "disk": fmt.mb(r["disk_mb"]),
             "peak": fmt.mb(r["peak_mb"])} for r in variants]
    columns = {"variant": "variant", **({"from the training": "trained"} if trained else {}),
               "test top-1 [95% CI]": "top1", "vs its 16-bit [95% CI]": "delta", "p50 batch 1": "b1",
               "p50 batch 32": "b32", "p50 batch 256": "b256", "disk": "disk", "peak memory": "peak"}
    return _table(rows, columns)


def _trainings(data: dict, first: dict) -> dict[str, str]:
    """Each training of the recipe in the result (run -> "#2"), numbered after the first one's own file."""
    done = sorted(data["model"], key=lambda m: m["run"])
    return {m["run"]: f"#{i}" for i, m in enumerate(done, start=1 + len(first["model"]))}


def _vitl16_transfer(rows: list[dict], meta: dict) -> list[str]:
    """The transfer at ViT-L scale (benchmarks/flowers_transfer.py --scale vitl16), when it ran: how half_a's
    models were made, each method on half_b, what did not run and why."""
    if not rows:
        return []
    rows = sorted(rows, key=lambda r: list(METHODS).index(r["method"]))
    # Rows kept from an earlier collect may start from another pretraining: then each row says which.
    pretrainings = {r.get("pretrain_run") for r in rows}
    made = "; ".join(f"`{p['variant']}` ({p['total_params'] / 1e6:.1f} M parameters) {p['epochs']} epochs in "
                     f"{p['finetune_s']:.0f} s, valid {p['valid_top1']:.1%} on its {p['classes']} classes (epoch "
                     f"{p['selected_epoch']}" + (f", run {p['run']})" if len(pretrainings) > 1 else ")")
                     for p in meta.get("pretrain", []) + meta.get("earlier", {}).get("pretrain", []))
    out = [{"method": r["method"], "top1": fmt.pct(r["top1"], r["top1_lo"], r["top1_hi"]), "from": r.get("pretrain_run") or "",
            "trainable": f"{r['trainable_params']:,}", "vram": fmt.mb(r["peak_vram_mb"]), "s": f"{r['s_per_epoch']:.1f}",
            "epochs": r["epochs"], "img_s": fmt.rate(r.get("train_img_s")),
            "vs": fmt.pt(r["top1_vs_pt"] / 100, r["top1_vs_lo_pt"] / 100, r["top1_vs_hi_pt"] / 100) if "vs" in r else ""}
           for r in rows]
    missing = meta.get("not_run") or []
    by = {r["method"]: r for r in rows}
    lora_name, qlora_name = list(METHODS)[2], list(METHODS)[3]
    memory = []
    if {lora_name, qlora_name} <= set(by):
        lora, qlora = by[lora_name], by[qlora_name]
        saved = lora["peak_vram_mb"] - qlora["peak_vram_mb"]
        memory = [f"(Q)LoRA's memory case: QLoRA's peak is {fmt.mb(qlora['peak_vram_mb'])} against LoRA's "
                  f"{fmt.mb(lora['peak_vram_mb'])}, at {qlora['s_per_epoch'] / lora['s_per_epoch']:.2f}x LoRA's time per "
                  f"epoch; the 16-bit base's weights are {lora['total_params'] * 2 / 1e9:.1f} GB. "
                  + (f"The NF4 base saves {saved:,.0f} MB." if saved > 0 else
                     f"At this batch the NF4 base does not save memory: the peak is {-saved:,.0f} MB higher.")]
        if (full := by.get("full")) and full.get("train_img_s") and lora.get("train_img_s"):
            memory.append(f"Full fine-tuning (every weight and its AdamW state) peaks at {fmt.mb(full['peak_vram_mb'])}, "
                          f"{'below' if full['peak_vram_mb'] < lora['peak_vram_mb'] else 'above'} eager LoRA's, and trains "
                          f"at {fmt.rate(full['train_img_s'])} against eager LoRA's {fmt.rate(lora['train_img_s'])} "
                          f"({lora['train_img_s'] / full['train_img_s']:.2f}x): at batch 64 a ViT-L's activations, not its "
                          "weights or optimizer states, set the peak.")
    return [f"### The transfer at ViT-L scale\n\nA ViT-L/16 made as above from `half_a`'s classes only ({made}), then each "
            f"method on the {rows[0]['classes']} classes of `half_b` it has never seen, a fresh head, {rows[0]['epochs']} "
            f"epochs, bf16 at batch 64, eager unless the method says otherwise ({rows[0]['test_images']} test images; "
            "`python benchmarks/run.py flowers_transfer pretrain --scale vitl16`, then `methods --scale vitl16`; a fast "
            "path's top-1 is paired against the eager run of the same recipe on the same images):",
            _table(out, {"method": "method", "test top-1 [95% CI]": "top1", "trainable parameters": "trainable",
                         "peak VRAM": "vram", "s/epoch": "s", "training (epochs 2+)": "img_s", "epochs": "epochs",
                         **({"vs the eager run of its recipe (paired) [95% CI]": "vs"} if any(o["vs"] for o in out) else {}),
                         **({"half_a model (run)": "from"} if len(pretrainings) > 1 else {})}),
            *memory, *([f"Not run: {', '.join(missing)}: {meta['why_not_run']}."] if missing else [])]


def _vitl16_steps(o: dict, start: dict, grown_from: dict, models: list[dict], trainings: dict, number: dict) -> list[dict]:
    """What each ingredient bought: from scratch (`o`), the ViT-S grown from, the grown models untrained
    (`start`), then each training of the recipe."""
    steps = [{"what": f"from scratch, {o['epochs']} epochs (params/flowers_vitl16.yaml before growing)", "layers": 24,
              "valid": f"{o['valid_top1']:.1%}", "test": fmt.pct(o["test_top1"], o["test_top1_lo"], o["test_top1_hi"]),
              "s": f"{o['train_seconds']:.0f} s"},
             {"what": "the ViT-S/16 recipe model it grows from (params/flowers_scratch.yaml)", "layers": 12,
              "valid": f"{start['small']['valid_top1']:.1%}", "test": f"{start['small']['test_top1']:.1%}",
              "s": f"{grown_from['finetune_s']:.0f} s"},
             {"what": "grown to ViT-L, depth by identities (exact), no training", "layers": 24,
              "valid": f"{start['grown_identity']['valid_top1']:.1%}", "test": f"{start['grown_identity']['test_top1']:.1%}",
              "s": "-"},
             {"what": "grown to ViT-L, depth by halved copies (every layer works), no training", "layers": 24,
              "valid": f"{start['grown_copies']['valid_top1']:.1%}", "test": f"{start['grown_copies']['test_top1']:.1%}",
              "s": "-"}]
    for m in models:
        teacher = trainings[m["run"]]["teacher"]
        own = "" if teacher["run"] == grown_from["run"] else (
            f", from a ViT-S trained again the same way (valid {teacher['valid_top1']:.1%}, {teacher['finetune_s']:.0f} s; "
            "its test top-1 not measured)")
        steps.append({"what": f"halved copies, then {m['epochs']} epochs distilled from the ViT-S (selected: epoch "
                              f"{m['selected_epoch']}): training {number[m['run']]}{own}", "layers": 24,
                      "valid": f"{m['valid_top1']:.1%}", "test": f"**{fmt.pct(m['test_top1'], m['test_top1_lo'], m['test_top1_hi'])}**",
                      "s": f"{m['train_seconds']:.0f} s"})
    return steps


def vitl16_section(name: str = "vitl16_flowers_h200.json", scratch: str = "vitl16_flowers_h200_scratch.json",
                   first: str = "vitl16_flowers_h200_first.json") -> str:
    """The ViT-L/16 on Flowers-102: what each ingredient bought (from scratch, the ViT-S it grows from, the
    grown model before and after training, each training of the recipe), its variants against their 16-bit
    selves and its per-layer sweep at 24 layers; then the first training of the same recipe and the
    from-scratch model, as history. figures/vitl16_flowers_*.png."""
    data, old, earlier = load(name), load(scratch), load(first)
    o, start, trainings = old["model"][0], {r["model"]: r for r in data["start"]}, data["meta"]["trainings"]
    number = _trainings(data, earlier)
    models = sorted(data["model"], key=lambda m: m["run"])
    latest = models[-1]
    plots.save(plots.training_curves([r for r in data["history"] if r["trained_run"] == latest["run"]]),
               FIGURES / "vitl16_flowers_training.png")
    plots.save(plots.training_curves(old["history"]), FIGURES / "vitl16_flowers_scratch_training.png")
    grown_from = trainings[data["start"][0]["trained_run"]]["teacher"]  # the ViT-S that `start` scored
    steps = _vitl16_steps(o, start, grown_from, models, trainings, number)
    missing = [f"`{v}`" for v in VARIANTS if v not in {r["variant"] for r in data["variant"]}]
    why = " ".join(f"Training {number[run]}: {t['not_run']}." for run, t in trainings.items() if t.get("not_run"))
    out = [f"A ViT-L/16 ({latest['parameters'] / 1e6:.1f} M parameters, {latest['num_hidden_layers']} layers of "
           f"{latest['hidden_size']}) by `params/flowers_vitl16.yaml` on {_device(data['meta'])}: vitlab's own ViT-S/16 "
           "recipe model, trained on the same split, grown to ViT-L's width and depth (`vitlab.grow`: the width "
           "embedding commutes with LayerNorm, so the function is kept; depth by each layer twice with its residual "
           "branches halved, so all 24 layers work) and trained on, distilled from the ViT-S (DeiT's hard "
           f"distillation). What each ingredient bought (valid: 818 images, test: 819; training #1 is in "
           f"`benchmarks/results/{first}`, below):",
           _table(steps, {"model": "what", "layers": "layers", "valid top-1": "valid", "test top-1 [95% CI]": "test",
                          "training": "s"}),
           "Every training of the recipe reaches the 85% target: "
           + ", ".join(f"#{i} {fmt.pct(m['test_top1'], m['test_top1_lo'], m['test_top1_hi'])}"
                       for i, m in enumerate([*earlier["model"], *models], start=1))
           + f" on the same test images, against the first two's teacher's {start['small']['test_top1']:.1%}: the "
           "trainings differ by less than their intervals, and none is clearly past its teacher. Training ran at "
           f"{fmt.rate(latest['train_img_s_160px'])} at 160 px ({latest['tflops_6nt_160px']:.0f} TFLOP/s, "
           f"{latest['pct_bf16_dense_peak_160px']:.0f}% of dense bf16) and {fmt.rate(latest['train_img_s_224px'])} at "
           f"224 px, the teacher's forward included (`benchmarks/results/{name}`; the latest training's curves in "
           "figures/vitl16_flowers_training.png, the from-scratch run's in figures/vitl16_flowers_scratch_training.png). "
           "Not isolated: distillation against none in the fine-tune, identities against copies after it.",
           "Each variant by `vitlab run` from the checkpoint of the training named; the difference is paired against "
           "the same run's 16-bit model on the same test images (a device session cannot reach an earlier session's "
           f"weights, so the variants of one table come from {len({r['trained_run'] for r in data['variant']})} trainings):",
           _variant_table(sorted(data["variant"], key=lambda r: r["trained_run"]),
                          {m["run"]: f"{number[m['run']]} ({m['test_top1']:.1%})" for m in models}),
           (f"Not run on any training yet: {', '.join(missing)}. " if missing else
            "Every variant ran end to end on one of the trainings; what each training did not run: ") + why,
           *([f"The widget (notebooks/05_demo.py) in JupyterLab with training {number[demo['trained_run']]}'s NF4 model "
              f"(`{demo['run']}`: its `quantize` folder brought from the GPU machine, the 16-bit checkpoint left there) "
              f"on {demo['device']}, the photograph {demo['photo']} uploaded through its button: {demo['shown']} "
              f"(bitsandbytes' NF4 on a CPU takes seconds).\n\n![The demo widget in JupyterLab](../{demo['figure']})"]
             if (demo := data["meta"].get("demo")) else []),
           _ablation_paragraphs(data, f"training {number[data['ablation'][0]['trained_run']]}"),
           *_vitl16_transfer(data.get("transfer", []), data["meta"].get("transfer", {})),
           f"### Training #1 of the same recipe ({fmt.pct(earlier['model'][0]['test_top1'], earlier['model'][0]['test_top1_lo'], earlier['model'][0]['test_top1_hi'])})",
           f"The same recipe and teacher, trained in an earlier session (`benchmarks/results/{first}`); its weights did "
           "not outlive that session's machine, so its variants stand beside, not inside, the table above:",
           _variant_table(earlier["variant"]),
           f"### The ViT-L/16 trained from scratch ({fmt.pct(o['test_top1'], o['test_top1_lo'], o['test_top1_hi'])})",
           f"Its variants (`benchmarks/results/{scratch}`):", _variant_table(old["variant"]),
           _ablation_paragraphs(old, "that model", figure="vitl16_flowers_scratch_sensitivity_kl.png"),
           f"Not run in that session: {old['meta'].get('not_run', 'nothing')}."]
    return "\n\n".join(out)


def _ablation_paragraphs(data: dict, which: str, figure: str = "vitl16_flowers_sensitivity_kl.png") -> str:
    """A ViT-L result's per-layer sweep: the share of the all-quantized KL each kept set removes (valid), its
    test top-1, and whether the choice's paired comparisons with the seeds' heuristics on test are ties."""
    n_layers = data["model"][0]["num_hidden_layers"]
    ab = _ablation_frame(data["ablation"])
    valid = ab[ab["split"] == "valid"]
    plots.save(plots.sensitivity(valid, "kl"), FIGURES / figure)
    test = ab[ab["kind"] == "check"].drop_duplicates(["quant", "config"])
    lines, deep = [], []
    for q in valid.loc[valid["quant"] != "16-bit", "quant"].unique():
        mine = valid[valid["quant"] == q].set_index("config")
        base = mine.loc["all quantized", "kl"]
        singles = mine[mine["kind"] == "single layer"].sort_values("kl")
        most = ", ".join(str(int(layer)) for layer in singles["layer"].iloc[:3])
        deep.append(f"{q} {'yes' if any(layer >= n_layers - 4 for layer in singles['layer'].iloc[:3]) else 'no'}")
        for config in ("all quantized", "keep first+last", f"keep layers {n_layers - 4}-{n_layers - 1}",
                       "keep last quarter", "keep attention", "keep mlp"):
            if config in mine.index:
                t = test[(test["quant"] == q) & (test["config"] == config)]
                lines.append({"q": q, "config": config, "most": most if config == "all quantized" else "",
                              "share": f"{round(100 * (base - mine.loc[config, 'kl']) / base)}%" if base else "-",
                              "size": fmt.mb(mine.loc[config, "footprint_mb"]),
                              "test": fmt.pct(t["top1"].iloc[0], t["top1_lo"].iloc[0], t["top1_hi"].iloc[0]) if len(t) else "–"})
    checks = ab[(ab["kind"] == "check") & ~ab["chosen"].astype(bool)]
    ties = all(lo <= 0 <= hi for lo, hi in zip(checks["d_top1_lo"], checks["d_top1_hi"]))
    return "\n\n".join([
        f"The per-layer sweep of {which} on valid ({n_layers} layers; figures/{figure}): the share of the all-quantized "
        "model's KL to 16-bit that keeping layers in 16-bit removes, the three layers whose keeping alone removes "
        "most, and test top-1 of those configurations:",
        _table(lines, {"format": "q", "kept in 16-bit": "config", "most sensitive layers (valid KL)": "most",
                       "KL removed (valid)": "share", "size": "size", "test top-1 [95% CI]": "test"}),
        ("Every test-set comparison of the ablation's choice with the seeds' heuristics (first+last, the last "
         "quarter, the last four layers, layer 21) is a tie: each paired top-1 interval holds 0. " if ties else
         "Some test-set comparisons of the ablation's choice with the seeds' heuristics differ: see the JSON's "
         "check rows. ") + f"The seeds' \"deep layers {n_layers - 4}-{n_layers - 1} are the most sensitive\": one of "
        f"them among the three most sensitive by valid KL: {', '.join(deep)}."])


def qat_section(name: str = "qat_h200.json") -> str:
    """QAT against post-training quantization of the same model, in the same format, on the same test images."""
    data = load(name)
    ptq_loses = {r["format"] for r in data["rows"] if r["method"] == "ptq" and r["delta_hi_pt"] < 0}
    out = [{"format": r["format"], "method": r["method"], "top1": fmt.pct(r["top1"]),
            "delta": fmt.pt(*(r[k] / 100 for k in ("top1_delta_pt", "delta_lo_pt", "delta_hi_pt")))
            if r["method"] != "16-bit" else "-",
            "vs_ptq": fmt.pt(*(r[k] / 100 for k in ("vs_ptq_pt", "vs_ptq_lo_pt", "vs_ptq_hi_pt"))) if "vs_ptq_pt" in r else "-",
            "recovered": (f"{r['recovered']:.0%}" if r["format"] in ptq_loses else "PTQ ties 16-bit")
            if r.get("recovered") is not None else "-",
            "train": f"{r['train_s']:.0f} s" if r["train_s"] else "-", "ms": fmt.ms(r["p50_ms_bs256"])} for r in data["rows"]]
    epochs = next((a.split("=")[1] for a in data["meta"]["args"].get("set", []) if a.startswith("finetune.epochs=")),
                  "params/flowers_qat.yaml's")
    return (f"The ViT-S/16 recipe model, its block linears in vitlab's formats: post-training (`ptq`) or after "
            f"{epochs} QAT epochs from it (`finetune.method: qat`, "
            f"`params/flowers_qat.yaml`); paired bootstrap intervals on the same {data['rows'][0]['n']} test images "
            f"(`benchmarks/results/{name}`, {_device(data['meta'])}). The latency is the same kernels' (CUDA graph, not "
            "compiled; W3A8/W2A8 expand their codes to FP8 per forward, which uncompiled is slower than 16-bit):\n\n"
            + _table(out, {"format": "format", "method": "method", "test top-1": "top1", "vs 16-bit": "delta",
                           "QAT minus PTQ": "vs_ptq", "PTQ loss recovered": "recovered", "training": "train",
                           "p50 batch 256": "ms"}))


def _mixed_checks(rows: list[dict]) -> list[dict]:
    """The configurations checked on test. Those measured before the heuristics were put on the fastest
    quantized format are left out: on 16-bit, the fastest there, they kept all of it."""
    return [r for r in rows if "table" not in r and not (r["choice"].startswith("heuristic") and set(r["formats"]) == {"16bit"})]


def mixed_section(compiled: str = "mixed_formats_h200_compiled_partial.json",
                  graph: str = "mixed_formats_h200_graph.json") -> str:
    """The uniform formats on the compiled fp8 path (the study cut short) and the whole study on the graphed one."""
    part = pd.DataFrame(load(compiled)["rows"])
    uni = part[part["choice"].str.startswith("uniform_")].pivot(index="choice", columns="batch_size", values="p50_ms")
    ref = uni.loc["uniform_16bit"]
    top1 = part.groupby("choice")["top1"].first()
    out = [{"choice": c, "top1": fmt.pct(top1[c]), **{f"b{b}": f"{fmt.ms(uni.loc[c, b])} ({ref[b] / uni.loc[c, b]:.2f}x)"
                                                     for b in uni.columns}} for c in uni.index]
    g = load(graph)
    checks = [r for r in _mixed_checks(g["rows"]) if r["batch_size"] == 256]
    gout = [{"choice": r["choice"], "formats": fmt.formats(r["formats"]),
             "ms": fmt.ms(r["p50_ms"]), "top1": fmt.pct(r["top1"], r["top1_lo"], r["top1_hi"]),
             "delta": fmt.pt(*(r[k] / 100 for k in ("top1_delta_pt", "delta_lo_pt", "delta_hi_pt")))} for r in checks]
    return ("Formats per layer under a budget (`ablation.formats`, notebook 04, `params/flowers_mixed.yaml`) on the "
            f"ViT-S/16 recipe model. On the compiled path (fused q/k/v, patch matmul, Triton FP8 GEMM, whole-model "
            f"compile, CUDA graphs) the uniform formats, valid top-1 and p50 (x 16-bit); the study was stopped by the "
            f"command's time limit after its 7th compiled build (~45 s each), so no choice came out of it "
            f"(`benchmarks/results/{compiled}`, {_device(load(compiled)['meta'])}):\n\n"
            + _table(out, {"uniform format": "choice", "valid top-1": "top1",
                           **{f"batch {b}": f"b{b}" for b in uni.columns}})
            + "\n\nThe whole study on the same path without compile (CUDA graphs only): no vitlab format beats "
            "16-bit there (its FP8 casts are separate kernels uncompiled), so the choice under `max_top1_drop_pt: 0` "
            f"is 16-bit everywhere; checked on test at batch 256 (`benchmarks/results/{graph}`):\n\n"
            + _table(gout, {"configuration": "choice", "formats per layer": "formats", "p50 batch 256": "ms",
                            "test top-1": "top1", "vs 16-bit (paired)": "delta"}))


def mixed_figures(name: str = "mixed_formats_h200_graph.json") -> list[str]:
    """figures/<result>_bs<N>.png: the configurations checked on test, accuracy against latency, per batch size."""
    rows = pd.DataFrame(_mixed_checks(load(name)["rows"])).assign(model=lambda d: d["choice"])
    drawn = []
    for size in sorted(rows["batch_size"].unique()):
        drawn.append(f"{name.removesuffix('.json')}_bs{size}.png")
        plots.save(plots.accuracy_vs_latency(rows, int(size), front=True), FIGURES / drawn[-1])
    return drawn


def refusals_md(name: str = "refusals_cpu.json") -> str:
    """docs/refusals.md: every bad input and fault of the audit, its exit code, its message, seconds to answer."""
    data = load(name)
    rows = [{"case": r["case"], "exit": r["exit"], "s": f"{r['seconds']:.2f}", "ok": "yes" if r["ok"] else "**no**",
             "message": r["message"].replace("|", "\\|")} for r in data["rows"]]
    return "\n\n".join([
        "# Bad input and faults: what vitlab answers", "Generated by `python benchmarks/run.py summarize` from "
        f"`benchmarks/results/{name}` (`{data['meta']['command']}`, {_device(data['meta'])}); each case is the real "
        "`python -m vitlab` in a fresh process. Exit 2: refused before any run folder; 1: a step failed and the run "
        "says so; 3: stopped at --time-limit, resumable. `ok`: the expected exit and words, no traceback, nothing "
        "made or run that should not be. Faults that need a process killed or a disk filled are held by the tests "
        "(tests/test_reliability.py: SIGTERM, SIGHUP, Ctrl-C to the group, SIGKILL in every step, a full disk).",
        _table(rows, {"case": "case", "exit": "exit", "seconds": "s", "ok": "ok", "message": "message"})]) + "\n"


def results_md() -> str:
    return "\n\n".join([
        "# Results", "Generated by `python benchmarks/summarize.py` from `benchmarks/results/*.json`; do not edit by hand. "
        "The prose written while the H100 numbers were measured is in [history_h100.md](history_h100.md).",
        "## ViT-L/16 inference against the peers", peers_headline("peers_h200.json"),
        "The same on the H100, with the peers (timm compiled, timm + torchao FP8), earlier sessions:",
        peers_headline("peers_h100.json"),
        "## ViT-L/16 trained on Oxford Flowers-102 (the seeds' depth)", vitl16_section(),
        "## Oxford Flowers-102, ViT-S/16", flowers_headline(),
        "## Transfer to unseen classes, ViT-S/16", transfer_table(),
        "## Quantization-aware training against post-training quantization", qat_section(),
        "## Formats per layer under a latency or accuracy budget", mixed_section(),
        "## Training speed", train_speed_table(), train_step_table(),
        "## More tables", "- [figures/h100_matrix.md](../figures/h100_matrix.md): every precision x attention kernel, "
        "ViT-B/16 and ViT-L/16, p50/p95/p99, sizes\n- [figures/h100_speed_paths.md](../figures/h100_speed_paths.md): "
        "the speed paths one by one\n- [refusals.md](refusals.md): every bad input and fault tried, with vitlab's "
        "answer and the seconds it took"]) + "\n"


def vitl16_headline(name: str = "vitl16_flowers_h200.json", first: str = "vitl16_flowers_h200_first.json") -> str:
    """One paragraph for the README: the ViT-L/16 grown and trained here, and its variants against it."""
    data = load(name)
    m, small = max(data["model"], key=lambda r: r["run"]), next(r for r in data["start"] if r["model"] == "small")
    variants = "; ".join(f"`{r['variant']}` {r['top1_delta_pt']:+.2f} pt [{r['delta_lo_pt']:+.2f}, {r['delta_hi_pt']:+.2f}] "
                         f"at {fmt.ms(r['p50_ms_bs256'])} (batch 256)" for r in data["variant"] if not r["model"].startswith("16-bit"))
    others = ", ".join(f"{r['test_top1']:.1%}" for r in [*load(first)["model"], *data["model"]] if r is not m)
    return (f"The seeds' depth: a ViT-L/16 grown from vitlab's ViT-S/16 recipe model and trained on, distilled from it, "
            f"reaches {fmt.pct(m['test_top1'], m['test_top1_lo'], m['test_top1_hi'])} test top-1 in its latest training "
            f"({others} before; the teacher of the first two: {small['test_top1']:.1%}; from scratch in one session: 57.5%); against "
            f"their 16-bit selves {variants} (`benchmarks/results/{name}`, {_device(data['meta'])}).")


def qat_headline(name: str = "qat_h200.json") -> str:
    """One sentence for the README: the format where post-training quantization loses most, and QAT there."""
    rows = {(r["format"], r["method"]): r for r in load(name)["rows"]}
    worst = min((r for r in rows.values() if r["method"] == "ptq"), key=lambda r: r["top1_delta_pt"])
    qat = rows[(worst["format"], "qat")]
    acts = "FP8" if worst["format"].endswith("a8") else "16-bit"
    return (f"Where post-training quantization loses: the ViT-S/16 recipe model in {worst['format'].upper()} "
            f"({worst['format'][1]}-bit weight codes, {acts} activations) falls {fmt.pt(worst['top1_delta_pt'] / 100, worst['delta_lo_pt'] / 100, worst['delta_hi_pt'] / 100)} "
            f"on test; {qat['train_s']:.0f} s of QAT (`finetune.method: qat`) bring it to "
            f"{fmt.pt(qat['top1_delta_pt'] / 100, qat['delta_lo_pt'] / 100, qat['delta_hi_pt'] / 100)} of 16-bit, "
            f"{qat['recovered']:.0%} of the loss won back (`benchmarks/results/{name}`, {_device(load(name)['meta'])}).")


def readme_block() -> None:
    """The README's headline table, between its markers, from the same JSON."""
    text = README.read_text()
    begin, end = "<!-- results:begin (python benchmarks/summarize.py) -->", "<!-- results:end -->"
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    README.write_text(f"{head}{begin}\n{peers_headline()}\n\n{vitl16_headline()}\n\n{qat_headline()}\n\n{flowers_headline()}\n{end}{tail}")


def peers_figure(name: str = "peers_h100.json") -> str:
    """figures/<name>.png (throughput against stock per batch size, vitlab's paths and the peers) and its table."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = load(name)
    table = pd.DataFrame(data["rows"])
    process = table["process"] if "process" in table else pd.Series(1, index=table.index)
    md = table.assign(process=process).pivot_table(index=["process", "path", "weight_bits"], columns="batch_size",
                                                   values=["p50_ms", "ratio_vs_stock"], sort=False)
    md.columns = [f"{'p50 ms' if v == 'p50_ms' else 'x stock'}, batch {bs}" for v, bs in md.columns]
    shown = table[~table["path"].str.startswith("stock (")].assign(who=lambda t: t["vitlab"].map({True: "vitlab", False: "peer"}))
    sizes = sorted(shown["batch_size"].unique(), reverse=True)
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 4.8), sharey=True)
    for ax, bs in zip(axes, sizes):
        # A path timed in two processes shows its first (newest) process: no averaging bar across kernels.
        here = shown[shown["batch_size"] == bs].drop_duplicates("path")
        sns.barplot(data=here, y="path", x="ratio_vs_stock", hue="who", dodge=False, ax=ax, errorbar=None,
                    orient="h", palette={"vitlab": "tab:blue", "peer": "tab:gray"}, legend=bs == sizes[-1])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set(title=f"batch {bs}", xlabel="img/s / stock bf16 (same process)", ylabel="")
        if bs == sizes[-1]:
            ax.legend(bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8)
    fig.suptitle(f"ViT-L/16 on one {data['meta']['device']['name']}: throughput against stock transformers bf16 SDPA",
                 fontsize=10)
    plots.save(fig, FIGURES / name.replace(".json", ".png"))
    return md.round(3).reset_index().to_markdown(index=False)


def scratch_figures(name: str = "flowers_scratch_h100.json") -> list[str]:
    """figures/flowers_scratch_curves.png (the recipe's epochs) and, where the result holds the ingredient
    runs' epochs, figures/flowers_scratch_ingredients.png (one validation curve per ingredient row)."""
    data = load(name)
    plots.save(plots.training_curves(data["history"]), FIGURES / "flowers_scratch_curves.png")
    curves: dict[str, list] = {}
    for row in data.get("ingredient_history", []):
        curves.setdefault(row["ingredients"].removeprefix("the recipe with "), []).append(row)
    if len(curves) < 2:  # results collected before the JSON kept those epochs: the committed figure stays
        return ["flowers_scratch_curves.png"]
    plots.save(plots.validation_curves(curves, "changed from the recipe"), FIGURES / "flowers_scratch_ingredients.png")
    return ["flowers_scratch_curves.png", "flowers_scratch_ingredients.png"]


def main(argv: list[str] | None = None) -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    FIGURES.mkdir(exist_ok=True)
    (FIGURES / "h100_matrix.md").write_text(matrix() + "\n")
    (FIGURES / "h100_speed_paths.md").write_text(speed_paths() + "\n")
    for name in ("peers_h100.json", "peers_h200.json"):
        (FIGURES / name.replace(".json", ".md")).write_text(peers_figure(name) + "\n")
    drawn = scratch_figures() + mixed_figures()
    (DOCS / "results.md").write_text(results_md())
    (DOCS / "refusals.md").write_text(refusals_md())
    readme_block()
    print("wrote", sorted(p.name for p in FIGURES.glob("h100_*")), *drawn, "docs/results.md and README.md's headline table")


if __name__ == "__main__":
    main()
