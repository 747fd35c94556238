"""Precision x attention kernel x batch size: ViT-L/16 and ViT-B/16 in one process.

    python benchmarks/precision_attention.py --out results/      # on a GPU; --archs tiny for a CPU smoke run

Weights are random-init (224 px, 102 classes). Each row: latency mean/p50/p95/p99 (CUDA events,
after warm-up), img/s at p50, peak memory, disk size, and the drift of the logits against the first
precision (bf16) on the same batch. A profiler breakdown per precision (SDPA, one batch size) goes
to profile.json. A kernel that cannot run is a row with its error.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from common import parser, quant_settings, random_checkpoint, settings, tables, write

from vitlab import attention, bench, evaluate, machine, quant

PRECISIONS = {"bf16": (16, torch.bfloat16), "fp32": (16, torch.float32), "int8": (8, torch.bfloat16),
              "nf4": (4, torch.bfloat16)}


def measure(arch: str, checkpoint: Path, precisions: list[str], kernels: list[str], batch_sizes: list[int],
            image_size: int, device: torch.device, warmup: int, iters: int, profile_bs: int) -> tuple[list, list]:
    rows, profiles, ref = [], [], None
    x_check = torch.randn(8, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    for precision in precisions:
        bits, dtype = PRECISIONS[precision]
        model = quant.quantize(checkpoint, quant_settings(bits), settings(dtype), device)
        with torch.inference_mode():
            logits = model(pixel_values=x_check.to(device, bench.input_dtype(model))).logits.float().cpu().numpy()
        ref = logits if ref is None else ref  # the first precision, bf16 by default, is the reference
        base = {"arch": arch, "precision": precision, **evaluate.sizes(model), **evaluate.drift(ref, logits)}
        for kernel in kernels:
            labels = {**base, "attention": kernel}
            try:
                attention.check_supported(kernel, device, bench.input_dtype(model))
                attention.apply(model, kernel)
                rows += [{**labels, **bench.latency(model, bs, image_size, device, warmup, iters)} for bs in batch_sizes]
            except (attention.AttentionError, RuntimeError) as e:
                rows.append({**labels, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"{arch} {precision} {kernel}: done", flush=True)
        attention.apply(model, "sdpa")
        table = bench.profile_components(model, bench.random_batch(model, profile_bs, image_size, device), 5)
        profiles += table.assign(arch=arch, precision=precision, batch_size=profile_bs,
                                 forward_ms=table.attrs["forward_ms"], clock=table.attrs["clock"]).to_dict("records")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, profiles


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--archs", default="vit_l16,vit_b16")
    ap.add_argument("--precisions", default="bf16,fp32,int8,nf4")
    ap.add_argument("--attention", default="eager,sdpa,sdpa_flash,sdpa_cudnn")
    ap.add_argument("--batch-sizes", default="1,8,32,128,256")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--profile-bs", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    args = ap.parse_args(argv)
    device = machine.resolve_device(args.device)
    split = lambda s: [v for v in s.split(",") if v]
    rows, profiles, t0 = [], [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in split(args.archs):
            checkpoint = random_checkpoint(arch, Path(tmp), args.image_size)
            r, p = measure(arch, checkpoint, split(args.precisions), split(args.attention),
                           [int(b) for b in split(args.batch_sizes)], args.image_size, device, args.warmup,
                           args.iters, args.profile_bs)
            rows, profiles = rows + r, profiles + p
            path = write(args, "precision_attention", t0, tables(rows=rows, profile=profiles))
    print(f"{len(rows)} rows in {round(time.time() - t0, 1)} s -> {path}")


if __name__ == "__main__":
    main()
