"""Formats per layer under a budget, and QAT against post-training quantization, on a trained Flowers-102 model.

    python -m vitlab run params/flowers_mixed.yaml --set model.id=RUN/finetune/model --set data.root=DIR
    python benchmarks/run.py mixed_formats collect MIXED_RUN --model vit_s16     # -> results/mixed_formats_<device>.json
    python benchmarks/run.py mixed_formats qat TRAINED_RUN --formats w3a8,w2a8 --set data.root=DIR
                                                                                # -> results/qat_<device>.json

`collect` turns the ablation step's mixed choice (ablation/mixed_formats.json of a `vitlab run` of
params/flowers_mixed.yaml) into flat rows: every configuration checked on test, at every batch size,
with its formats per layer, p50 latency and top-1 with the paired difference against 16-bit.
`qat` runs, for each format, `vitlab run params/flowers_qat.yaml` (finetune.method qat from the trained
run's checkpoint) and then scores on test, in this process and on the same images, the trained 16-bit
model, its post-training quantization to the format and the QAT model converted to it (vitlab's
linears, CUDA-graphed): top-1 with paired intervals against 16-bit, the training seconds, and the
p50 latency of both at batch 256 (the same kernels).
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


def collect(run: Path, model: str) -> list[dict]:
    study = runs.read_json(runs.path(run, "mixed_formats"))
    if not study["checks"]:
        raise SystemExit(f"{run} made no mixed choice (ablation.formats was empty)")
    keep = ("choice", "formats", "batch_size", "p50_ms", "top1", "top1_lo", "top1_hi", "top1_delta_pt", "delta_lo_pt",
            "delta_hi_pt", "vs_choice_pt", "vs_choice_lo_pt", "vs_choice_hi_pt", "kl", "n")
    rows = [{"model": model, "split": study["verify_split"], **{k: r[k] for k in keep}} for r in study["checks"]]
    rows += [{"model": model, "split": runs.load_params(run)["ablation"]["split"], "table": "candidate",
              **{k: r[k] for k in keep if k in r}} for r in study["candidates"]]
    return rows


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
                   recovered=(qat["top1"] - ptq["top1"]) / (ref.mean() - ptq["top1"]) if ref.mean() > ptq["top1"] else None)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect")
    c.add_argument("run", type=Path)
    q = sub.add_parser("qat")
    q.add_argument("run", type=Path, help="the trained run (its finetune/model is the 16-bit checkpoint)")
    q.add_argument("--formats", default="w3a8,w2a8")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    for p in (c, q):
        p.add_argument("--model", default="vit_s16", help="the model's name in the rows")
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.command == "collect":
        rows = collect(args.run, args.model)
        path = write(args, "mixed_formats", t0, rows, weights=f"trained: {args.run.name}",
                     measured_on=runs.manifest(args.run)["device"], run=args.run.name)
    else:
        rows = qat_rows(args.run, args.formats.split(","), args.set, args.model, args.device)
        path = write(args, "qat", t0, rows, weights=f"trained: {args.run.name}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
