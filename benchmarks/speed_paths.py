"""Quantized and fast: ViT-L/16 speed paths against stock bf16 SDPA, in one process on one GPU.

    python benchmarks/speed_paths.py --variants stock,graph_bf16,nf4_graph,compile_bf16,fp8_compile --out results/
    python benchmarks/speed_paths.py ... --accuracy-run runs/<date>_offline   # also top-1 of each path there

Rows: latency percentiles (CUDA events, warm-up and compilation excluded), img/s, peak memory, size
on disk, drift of the logits against the first variant (stock bf16), and the top GPU kernels at the
largest batch size. Weights are random-init ViT-L/16 (224 px, 102 classes).
"""
from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from common import parser, quant_settings, random_checkpoint, settings, tables, write

from vitlab import bench, data, evaluate, machine, models, quant, runs, speed


def base(checkpoint: Path, device: torch.device, attention: str = "sdpa") -> torch.nn.Module:
    return models.load_checkpoint(checkpoint, settings(attention=attention), device)


def bnb(checkpoint: Path, device: torch.device, bits: int) -> torch.nn.Module:
    return quant.quantize(checkpoint, quant_settings(bits, "nf4"), settings(), device)


def torchao(checkpoint: Path, device: torch.device, kind: str, attention: str = "sdpa") -> torch.nn.Module:
    return speed.torchao_quantize(base(checkpoint, device, attention), kind)


# Each variant: how to build it from the bf16 checkpoint.
VARIANTS = {
    "stock": lambda c, d: base(c, d),
    "graph_bf16": lambda c, d: speed.CudaGraphed(base(c, d)),
    "nf4": lambda c, d: bnb(c, d, 4),
    "nf4_graph": lambda c, d: speed.CudaGraphed(bnb(c, d, 4)),
    "int8_graph": lambda c, d: speed.CudaGraphed(bnb(c, d, 8)),
    "compile_bf16": lambda c, d: speed.compiled(base(c, d)),
    "fp8_compile": lambda c, d: speed.compiled(torchao(c, d, "fp8")),
    "fp8_compile_graph": lambda c, d: speed.CudaGraphed(speed.compiled(torchao(c, d, "fp8"))),  # Inductor's reduce-overhead
    "int8dyn_compile": lambda c, d: speed.compiled(torchao(c, d, "int8dyn")),
    "int4wo_compile": lambda c, d: speed.compiled(torchao(c, d, "int4wo")),
    "int4wo_compile_graph": lambda c, d: speed.CudaGraphed(speed.compiled(torchao(c, d, "int4wo"))),
    "compile_bf16_linears": lambda c, d: speed.compiled(base(c, d), scope="linears"),
    "fp8_linears": lambda c, d: speed.compiled(torchao(c, d, "fp8"), scope="linears"),
    "int4wo_linears": lambda c, d: speed.compiled(torchao(c, d, "int4wo"), scope="linears"),
    "fp8_linears_graph": lambda c, d: speed.CudaGraphed(speed.compiled(torchao(c, d, "fp8"), scope="linears")),
    "int4wo_linears_graph": lambda c, d: speed.CudaGraphed(speed.compiled(torchao(c, d, "int4wo"), scope="linears")),
    # PyTorch's flash backend forced: without it, Inductor lowers SDPA to a float32 math attention
    # (measured: 58 of 125 ms per ViT-L forward at batch 256).
    "compile_bf16_flash": lambda c, d: speed.compiled(base(c, d, "sdpa_flash")),
    "fp8_compile_flash": lambda c, d: speed.compiled(torchao(c, d, "fp8", "sdpa_flash")),
    "int8dyn_compile_flash": lambda c, d: speed.compiled(torchao(c, d, "int8dyn", "sdpa_flash")),
    "int4wo_compile_flash": lambda c, d: speed.compiled(torchao(c, d, "int4wo", "sdpa_flash")),
}


@torch.inference_mode()
def accuracy(run_dir: Path, variants: list[str], device: torch.device) -> list[dict]:
    """`evaluate.measure` on the test split of a trained run for each variant, drift against the first."""
    params = runs.load_params(run_dir)
    checkpoint = runs.path(run_dir, "checkpoint")
    ds = data.for_checkpoint(params["data"], params["seed"], checkpoint)
    batches = list(ds.loader("test", 64))
    rows, ref = [], None
    for name in variants:
        try:
            model = VARIANTS[name](checkpoint, device)
            row, logits, _ = evaluate.measure(model, name, batches, device, len(ds.class_names), saved=None, ref_logits=ref)
        except Exception as e:  # a variant that cannot run on this model is a row, not a crash
            rows.append({"model": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        ref = logits if ref is None else ref
        rows.append(row)
        print(row, flush=True)
        del model
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--variants", default="stock,graph_bf16,nf4_graph,compile_bf16,fp8_compile")
    ap.add_argument("--batch-sizes", default="1,32,256")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--accuracy-run", help="a run folder with a trained model: also report top-1 per variant")
    args = ap.parse_args(argv)
    device = machine.resolve_device(args.device)
    names = args.variants.split(",")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows, kernels, t0 = [], [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = random_checkpoint("vit_l16", Path(tmp))
        x_check = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
        ref = None
        for name in names:
            t1 = time.time()
            try:
                model = VARIANTS[name](checkpoint, device)
                with torch.inference_mode():
                    got = model(pixel_values=x_check).logits.float().cpu().numpy()
                ref = got if ref is None else ref
                labels = {"model": name, **evaluate.sizes(model), **evaluate.drift(ref, got)}
                rows += [{**labels, **bench.latency(model, bs, 224, device, args.warmup, args.iters)} for bs in sizes]
                kt = bench.kernel_table(model, bench.random_batch(model, max(sizes), 224, device))
                kernels += kt.assign(model=name, batch_size=max(sizes)).to_dict("records")
            except Exception as e:  # record and go on: one broken path must not hide the others
                rows.append({"model": name, "error": f"{type(e).__name__}: {str(e)[:400]}"})
            print(f"{name}: {time.time() - t1:.0f} s", flush=True)
            print(pd.DataFrame([r for r in rows if r["model"] == name]).round(3).to_string(), flush=True)
            model = None
            gc.collect()
            torch.cuda.empty_cache()
            torch._dynamo.reset()
            write(args, "speed_paths", t0, tables(rows=rows, kernels=kernels))
    acc = accuracy(Path(args.accuracy_run), names, device) if args.accuracy_run else []
    path = write(args, "speed_paths", t0, tables(rows=rows, kernels=kernels, accuracy=acc))
    table = pd.DataFrame([r for r in rows if "p50_ms" in r])
    if not table.empty:
        stock = table[table["model"] == names[0]].set_index("batch_size")["throughput_img_s"]
        table["speedup_vs_first"] = table["throughput_img_s"] / table["batch_size"].map(stock)
        print(table.pivot_table(index="model", columns="batch_size", values=["p50_ms", "speedup_vs_first"], sort=False).round(3).to_string())
    print(f"done in {time.time() - t0:.0f} s -> {path}")


if __name__ == "__main__":
    main()
