"""Quantized and fast: ViT-L/16 speed paths against stock bf16 SDPA, in one process on one GPU.

    python benchmarks/fast.py --variants stock,graph_bf16,nf4_graph,compile_bf16,fp8_compile --out results/
    python benchmarks/fast.py ... --accuracy-run runs/<date>_offline   # also top-1 of each quantization there

Rows: latency percentiles (CUDA events, warm-up and compilation excluded), img/s, peak memory, size
on disk, relative error of the logits against stock bf16, and the top GPU kernels at the largest
batch size. Weights are random-init ViT-L/16 (224 px, 102 classes): latency does not depend on them.
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import ViTConfig, ViTForImageClassification

from vitlab import attention, bench, data, fast, infer, metrics, models, quant, runs

VIT_L16 = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}
BNB = {"double_quant": True, "compute_dtype": "bfloat16", "int8_threshold": 6.0, "keep_16bit": [], "type": "nf4"}
MODEL_CFG = {"dtype": "bfloat16", "attention": "sdpa"}


def base(checkpoint: Path, device: torch.device) -> torch.nn.Module:
    return models.load_checkpoint(checkpoint, torch.bfloat16, "sdpa", device)


def bnb(checkpoint: Path, device: torch.device, bits: int) -> torch.nn.Module:
    return quant.quantize(checkpoint, {**BNB, "bits": bits}, MODEL_CFG, device)


# Each variant: how to build it from the bf16 checkpoint, and the model whose weights are stored.
VARIANTS = {
    "stock": lambda c, d: base(c, d),
    "graph_bf16": lambda c, d: fast.CudaGraphed(base(c, d)),
    "nf4": lambda c, d: bnb(c, d, 4),
    "nf4_graph": lambda c, d: fast.CudaGraphed(bnb(c, d, 4)),
    "int8_graph": lambda c, d: fast.CudaGraphed(bnb(c, d, 8)),
    "compile_bf16": lambda c, d: fast.compiled(base(c, d)),
    "fp8_compile": lambda c, d: fast.compiled(fast.torchao_quantize(base(c, d), "fp8")),
    "fp8_compile_ro": lambda c, d: fast.compiled(fast.torchao_quantize(base(c, d), "fp8"), "reduce-overhead"),
    "int8dyn_compile": lambda c, d: fast.compiled(fast.torchao_quantize(base(c, d), "int8dyn")),
    "int4wo_compile": lambda c, d: fast.compiled(fast.torchao_quantize(base(c, d), "int4wo")),
    "int4wo_compile_ro": lambda c, d: fast.compiled(fast.torchao_quantize(base(c, d), "int4wo"), "reduce-overhead"),
}
VARIANTS.update({
    "compile_bf16_linears": lambda c, d: fast.compiled(base(c, d), scope="linears"),
    "fp8_linears": lambda c, d: fast.compiled(fast.torchao_quantize(base(c, d), "fp8"), scope="linears"),
    "int4wo_linears": lambda c, d: fast.compiled(fast.torchao_quantize(base(c, d), "int4wo"), scope="linears"),
    "fp8_linears_graph": lambda c, d: fast.CudaGraphed(fast.compiled(fast.torchao_quantize(base(c, d), "fp8"), scope="linears")),
    "int4wo_linears_graph": lambda c, d: fast.CudaGraphed(fast.compiled(fast.torchao_quantize(base(c, d), "int4wo"), scope="linears")),
})
# "_flash" variants run with PyTorch's flash backend forced: without it, Inductor lowers SDPA to a
# float32 math attention (measured: 58 of 125 ms per ViT-L forward at batch 256).
for _name in ("compile_bf16", "fp8_compile", "int8dyn_compile", "int4wo_compile"):
    VARIANTS[_name + "_flash"] = VARIANTS[_name]


def attention_of(name: str) -> str:
    return "sdpa_flash" if name.endswith("_flash") else "sdpa"


@torch.inference_mode()
def accuracy(run_dir: Path, variants: list[str], device: torch.device) -> list[dict]:
    """top-1 on the test split of a trained run for each variant, next to its bf16 model."""
    params = runs.load_params(run_dir)
    checkpoint = run_dir / "finetune" / "model"
    import transformers
    ds = data.for_model(params["data"], params["seed"], transformers.AutoImageProcessor.from_pretrained(checkpoint))
    batches = list(ds.loader("test", 64))
    rows, ref = [], None
    for name in variants:
        try:
            model = VARIANTS[name](checkpoint, device)
            logits, labels = infer.predict(model, batches, device, attention_of(name), desc=name)
        except Exception as e:  # a variant that cannot run on this model is a row, not a crash
            rows.append({"variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        ref = logits if ref is None else ref
        hits = logits.argmax(1) == labels
        lo, hi = metrics.bootstrap_ci(hits)
        rows.append({"variant": name, "top1": float(hits.mean()), "top1_lo": lo, "top1_hi": hi,
                     "agree_with_first": float((logits.argmax(1) == ref.argmax(1)).mean()),
                     "kl_vs_first": metrics.kl_divergence(ref, logits), "n": int(len(labels))})
        print(rows[-1], flush=True)
        del model
    return rows


def save(out: Path, args: argparse.Namespace, rows: list, kernels: list, acc: list, t0: float) -> None:
    """Written after every variant, so a run cut short still leaves what it measured."""
    meta = {"args": vars(args), "seconds": round(time.time() - t0, 1), "weights": "random init (seed 0)",
            **runs.environment()}
    (out / f"{args.tag}.json").write_text(json.dumps({"meta": meta, "rows": rows, "kernels": kernels,
                                                     "accuracy": acc}, indent=1, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="stock,graph_bf16,nf4_graph,compile_bf16,fp8_compile")
    ap.add_argument("--batch-sizes", default="1,32,256")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--accuracy-run", help="a run folder with a trained model: also report top-1 per variant")
    ap.add_argument("--tag", default="fast")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    device = models.resolve_device("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.variants.split(",")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows, kernels, t0 = [], [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        checkpoint = Path(tmp) / "vit_l16"
        config = ViTConfig(image_size=224, patch_size=16, num_labels=102, **VIT_L16)
        ViTForImageClassification(config).to(torch.bfloat16).save_pretrained(str(checkpoint))
        x_check = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
        ref = None
        for name in names:
            t1 = time.time()
            try:
                model = VARIANTS[name](checkpoint, device)
                with torch.inference_mode(), attention.kernel(attention_of(name)):
                    got = model(pixel_values=x_check).logits.float().clone()
                ref = got if ref is None else ref
                labels = {"variant": name, "disk_mb": fast.storage_bytes(model) / 2**20,
                          "rel_err_vs_first": float((got - ref).norm() / ref.norm())}
                rows += bench.latency_sweep(model, sizes, 224, device, args.warmup, args.iters, attention_of(name),
                                            {**labels, "attention": attention_of(name)})
                with attention.kernel(attention_of(name)):
                    kt = bench.kernel_table(model, bench.random_batch(model, max(sizes), 224, device))
                kernels += kt.assign(variant=name, batch_size=max(sizes)).to_dict("records")
            except Exception as e:  # record and go on: one broken path must not hide the others
                rows.append({"variant": name, "error": f"{type(e).__name__}: {str(e)[:400]}"})
            print(f"{name}: {time.time() - t1:.0f} s", flush=True)
            print(pd.DataFrame([r for r in rows if r["variant"] == name]).round(3).to_string(), flush=True)
            model = None
            gc.collect()
            torch.cuda.empty_cache()
            torch._dynamo.reset()
            save(out, args, rows, kernels, [], t0)
    acc = accuracy(Path(args.accuracy_run), names, device) if args.accuracy_run else []
    save(out, args, rows, kernels, acc, t0)
    table = pd.DataFrame([r for r in rows if "p50_ms" in r])
    if not table.empty:
        stock = table[table["variant"] == names[0]].set_index("batch_size")["throughput_img_s"]
        table["speedup_vs_first"] = table.apply(lambda r: r["throughput_img_s"] / stock.get(r["batch_size"], float("nan")), axis=1)
        print(table.pivot_table(index="variant", columns="batch_size", values=["p50_ms", "speedup_vs_first"], sort=False).round(3).to_string())
    print(f"done in {time.time() - t0:.0f} s -> {out}")


if __name__ == "__main__":
    main()
