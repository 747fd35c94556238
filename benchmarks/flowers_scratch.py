"""What the from-scratch Flowers-102 recipe (params/flowers_scratch.yaml) is made of, on one GPU.

    python benchmarks/flowers_scratch.py throughput --set data.root=DIR    # training img/s and GPU use: PIL loader, GPU path, compile, 160 px
    python benchmarks/flowers_scratch.py ingredients --epochs 60 --set data.root=DIR   # ingredients added one at a time
    python benchmarks/flowers_scratch.py collect RUN_DIR [RUN_DIR | results.json ...]   # -> results/flowers_scratch_<device>.json

`ingredients` trains the recipe's ViT from scratch once per row, each row adding one ingredient to
the one before (a short schedule, so every row fits one device command), and scores each on the
valid and test splits. `collect` joins those, and full-length runs of the recipe with one thing or
two changed (run folders, each row named by what it changes), with the recipe as `vitlab run` made it.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch
from common import by_table, flat, parser, tables, write

from vitlab import config, data, evaluate, finetune, machine, models, runs, training

PARAMS = config.PARAMS_DIR / "flowers_scratch.yaml"
# Cumulative: each row is the previous row plus one ingredient (the last row is the recipe).
INGREDIENTS = [
    ("plain: crops + flips, AdamW, cosine", {"data.trivial_augment": False, "data.random_erasing": 0.0,
                                             "finetune.label_smoothing": 0.0, "finetune.mixup_alpha": 0.0,
                                             "finetune.cutmix_alpha": 0.0, "finetune.ema_decay": 0.0,
                                             "finetune.drop_path": 0.0, "model.init": "default"}),
    ("+ TrivialAugmentWide", {"data.trivial_augment": True}),
    ("+ MixUp / CutMix", {"finetune.mixup_alpha": None, "finetune.cutmix_alpha": None}),
    ("+ label smoothing", {"finetune.label_smoothing": None}),
    ("+ random erasing", {"data.random_erasing": None}),
    ("+ EMA of weights", {"finetune.ema_decay": None}),
    ("+ stochastic depth", {"finetune.drop_path": None}),
    ("+ mimetic init (the recipe)", {"model.init": None}),
]


def _set(params: dict, key: str, value) -> None:
    section, name = key.split(".")
    params[section][name] = value


def variants(recipe: dict) -> list[tuple[str, dict]]:
    """The INGREDIENTS rows as params (None: the recipe's own value)."""
    out, current = [], copy.deepcopy(recipe)
    for name, changes in INGREDIENTS:
        for key, value in changes.items():
            section, leaf = key.split(".")
            _set(current, key, recipe[section][leaf] if value is None else value)
        out.append((name, copy.deepcopy(current)))
    return out


def train_and_score(name: str, params: dict, ds: data.Data, device: torch.device) -> dict:
    """One from-scratch training of `params`; its selected model scored on valid and test (bf16, as saved)."""
    torch.manual_seed(params["seed"])
    ft, settings = params["finetune"], models.ModelSettings.from_params(params["model"])
    ds.cfg = params["data"]  # augmentation settings of this row; the decoded splits are shared
    model = finetune.build(settings, ft, ds.class_names, device)
    t0 = time.time()
    history = training.train(model, ds.batches("train", ft["batch_size"], device), ds.batches("valid", 256, device), ft,
                             device, num_classes=len(ds.class_names))
    seconds = time.time() - t0
    model = model.to(settings.dtype).eval()
    test, _, _ = evaluate.measure(model, name, ds.batches("test", 256, device), device, len(ds.class_names), params["seed"])
    valid, _, _ = evaluate.measure(model, name, ds.batches("valid", 256, device), device, len(ds.class_names))
    row = {"ingredients": name, "epochs": ft["epochs"], "valid_top1": valid["top1"], "test_top1": test["top1"],
           "test_top1_lo": test["top1_lo"], "test_top1_hi": test["top1_hi"], "test_top5": test["top5"],
           "selected_epoch": next(r["epoch"] for r in history if r["selected"]), "train_seconds": seconds,
           "train_img_per_s": statistics.median(r["train_img_s"] for r in history[1:] or history)}
    print(json.dumps(row), flush=True)
    return row | {"history": history}


class GpuUse:
    """Samples the GPU's utilisation with nvidia-smi every 100 ms while in the `with` block."""

    def __enter__(self):
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-lms", "100"], stdout=subprocess.PIPE, text=True) if shutil.which("nvidia-smi") else None
        return self

    def __exit__(self, *exc):
        samples = []
        if self.proc is not None:
            self.proc.terminate()
            samples = [float(v) for v in self.proc.communicate()[0].split() if v.strip()]
        self.mean = statistics.mean(samples) if samples else None


# Data path and training-step settings measured by `throughput`, each row after one warm-up epoch.
PATHS = [
    ("pil", "PIL DataLoader, every CPU core a worker",
     {"data.pipeline": "pil", "finetune.compile": False, "finetune.cuda_graph": False, "data.train_image_size": None}),
    ("gpu", "decoded once, augmented on the GPU",
     {"data.pipeline": "gpu", "finetune.compile": False, "finetune.cuda_graph": False, "data.train_image_size": None}),
    ("gpu+compile", "+ torch.compile of the training step",
     {"data.pipeline": "gpu", "finetune.compile": True, "finetune.cuda_graph": False, "data.train_image_size": None}),
    ("gpu@160", "GPU path, 160 px training crops (progressive resizing's small phase)",
     {"data.pipeline": "gpu", "finetune.compile": False, "finetune.cuda_graph": False, "data.train_image_size": 160}),
    ("gpu+compile@160", "+ torch.compile, 160 px training crops",
     {"data.pipeline": "gpu", "finetune.compile": True, "finetune.cuda_graph": False, "data.train_image_size": 160}),
    ("gpu+graph", "GPU path, each training step one CUDA graph",
     {"data.pipeline": "gpu", "finetune.compile": False, "finetune.cuda_graph": True, "data.train_image_size": None}),
    ("gpu+graph@160", "GPU path, each training step one CUDA graph, 160 px training crops",
     {"data.pipeline": "gpu", "finetune.compile": False, "finetune.cuda_graph": True, "data.train_image_size": 160}),
]


def throughput(recipe: dict, device: torch.device, epochs: int, paths: list = PATHS) -> list[dict]:
    """Training images/s and mean GPU utilisation of the recipe's model for each of PATHS, after one
    warm-up epoch (which holds the compilation)."""
    rows = []
    for name, what, changes in paths:
        params = copy.deepcopy(recipe)
        for key, value in changes.items():
            _set(params, key, value)
        params["data"]["num_workers"] = os.cpu_count()
        params["finetune"].update(epochs=epochs, select="last", full_size_epochs=0, valid_every=1)
        settings = models.ModelSettings.from_params(params["model"])
        ds = data.for_model(params["data"], params["seed"], models.load_processor(settings))
        t0 = time.time()
        train = ds.batches("train", params["finetune"]["batch_size"], device)
        decode_s = time.time() - t0
        small = params["data"]["train_image_size"]
        small_batches = ds.batches("train", params["finetune"]["batch_size"], device, small) if small else None
        torch.manual_seed(params["seed"])
        model = finetune.build(settings, params["finetune"], ds.class_names, device)
        with GpuUse() as use:
            history = training.train(model, train, ds.batches("valid", 256, device), params["finetune"], device,
                                     num_classes=len(ds.class_names), small_batches=small_batches)
        rows.append({"path": name, "what": what, "pipeline": params["data"]["pipeline"],
                     "workers": os.cpu_count() if name == "pil" else 0, "decode_s": decode_s if name != "pil" else None,
                     "image_size": history[-1]["image_size"] or ds.image_size,
                     "train_img_per_s": statistics.median(r["train_img_s"] for r in history[1:]),
                     "first_epoch_s": history[0]["seconds"], "gpu_util_mean_pct": use.mean,
                     "peak_vram_mb": history[-1]["peak_vram_mb"], "epochs": epochs})
        print(json.dumps(rows[-1]), flush=True)
        del model, ds, train, small_batches
        torch.cuda.empty_cache()
    return rows


def _run_row(run_dir: Path, recipe: dict | None) -> dict:
    """One trained run as a row of the ingredient table, named by how its params differ from the recipe's."""
    params = runs.load_params(run_dir)
    train = runs.read_json(runs.path(run_dir, "train_metrics"))
    acc = runs.read_json(runs.path(run_dir, "results"))["accuracy"][0]
    selected = next(r for r in train["history"] if r["selected"])
    # A run made before a setting existed ran with what is its default now.
    mine = flat(config.merge(config.defaults(), params), whole=("config",))
    theirs = flat(recipe or params, whole=("config",))
    changed = [f"{k}={mine[k]}" for k in sorted(mine) if k not in ("variant", "steps", "data.root") and mine[k] != theirs.get(k)]
    return {"ingredients": "the recipe" + (" with " + ", ".join(changed) if changed else ""), "run": run_dir.name,
            "epochs": params["finetune"]["epochs"], "valid_top1": selected["val_acc"], "test_top1": acc["top1"],
            "test_top1_lo": acc["top1_lo"], "test_top1_hi": acc["top1_hi"], "test_top5": acc["top5"],
            "selected_epoch": selected["epoch"], "train_seconds": sum(r["seconds"] for r in train["history"]),
            "train_img_per_s": statistics.median(r["train_img_s"] for r in train["history"][1:])}


def collect(run_dir: Path, others: list[Path], args: argparse.Namespace) -> Path:
    """benchmarks/results/flowers_scratch_<device>.json: the recipe as `vitlab run` trained and evaluated it
    (table `model`, its epochs in `history`); the ingredient table (other run folders, each named by what
    it changes, with their epochs in `ingredient_history`, and rows of `ingredients` JSON files); the
    data-path throughput (rows of `throughput` JSON files). `summarize` draws the figures from it."""
    params, man = runs.load_params(run_dir), runs.manifest(run_dir)
    train = runs.read_json(runs.path(run_dir, "train_metrics"))
    recipe = _run_row(run_dir, None)
    named: dict[str, list] = {"measured_with": [], "ingredients": [], "ingredient_history": []}
    for path in sorted(others, key=lambda p: not p.is_dir()):
        if path.is_dir():
            named["ingredients"].append(_run_row(path, params))
            named["ingredient_history"] += [{"ingredients": named["ingredients"][-1]["ingredients"], **r} for r in
                                            runs.read_json(runs.path(path, "train_metrics"))["history"]]
            continue
        content = by_table(json.loads(path.read_text()))  # rows of the same table from several commands are concatenated
        named["measured_with"].append({"file": path.name, "args": content["meta"]["args"],
                                       "device": content["meta"]["device"]["name"],
                                       "torch": content["meta"]["versions"]["torch"]})
        table = "throughput" if content["meta"]["args"]["what"] == "throughput" else "ingredients"
        for r in content["rows"]:
            named[table] = named.get(table, []) + [{k: v for k, v in r.items() if k != "history"}]
            named["ingredient_history"] += [{"ingredients": r["ingredients"], **h} for h in r.get("history", [])
                                            if table == "ingredients"]
    by_size = {}
    for row in train["history"][1:]:
        by_size.setdefault(row["image_size"] or params["model"]["config"]["image_size"], []).append(row["train_img_s"])
    model = {"model": f"ViT (transformers), {params['model']['config']}, init {params['model']['init']}",
              "parameters": train["total_params"], "epochs": params["finetune"]["epochs"],
              "selected_epoch": recipe["selected_epoch"], "test_top1": recipe["test_top1"],
              "test_top1_lo": recipe["test_top1_lo"], "test_top1_hi": recipe["test_top1_hi"], "test_top5": recipe["test_top5"],
              "test_images": runs.read_json(runs.path(run_dir, "results"))["accuracy"][0]["n"],
              "valid_top1": recipe["valid_top1"], "train_img_per_s": recipe["train_img_per_s"],
              "train_img_per_s_by_size": {size: statistics.median(v) for size, v in by_size.items()},
             "train_seconds": recipe["train_seconds"],
             **{f"{s}_seconds": v.get("seconds") for s, v in man["steps"].items()}}
    named["ingredients"].append(recipe)
    named["ingredient_history"] += [{"ingredients": "the recipe", **r} for r in train["history"]]
    return write(args, "flowers_scratch", time.time(), tables(model=[model], history=train["history"], **named),
                 "trained from scratch by the recipe", measured_on=man["device"], versions=man["versions"],
                 params=params, recipe_command="python -m vitlab run params/flowers_scratch.yaml --steps "
                 "finetune,quantize,evaluate --set data.root=<Flowers-102 train/valid/test copy>")


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, device="auto")
    ap.add_argument("what", choices=["throughput", "ingredients", "collect"])
    ap.add_argument("paths", nargs="*", help="collect: the recipe's run folder, then other run folders (ingredient rows) "
                                           "and JSON files of the other two")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the recipe's params")
    ap.add_argument("--epochs", type=int, default=60, help="ingredients: epochs per row; throughput: epochs per path")
    ap.add_argument("--only", help="comma-separated row numbers (0-based) of INGREDIENTS or PATHS to measure")
    args = ap.parse_args(argv)
    if args.what == "collect":
        print(collect(Path(args.paths[0]), [Path(p) for p in args.paths[1:]], args))
        return
    recipe = config.resolve(PARAMS, [f"device={args.device}", *args.set])
    device = machine.resolve_device(recipe["device"])
    t0 = time.time()
    if args.what == "throughput":
        paths = [PATHS[int(i)] for i in args.only.split(",")] if args.only else PATHS
        write(args, "flowers_scratch", t0, throughput(recipe, device, args.epochs, paths),
              "random init, trained for the epochs measured", part="throughput")
        return
    ds = data.for_model(recipe["data"], recipe["seed"],
                        models.load_processor(models.ModelSettings.from_params(recipe["model"])))
    rows = []
    chosen = variants(recipe)
    if args.only:
        chosen = [chosen[int(i)] for i in args.only.split(",")]
    for name, params in chosen:
        params["finetune"]["epochs"] = args.epochs
        rows.append(train_and_score(name, params, ds, device))
        write(args, "flowers_scratch", t0, rows, "trained from scratch, once per row", part="ingredients")


if __name__ == "__main__":
    main()
