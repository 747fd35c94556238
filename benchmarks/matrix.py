"""The variant matrix: ViT-L/16 and ViT-B/16 x precision x attention kernel x batch size, in one process.

    python benchmarks/matrix.py --out results/            # on a GPU; --quick for a CPU smoke run

Weights are random-init (latency does not depend on their values; 224 px, 102 classes). Each row:
latency mean/p50/p95/p99 (CUDA events, after warm-up), img/s at p50, peak memory, disk size, and the
relative error of the logits against bf16 on the same batch. A profiler breakdown per precision
(SDPA, one batch size) goes to profile.json. A kernel that cannot run is a row with its error.
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

from vitlab import attention, bench, models, quant, runs

ARCHS = {
    "vit_l16": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
    "vit_b16": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128},
}
PRECISIONS = {
    "bf16": ({"bits": 16}, torch.bfloat16),
    "fp32": ({"bits": 16}, torch.float32),
    "int8": ({"bits": 8}, torch.bfloat16),
    "nf4": ({"bits": 4, "type": "nf4"}, torch.bfloat16),
}
QUANT_BASE = {"type": "nf4", "double_quant": True, "compute_dtype": "bfloat16", "int8_threshold": 6.0, "keep_16bit": []}


def save_checkpoint(arch: str, image_size: int, root: Path) -> Path:
    torch.manual_seed(0)
    config = ViTConfig(image_size=image_size, patch_size=16 if arch != "tiny" else 8, num_labels=102, **ARCHS[arch])
    path = root / arch
    ViTForImageClassification(config).to(torch.bfloat16).save_pretrained(str(path))
    return path


def load(checkpoint: Path, precision: str, device: torch.device) -> tuple[torch.nn.Module, int]:
    """The model in `precision` and its size on disk as vitlab saves it."""
    qcfg, dtype = PRECISIONS[precision]
    model_cfg = {"dtype": str(dtype).removeprefix("torch."), "attention": "sdpa"}
    model = quant.quantize(checkpoint, {**QUANT_BASE, **qcfg}, model_cfg, device)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return model, quant.dir_bytes(tmp)


def measure(arch: str, checkpoint: Path, precisions: list[str], kernels: list[str], batch_sizes: list[int],
            image_size: int, device: torch.device, warmup: int, iters: int, profile_bs: int) -> tuple[list, list]:
    rows, profiles = [], []
    ref, x_check = None, None
    for precision in precisions:
        model, disk = load(checkpoint, precision, device)
        x_check = bench.random_batch(model, 8, image_size, device).float() if x_check is None else x_check
        with torch.inference_mode():
            out = model(pixel_values=x_check.to(bench.input_dtype(model))).logits.float()
        ref = out if ref is None else ref  # the first precision, bf16 by default, is the reference
        err = float((out - ref).norm() / ref.norm())
        base = {"arch": arch, "precision": precision, "disk_mb": disk / 2**20,
                "footprint_mb": models.parameter_bytes(model) / 2**20, "rel_err_vs_bf16": err}
        for kernel in kernels:
            labels = {**base, "attention": kernel}
            try:
                attention.check_supported(kernel, device, bench.input_dtype(model))
                attention.apply(model, kernel)
                rows += bench.latency_sweep(model, batch_sizes, image_size, device, warmup, iters, kernel, labels)
            except (attention.AttentionError, RuntimeError) as e:
                rows.append({**labels, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                torch.cuda.empty_cache() if device.type == "cuda" else None
            print(pd.DataFrame([r for r in rows if r.get("precision") == precision and r.get("attention") == kernel])
                  .drop(columns=["arch"], errors="ignore").round(3).to_string(), flush=True)
        attention.apply(model, "sdpa")
        table = bench.profile_components(model, bench.random_batch(model, profile_bs, image_size, device), 5)
        profiles += table.assign(arch=arch, precision=precision, batch_size=profile_bs,
                                 forward_ms=table.attrs["forward_ms"], clock=table.attrs["clock"]).to_dict("records")
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, profiles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="vit_l16,vit_b16")
    ap.add_argument("--precisions", default="bf16,fp32,int8,nf4")
    ap.add_argument("--attention", default="eager,sdpa,sdpa_flash,sdpa_cudnn")
    ap.add_argument("--batch-sizes", default="1,8,32,128,256")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--profile-bs", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    device = models.resolve_device("auto")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split = lambda s: [v for v in s.split(",") if v]
    rows, profiles = [], []
    t0 = time.time()
    env = runs.environment()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in split(args.archs):
            checkpoint = save_checkpoint(arch, args.image_size, Path(tmp))
            r, p = measure(arch, checkpoint, split(args.precisions), split(args.attention),
                           [int(b) for b in split(args.batch_sizes)], args.image_size, device, args.warmup,
                           args.iters, args.profile_bs)
            rows += r
            profiles += p
            # Written after every architecture, so a run cut short still leaves what it measured.
            meta = {"args": vars(args), "seconds": round(time.time() - t0, 1), "weights": "random init (seed 0)",
                    "tf32": torch.backends.cuda.matmul.allow_tf32, **env}
            (out / "matrix.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
            (out / "profile.json").write_text(json.dumps({"meta": meta, "rows": profiles}, indent=1, default=str))
    print(f"{len(rows)} rows in {round(time.time() - t0, 1)} s on {env['device']['name']} -> {out}")


if __name__ == "__main__":
    main()
