"""Transfer on real photographs: pretrain on half of Flowers-102's classes, fine-tune on the other half.

    python benchmarks/flowers_transfer.py pretrain --set data.root=DIR [--set finetune.epochs=N]
    python benchmarks/flowers_transfer.py methods --set data.root=DIR      # one `vitlab run` per method, then collect
    python benchmarks/flowers_transfer.py methods --only 3,4 ...           # some of them (indices into METHODS)
    python benchmarks/flowers_transfer.py collect RUN_DIR ...              # -> results/flowers_transfer_<device>.json
                                                   # (RUN_DIRs: the methods' runs and the pretraining run)

`pretrain` is params/flowers_scratch.yaml on the train images of `data.classes: half_a` (51 classes,
fixed by data.class_split_seed), copied to checkpoints/flowers_half_a. `methods` fine-tunes that
checkpoint on the 51 other classes (params/flowers_transfer.yaml, a fresh head) with each of METHODS,
through the real pipeline (finetune, quantize at 16 bits, evaluate on those classes' test images).
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from common import parser, vitlab_run, write

from vitlab import runs

CHECKPOINT = runs.REPO_ROOT / "checkpoints" / "flowers_half_a"
# name -> params changes. Learning rates: a head alone takes a larger step, full fine-tuning a smaller one.
METHODS = {
    "probe": ["finetune.method=probe", "finetune.lr=0.003"],
    "lora (seeds: r=8, alpha=32, dropout 0.1, every block linear)": [
        "finetune.method=lora", "finetune.lora.r=8", "finetune.lora.alpha=32", "finetune.lora.dropout=0.1"],
    "lora (vitlab default: r=16, alpha=16)": ["finetune.method=lora"],
    "qlora (NF4 base + vitlab's LoRA)": ["finetune.method=qlora"],
    "full": ["finetune.method=full", "finetune.lr=0.0003"],
}


def pretrain(sets: list[str], device: str) -> Path:
    run = vitlab_run("params/flowers_scratch.yaml", "flowers_half_a", "finetune", ["data.classes=half_a", *sets], device)
    shutil.rmtree(CHECKPOINT, ignore_errors=True)
    shutil.copytree(runs.path(run, "checkpoint"), CHECKPOINT)
    print(f"pretrained on half_a: {run} -> {CHECKPOINT}", flush=True)
    return run


def methods(sets: list[str], only: list[int], device: str) -> list[Path]:
    return [vitlab_run("params/flowers_transfer.yaml", f"transfer_{i}", "finetune,quantize,evaluate", changes + sets, device)
            for i, changes in enumerate(METHODS.values()) if i in only]


def row(run_dir: Path) -> dict:
    params, train = runs.load_params(run_dir), runs.read_json(runs.path(run_dir, "train_metrics"))
    acc = runs.read_json(runs.path(run_dir, "results"))["accuracy"][0]
    name = list(METHODS)[int(params["variant"].removeprefix("transfer_"))]
    selected = next(r for r in train["history"] if r["selected"])
    return {"method": name, "test_top1": acc["top1"], "lo": acc["top1_lo"], "hi": acc["top1_hi"], "test_top5": acc["top5"],
            "test_images": acc["n"], "classes": len(train["class_names"]), "trainable_params": train["trainable_params"],
            "total_params": train["total_params"], "peak_vram_mb": train["peak_vram_mb"], "s_per_epoch": train["s_per_epoch"],
            "epochs": params["finetune"]["epochs"], "selected_epoch": selected["epoch"], "valid_top1": selected["val_acc"],
            "lr": params["finetune"]["lr"], "pretrained": params["model"]["id"], "run": run_dir.name}


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, device="auto")
    ap.add_argument("what", choices=["pretrain", "methods", "collect"])
    ap.add_argument("paths", nargs="*", help="collect: the run folders of the methods (and of the pretraining)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params for every run")
    ap.add_argument("--only", default=",".join(map(str, range(len(METHODS)))), help="methods: indices into METHODS")
    args = ap.parse_intermixed_args(argv)  # run folders may follow the options
    t0 = time.time()
    if args.what == "pretrain":
        pretrain(args.set, args.device)
        return
    if args.what == "methods":
        folders, half_a = methods(args.set, [int(i) for i in args.only.split(",")], args.device), runs.latest("flowers_half_a", ("finetune",))
    else:
        given = [Path(p) for p in args.paths]
        folders = [f for f in given if runs.load_params(f)["variant"].startswith("transfer_")]
        half_a = next((f for f in given if runs.load_params(f)["variant"] == "flowers_half_a"), None)
    rows = [row(f) for f in folders]
    man = runs.manifest(folders[0])
    write(args, "flowers_transfer", t0, rows, f"pretrained from scratch on half_a: {rows[0]['pretrained']}",
          measured_on=man["device"], context={"versions": man["versions"], "pretrain": runs.read_json(
              runs.path(half_a, "train_metrics"))["history"][-1] if half_a else None})
    for r in rows:
        print(f"{r['method']}: top-1 {r['test_top1']:.4f} [{r['lo']:.4f}, {r['hi']:.4f}] · {r['trainable_params']:,} trainable "
              f"· {r['peak_vram_mb'] or 0:.0f} MB · {r['s_per_epoch']:.2f} s/epoch", flush=True)


if __name__ == "__main__":
    main()
