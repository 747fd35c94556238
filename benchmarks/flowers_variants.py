"""The seeds' five variants and the per-layer ablation on real photographs: `vitlab run` once per variant.

    python benchmarks/flowers_variants.py run CHECKPOINT --set data.root=DIR   # five runs, then collect
    python benchmarks/flowers_variants.py collect RUN_DIR ...                  # -> results/flowers_{variants,ablation}.json

CHECKPOINT is a trained Flowers-102 model (a save_pretrained folder, e.g. the finetune/model of a
params/flowers_scratch.yaml run). Each variant is the real pipeline with `finetune.method: none`
(the checkpoint as it is): quantize, evaluate on the 819 test images; the NF4 SDPA run also runs the
ablation and the demo. The variants are the params files the seeds compared.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import parser, tables, vitlab_run, write

from vitlab import runs

VARIANTS = ["fp16_sdpa", "nf4_sdpa", "nf4_flash", "int8_sdpa", "int8_flash"]
FULL = "nf4_sdpa"  # the run that also takes the ablation and the demo
FLOWERS = ["finetune.method=none", "data.source=imagefolder", "data.pipeline=gpu", "eval.batch_size=256",
           "eval.latency_batch_sizes=[1,32,256]", "ablation.split=valid", "ablation.verify_split=test"]


def run_all(checkpoint: str, sets: list[str], variants: list[str], device: str) -> list[Path]:
    """One `vitlab run` per variant (in this process's Python); the run folders."""
    return [vitlab_run(f"params/{variant}.yaml", f"flowers_{variant}",
                       "finetune,quantize,evaluate" + (",ablation,demo" if variant == FULL else ""),
                       [f"model.id={checkpoint}", *FLOWERS, *sets], device) for variant in variants]


def variant_rows(run_dir: Path) -> list[dict]:
    """The variant's row (the last model of the run) at each latency batch size, with its accuracy."""
    params, results = runs.load_params(run_dir), runs.read_json(runs.path(run_dir, "results"))
    acc = results["accuracy"][-1]
    out = []
    for lat in (r for r in results["latency"] if r["model"] == acc["model"]):
        out.append({"variant": params["variant"].removeprefix("flowers_"), "model": acc["model"],
                    "attention": params["model"]["attention"], "dtype": params["model"]["dtype"],
                    **{k: acc[k] for k in ("n", "top1", "top1_lo", "top1_hi", "top5", "f1_macro", "disk_mb",
                                           "footprint_mb")},
                    **{k: lat[k] for k in ("batch_size", "p50_ms", "p95_ms", "p99_ms", "throughput_img_s",
                                           "peak_mem_mb")}, "run": run_dir.name})
    return out


def collect(folders: list[Path], args: argparse.Namespace, t0: float) -> None:
    rows = [r for f in folders for r in variant_rows(f)]
    full = next(f for f in folders if runs.load_params(f)["variant"] == f"flowers_{FULL}")
    man = runs.manifest(full)
    checkpoint = runs.load_params(full)["model"]["id"]
    context = {"versions": man["versions"], "checkpoint": checkpoint}
    weights = f"trained on Flowers-102: {checkpoint}"
    write(args, "flowers_variants", t0, rows, weights, measured_on=man["device"], context=context)
    sensitivity = runs.read_json(runs.path(full, "sensitivity"))
    choice = runs.read_json(runs.path(full, "choice"))
    write(args, "flowers_variants", t0, tables(choices=list(choice["choices"].values()), checks=choice["checks"],
                                               sensitivity=sensitivity), weights, measured_on=man["device"], part="ablation",
          context={**context, "split": runs.load_params(full)["ablation"]["split"],
                   "verify_split": choice["verify_split"], "ablation_s": man["steps"]["ablation"]["seconds"]})
    for r in rows:
        print(json.dumps({k: r[k] for k in ("variant", "batch_size", "top1", "p50_ms", "throughput_img_s")}))


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, device="auto")
    ap.add_argument("what", choices=["run", "collect"])
    ap.add_argument("paths", nargs="+", help="run: the checkpoint; collect: the run folders")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run: more params for every run")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"run: which (the full one, {FULL}, among them)")
    args = ap.parse_args(argv)
    t0 = time.time()
    folders = run_all(args.paths[0], args.set, args.variants.split(","), args.device) if args.what == "run" else [Path(p) for p in args.paths]
    collect(folders, args, t0)


if __name__ == "__main__":
    main()
