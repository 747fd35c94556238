"""Transfer on real photographs: pretrain on half of Flowers-102's classes, fine-tune on the other half.

    python benchmarks/run.py flowers_transfer pretrain --set data.root=DIR [--scale vitl16] [--time-limit 540]
    python benchmarks/run.py flowers_transfer methods --set data.root=DIR [--scale vitl16] [--time-limit 540]
    python benchmarks/run.py flowers_transfer methods --only 3,4 ...        # some of them (indices into METHODS)
    python benchmarks/run.py flowers_transfer collect RUN_DIR ...           # -> results/flowers_transfer_<device>.json
                                                   # (RUN_DIRs: the methods' runs and the pretraining run)

`pretrain` trains on the train images of `data.classes: half_a` (51 classes, fixed by data.class_split_seed)
and copies the model to checkpoints/: at --scale vits16, params/flowers_scratch.yaml's ViT-S/16; at vitl16,
that ViT-S and then params/flowers_vitl16.yaml's ViT-L/16 grown from it and distilled from it, as the
full-data ViT-L is made (nothing of half_b's classes is seen). `methods` fine-tunes that checkpoint on the 51
other classes (params/flowers_transfer.yaml, a fresh head) with each of METHODS, through the real pipeline
(finetune, quantize at 16 bits, evaluate on those classes' test images). Under --time-limit both go on where
an earlier command stopped (each run keeps its state in runs/; a finished run of the same name is reused), so
back-to-back device commands take them: the same command again continues.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from common import NotStarted, continued, parser, write

from vitlab import metrics, runs

# name -> params changes. Learning rates: a head alone takes a larger step, full fine-tuning a smaller one.
METHODS = {
    "probe": ["finetune.method=probe", "finetune.lr=0.003"],
    "lora (seeds: r=8, alpha=32, dropout 0.1, every block linear)": [
        "finetune.method=lora", "finetune.lora.r=8", "finetune.lora.alpha=32", "finetune.lora.dropout=0.1"],
    "lora (vitlab default: r=16, alpha=16)": ["finetune.method=lora"],
    "qlora (NF4 base + vitlab's LoRA)": ["finetune.method=qlora"],
    "full": ["finetune.method=full", "finetune.lr=0.0003"],
    "lora (seeds: r=8, alpha=32, dropout 0.1, query and value)": [
        "finetune.method=lora", "finetune.lora.r=8", "finetune.lora.alpha=32", "finetune.lora.dropout=0.1",
        "finetune.lora.target_modules=[q_proj,v_proj]"],
    "lora (vitlab default), compiled blocks + CUDA graph": [
        "finetune.method=lora", "finetune.compile=blocks", "finetune.cuda_graph=true"],
    "lora (r=16, alpha=16, dropout 0), compiled blocks + CUDA graph": [
        "finetune.method=lora", "finetune.lora.dropout=0", "finetune.compile=blocks", "finetune.cuda_graph=true"],
    "qlora on torchao's NF4 base, compiled blocks + CUDA graph": [
        "finetune.method=qlora", "finetune.qlora_base=torchao", "finetune.compile=blocks", "finetune.cuda_graph=true"],
}
# The fast paths' runs, each against the eager run it must match in accuracy (paired on the same test images).
PAIRED = {6: 2, 7: 2, 8: 3}
# What each scale pretrains (variant, params file) and keeps, and what its methods change: the ViT-L's
# 300 M parameters take ~4x the ViT-S's time per epoch, and a model that starts trained needs fewer.
SCALES = {
    "vits16": {"pretrain": [("flowers_half_a", "params/flowers_scratch.yaml")],
               "checkpoint": runs.REPO_ROOT / "checkpoints" / "flowers_half_a", "prefix": "transfer_", "methods": [],
               "only": "0,1,2,3,4"},
    "vitl16": {"pretrain": [("flowers_half_a", "params/flowers_scratch.yaml"),
                            ("flowers_vitl16_half_a", "params/flowers_vitl16.yaml")],
               "checkpoint": runs.REPO_ROOT / "checkpoints" / "flowers_vitl16_half_a", "prefix": "vitl16_transfer_",
               "methods": ["finetune.epochs=10"], "only": "0,5,2,3,4,6,7,8"},  # the seeds' own LoRA (q/v), not every block linear
}


def pretrain(sets: list[str], scale: str, device: str, left) -> Path:
    """Each model of the scale's pretraining on half_a in turn, the next grown from and distilled from the last."""
    grown_from: list[str] = []
    for variant, params_file in SCALES[scale]["pretrain"]:
        run = continued(variant, params_file, "finetune", ["data.classes=half_a", *grown_from, *sets], device, left())
        small = runs.path(run, "checkpoint")
        grown_from = [f"model.grow_from={small}", f"finetune.teacher={small}"]
    checkpoint = SCALES[scale]["checkpoint"]
    shutil.rmtree(checkpoint, ignore_errors=True)
    shutil.copytree(runs.path(run, "checkpoint"), checkpoint)
    print(f"pretrained on half_a: {run} -> {checkpoint}", flush=True)
    return run


def methods(sets: list[str], only: list[int], scale: str, device: str, left) -> list[Path]:
    """The methods' runs in the order `only` names them (so the missing ones can go first), each continued or
    started while the time limit leaves room."""
    folders, changes_of_scale = [], [f"model.id={SCALES[scale]['checkpoint']}", *SCALES[scale]["methods"]]
    for i in only:
        changes = list(METHODS.values())[i]
        try:
            folders.append(continued(f"{SCALES[scale]['prefix']}{i}", "params/flowers_transfer.yaml",
                                     "finetune,quantize,evaluate", [*changes_of_scale, *changes, *sets], device, left()))
        except NotStarted as e:
            print(e, flush=True)
        except subprocess.CalledProcessError as e:
            print(f"{list(METHODS)[i]}: FAILED (exit {e.returncode})", flush=True)
    return folders


def row(run_dir: Path) -> dict:
    params, train = runs.load_params(run_dir), runs.read_json(runs.path(run_dir, "train_metrics"))
    acc = runs.read_json(runs.path(run_dir, "results"))["accuracy"][0]
    name = list(METHODS)[method_index(run_dir)]
    selected = next(r for r in train["history"] if r["selected"])
    later = sorted(r["train_img_s"] for r in train["history"][1:])  # the first epoch compiles and captures
    return {"method": name, "train_img_s": later[len(later) // 2] if later else None,
            "test_top1": acc["top1"], "lo": acc["top1_lo"], "hi": acc["top1_hi"], "test_top5": acc["top5"],
            "test_images": acc["n"], "classes": len(train["class_names"]), "trainable_params": train["trainable_params"],
            "total_params": train["total_params"], "peak_vram_mb": train["peak_vram_mb"], "s_per_epoch": train["s_per_epoch"],
            "epochs": params["finetune"]["epochs"], "selected_epoch": selected["epoch"], "valid_top1": selected["val_acc"],
            "lr": params["finetune"]["lr"], "pretrained": params["model"]["id"], "run": run_dir.name}


def method_index(run_dir: Path) -> int:
    """Which of METHODS a method's run (variant <prefix>N) trained."""
    return int(runs.load_params(run_dir)["variant"].rsplit("_", 1)[1])


def paired(run_dir: Path, ref_dir: Path, seed: int = 0) -> dict:
    """Top-1 of run_dir's model minus ref_dir's on the same test images, with its paired bootstrap 95% interval
    (each run's evaluate/predictions.csv, its first model: the fine-tuned 16-bit one)."""
    a, b = (pd.read_csv(runs.path(r, "predictions")) for r in (run_dir, ref_dir))
    a, b = (p[p["model"] == p["model"].iloc[0]] for p in (a, b))
    if a["true"].tolist() != b["true"].tolist():
        raise ValueError(f"{run_dir.name} and {ref_dir.name} were not tested on the same images in the same order")
    d, lo, hi = metrics.paired_bootstrap_diff((a["true"] == a["predicted"]).to_numpy(),
                                              (b["true"] == b["predicted"]).to_numpy(), seed=seed)
    return {"vs": list(METHODS)[method_index(ref_dir)], "vs_run": ref_dir.name,
            "top1_vs_pt": 100 * d, "top1_vs_lo_pt": 100 * lo, "top1_vs_hi_pt": 100 * hi}


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, device="auto")
    ap.add_argument("what", choices=["pretrain", "methods", "collect"])
    ap.add_argument("paths", nargs="*", help="collect: the run folders of the methods (and of the pretraining)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params for every run")
    ap.add_argument("--scale", choices=list(SCALES), default="vits16", help="the model pretrained and fine-tuned")
    ap.add_argument("--only", help="methods: indices into METHODS (default: the scale's)")
    ap.add_argument("--time-limit", type=float, help="pretrain, methods: seconds for this command's runs")
    args = ap.parse_intermixed_args(argv)  # run folders may follow the options
    args.only = args.only or SCALES[args.scale]["only"]
    t0 = time.time()
    deadline = t0 + args.time_limit if args.time_limit else None
    left = lambda: deadline - time.time() if deadline else None  # noqa: E731
    if args.what == "pretrain":
        try:
            pretrain(args.set, args.scale, args.device, left)
        except (NotStarted, subprocess.CalledProcessError) as e:
            sys.exit(f"stopped ({e}): run the same command again to continue")
        return
    if args.what == "methods":
        folders = methods(args.set, [int(i) for i in args.only.split(",")], args.scale, args.device, left)
        half_a = runs.latest(SCALES[args.scale]["pretrain"][-1][0], ("finetune",))
        if len(folders) < len(args.only.split(",")):
            sys.exit("not every method finished: run the same command again to continue")
    else:
        given = [Path(p) for p in args.paths]
        folders = [f for f in given if "transfer_" in runs.load_params(f)["variant"]]
        half_a = next((f for f in given if runs.load_params(f)["variant"] == SCALES[args.scale]["pretrain"][-1][0]), None)
    rows = [row(f) for f in folders]
    man = runs.manifest(folders[0])
    write(args, "flowers_transfer", t0, rows, f"pretrained on half_a: {rows[0]['pretrained']}",
          measured_on=man["device"], part="" if args.scale == "vits16" else args.scale,
          context={"versions": man["versions"], "pretrain": runs.read_json(
              runs.path(half_a, "train_metrics"))["history"][-1] if half_a else None})
    for r in rows:
        print(f"{r['method']}: top-1 {r['test_top1']:.4f} [{r['lo']:.4f}, {r['hi']:.4f}] · {r['trainable_params']:,} trainable "
              f"· {r['peak_vram_mb'] or 0:.0f} MB · {r['s_per_epoch']:.2f} s/epoch", flush=True)


if __name__ == "__main__":
    main()
