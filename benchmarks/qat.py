"""QAT against post-training quantization of a trained Flowers-102 model, in the same format, on the same test images.

    python benchmarks/run.py qat TRAINED_RUN --formats w3a8,w2a8 --set data.root=DIR   # -> results/qat_<device>.json

For each format, `vitlab run params/flowers_qat.yaml` (finetune.method qat from the trained run's
checkpoint, its finetune step), then, in this process and on the same test images: the trained 16-bit
model, its post-training quantization to the format and the QAT model converted to it (vitlab's
linears, CUDA-graphed): top-1 with paired intervals against 16-bit, QAT minus PTQ, the share of PTQ's
loss QAT wins back (where PTQ loses), the training seconds, and the p50 latency of both at batch 256
(the same kernels).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from common import parser, vitlab_run, write

from vitlab import config, data, infer, metrics, models, runs, speed
from vitlab.bench import latency
from vitlab.settings import Speed


def scored(checkpoint: Path, settings: models.ModelSettings, fmt: str | None, test: list, valid: list,
           device: torch.device) -> tuple[np.ndarray, float]:
    """Test hits of `checkpoint` in format `fmt` (None: 16-bit) and its p50 ms at batch 256, graphed."""
    model = models.load_checkpoint(checkpoint, settings, device)
    path = Speed(cuda_graph=device.type == "cuda", fp8="static" if fmt == "fp8" else "none",
                 int4=fmt if fmt not in (None, "fp8") else "none")
    sped = speed.apply(model, path, valid if path.calibrates else None)
    logits, labels = infer.predict(sped, test, device, progress=False)
    p50 = latency(sped, 256, model.config.image_size, device, 5, 20)["p50_ms"]
    return (logits.argmax(1) == labels).astype(float), p50


def qat_rows(trained: Path, formats: list[str], sets: list[str], model: str, device: str) -> list[dict]:
    checkpoint = runs.path(trained, "checkpoint")
    params = config.resolve("params/flowers_qat.yaml", [f"model.id={checkpoint}", *sets])
    settings = models.ModelSettings.from_params(params["model"])
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else device if device != "auto" else "cpu")
    ds = data.for_checkpoint(params["data"], params["seed"], checkpoint)
    test, valid = list(ds.loader("test", 256)), list(ds.loader("valid", 256))
    ref, ref_ms = scored(checkpoint, settings, None, test, valid, dev)
    rows = [{"model": model, "format": "16bit", "method": "16-bit", "top1": ref.mean(), "top1_delta_pt": 0.0,
             "delta_lo_pt": 0.0, "delta_hi_pt": 0.0, "train_s": 0.0, "p50_ms_bs256": ref_ms, "n": len(ref)}]
    for fmt in formats:
        run = vitlab_run("params/flowers_qat.yaml", f"qat_{fmt}", "finetune",
                         [f"model.id={checkpoint}", f"finetune.qat_format={fmt}", f"speed.int4={fmt}", *sets], device)
        trained_s = sum(r["seconds"] for r in runs.read_json(runs.path(run, "train_metrics"))["history"])
        hits_of = {}
        for method, ckpt, train_s in (("ptq", checkpoint, 0.0), ("qat", runs.path(run, "checkpoint"), trained_s)):
            hits, ms = scored(ckpt, settings, fmt, test, valid, dev)
            hits_of[method] = hits
            d = metrics.paired_bootstrap_diff(hits, ref, seed=params["seed"])
            rows.append({"model": model, "format": fmt, "method": method, "top1": hits.mean(),
                         "top1_delta_pt": 100 * d[0], "delta_lo_pt": 100 * d[1], "delta_hi_pt": 100 * d[2],
                         "train_s": train_s, "p50_ms_bs256": ms, "n": len(hits), "run": run.name})
            print(f"{fmt} {method}: top-1 {hits.mean():.4f} ({100 * d[0]:+.2f} pt [{100 * d[1]:+.2f}, {100 * d[2]:+.2f}]),"
                  f" {ms:.3f} ms at batch 256", flush=True)
        ptq, qat = rows[-2:]
        d = metrics.paired_bootstrap_diff(hits_of["qat"], hits_of["ptq"], seed=params["seed"])
        qat.update(vs_ptq_pt=100 * d[0], vs_ptq_lo_pt=100 * d[1], vs_ptq_hi_pt=100 * d[2],
                   # the share of PTQ's loss QAT wins back: a number only where PTQ loses (its interval below 0)
                   recovered=(qat["top1"] - ptq["top1"]) / (ref.mean() - ptq["top1"]) if ptq["delta_hi_pt"] < 0 else None)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("run", type=Path, help="the trained run (its finetune/model is the 16-bit checkpoint)")
    ap.add_argument("--formats", default="w3a8,w2a8", help="comma-separated vitlab formats (fp8, w4a8, w3a8, w2a8, ...)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params override for every run")
    ap.add_argument("--model", default="vit_s16", help="the model's name in the rows")
    args = ap.parse_args(argv)
    t0 = time.time()
    rows = qat_rows(args.run, args.formats.split(","), args.set, args.model, args.device)
    print(f"wrote {write(args, 'qat', t0, rows, weights=f'trained: {args.run.name}')}")


if __name__ == "__main__":
    main()
