"""The seeds' study at the seeds' scale: a ViT-L/16 trained by vitlab on Flowers-102, and every variant on it.

    python -m vitlab run params/flowers_vitl16.yaml --set data.root=DIR --steps finetune,quantize,evaluate \
        --time-limit 9m                                   # then --resume RUN --time-limit 9m until it exits 0
    python benchmarks/run.py vitl16_flowers variants RUN --set data.root=DIR    # one `vitlab run` per variant
    python benchmarks/run.py vitl16_flowers collect RUN VARIANT_RUN ...         # -> results/vitl16_flowers_<device>.json
    python benchmarks/run.py vitl16_flowers collect RUN VARIANT_RUN ... --into results/vitl16_flowers_<device>.json
    python benchmarks/run.py vitl16_flowers collect --transfer TRANSFER_RUN ... --into results/vitl16_flowers_<device>.json
    python benchmarks/run.py vitl16_flowers start SMALL_CHECKPOINT --set data.root=DIR   # what growing starts from
    python benchmarks/run.py vitl16_flowers all --set data.root=DIR --time-limit 540 [--teacher CHECKPOINT]
    python benchmarks/run.py vitl16_flowers all --variants mixed --set data.root=DIR --time-limit 540
    python benchmarks/run.py mixed_formats MIXED_RUN --model vit_l16 --into results/mixed_formats_<device>.json

`all` is the study in one command, repeated until it says it is done: the ViT-S recipe model (or --teacher,
one trained earlier), the ViT-L/16 grown from it and distilled from it, then the variants; each command
continues what the last one stopped (the runs keep their state in runs/), so one warm device machine takes it
as back-to-back commands.

`start` scores the ViT-S checkpoint that params/flowers_vitl16.yaml grows from, and the ViT-L/16 grown
from it both ways (model.grow_depth copies and identity) before any training, on valid and test: what
growing gives before fine-tuning adds anything.

`--variants mixed` (not among the defaults) is issue 24's per-layer formats under a budget on this model
(params/flowers_mixed.yaml's ablation step), collected by benchmarks/mixed_formats.py, not by `collect`.

`variants` runs each of VARIANTS from the trained run's checkpoint (finetune.method none) through
quantize and evaluate; ABLATION's variants also run the ablation (bitsandbytes' formats on the NF4 run,
vitlab's own on the fp8_fused run) and the NF4 run the demo. A variant that fails is reported and the
others go on. `collect` turns the run folders into one `{meta, rows}` file whose rows carry `table`:
`model` (the trained ViT-L/16), `history` (its epochs), `variant`, `ablation` (every configuration of the
sweeps and the checks on test) and `transfer` (benchmarks/flowers_transfer.py --scale vitl16's runs, collected
on their own with --transfer), and `trained_run`, the training they come from. Each training's provenance
(commit, commands, teacher) is in `meta.trainings`; --into adds a training to a file of earlier trainings of
the recipe, since a device session that trains the model again cannot reach the last one's weights.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from common import NotStarted, continued, dense_peaks, parser, write
from flowers_transfer import METHODS, PAIRED, SCALES, method_index, paired
from flowers_transfer import row as transfer_row

from vitlab import runs

# The ablation runs first: a device command that runs out of time loses the cheap variants, not the study.
VARIANTS = ["nf4_sdpa", "fp8_fused", "int8_sdpa", "w4a8_fused", "nf4_graph", "fp16_sdpa", "nf4_flash", "int8_flash"]
ABLATION = {"nf4_sdpa": "[nf4,int8]", "fp8_fused": "[fp8,w4a8]"}  # which run sweeps which formats
DEMO = "nf4_sdpa"
PLANNED = [*VARIANTS, "mixed"]  # what `plan` knows how to run
FLOWERS = ["finetune.method=none", "data.source=imagefolder", "data.pipeline=gpu", "eval.batch_size=256",
           "eval.latency_batch_sizes=[1,32,256]", "eval.warmup=5", "eval.iters=20", "ablation.split=valid",
           "ablation.verify_split=test"]


def plan(variant: str) -> tuple[str, str, list[str]]:
    """The params file, the steps and the changes of one variant's `vitlab run` from the trained checkpoint.
    `mixed` is issue 24's per-layer formats under a budget (params/flowers_mixed.yaml): it compiles each distinct
    block once for the whole study, since a whole-model compile of a ViT-L per candidate would take the session."""
    if variant == "mixed":
        return "params/flowers_mixed.yaml", "finetune,ablation", ["speed.compile=blocks"]
    steps = "finetune,quantize,evaluate" + (",ablation" if variant in ABLATION else "") + (",demo" if variant == DEMO else "")
    return f"params/{variant}.yaml", steps, [f"ablation.quant_types={ABLATION[variant]}"] if variant in ABLATION else []


def run_variants(trained: Path, sets: list[str], variants: list[str], device: str, time_limit: float | None) -> list[Path]:
    checkpoint = runs.path(trained, "checkpoint")
    folders, deadline = [], time.time() + time_limit if time_limit else None
    for variant in variants:
        params_file, steps, extra = plan(variant)
        t0, left = time.time(), deadline - time.time() if deadline else None
        try:
            folders.append(continued(f"vitl16_{variant}", params_file, steps,
                                     [f"model.id={checkpoint}", *FLOWERS, *extra, *sets], device, left))
        except NotStarted as e:
            print(e, flush=True)
            continue
        except subprocess.CalledProcessError as e:  # a bug to fix, reported here; the other variants still run
            print(f"{variant}: FAILED (exit {e.returncode}) after {time.time() - t0:.0f} s", flush=True)
            continue
        print(f"{variant}: ok in {time.time() - t0:.0f} s -> {folders[-1]}", flush=True)
    return folders


def run_all(args) -> list[Path]:
    """The whole study, continued across commands: the ViT-S (or --teacher), the ViT-L grown from it, the variants."""
    deadline = time.time() + args.time_limit if args.time_limit else None
    left = lambda: deadline - time.time() if deadline else None  # noqa: E731
    try:
        teacher = args.teacher or str(runs.path(continued("flowers_scratch", "params/flowers_scratch.yaml", "finetune",
                                                          args.set, args.device, left()), "checkpoint"))
        # its 16-bit scores come from the variants' runs (each scores the checkpoint first): finetune alone here
        trained = continued("flowers_vitl16", "params/flowers_vitl16.yaml", "finetune",
                            [f"model.grow_from={teacher}", f"finetune.teacher={teacher}", *args.set], args.device, left())
    except NotStarted as e:
        sys.exit(f"{e}: run the same command again to continue")
    except subprocess.CalledProcessError as e:
        sys.exit(f"stopped (exit {e.returncode}{': the time limit' if e.returncode == 3 else ''}): "
                 "run the same command again to continue")
    return [trained, *run_variants(trained, args.set, args.variants.split(","), args.device, left())]


def model_rows(trained: Path, evaluated: Path) -> list[dict]:
    """The trained model: its training (img/s and TFLOP/s per image size) and its test accuracy, as the
    first model of `evaluated` (a run of its checkpoint: every variant's run scores the 16-bit model first)."""
    params, train = runs.load_params(trained), runs.read_json(runs.path(trained, "train_metrics"))
    acc = runs.read_json(runs.path(evaluated, "results"))["accuracy"][0]
    cfg, man = params["model"]["config"], runs.manifest(trained)
    selected = next(r for r in train["history"] if r["selected"])
    peaks = dense_peaks(man["device"]["name"])
    rows = []
    for size in sorted({r["image_size"] or cfg["image_size"] for r in train["history"]}):
        mine = [r["train_img_s"] for r in train["history"][1:] if (r["image_size"] or cfg["image_size"]) == size]
        img_s = sorted(mine)[len(mine) // 2] if mine else None
        tokens = (size // cfg["patch_size"]) ** 2 + 1
        tflops = 6 * train["total_params"] * tokens * img_s / 1e12 if img_s else None
        rows.append({"image_size": size, "train_img_s": img_s, "tflops_6nt": tflops,
                     "pct_bf16_dense_peak": 100 * tflops / peaks[0] if tflops and peaks else None})
    return [{"num_hidden_layers": cfg["num_hidden_layers"], "hidden_size": cfg["hidden_size"],
             "parameters": train["total_params"], "test_top1": acc["top1"], "test_top1_lo": acc["top1_lo"],
             "test_top1_hi": acc["top1_hi"], "test_top5": acc["top5"], "f1_macro": acc["f1_macro"], "test_images": acc["n"],
             "valid_top1": selected["val_acc"], "selected_epoch": selected["epoch"], "epochs": params["finetune"]["epochs"],
             "train_seconds": sum(r["seconds"] for r in train["history"]), "finetune_s": man["steps"]["finetune"]["seconds"],
             "run": trained.name, "scored_in": evaluated.name, **{f"{k}_{r['image_size']}px": v for r in rows for k, v in r.items() if k != "image_size"}}]


def variant_rows(run_dir: Path) -> list[dict]:
    """The variant (the run's last model) with its paired difference to the run's 16-bit model."""
    params, results = runs.load_params(run_dir), runs.read_json(runs.path(run_dir, "results"))
    acc = results["accuracy"][-1]
    lat = {r["batch_size"]: r for r in results["latency"] if r["model"] == acc["model"]}
    return [{"variant": params["variant"].removeprefix("vitl16_"), "model": acc["model"], "top1": acc["top1"],
             "top1_lo": acc["top1_lo"], "top1_hi": acc["top1_hi"], "top5": acc["top5"], "f1_macro": acc["f1_macro"],
             "top1_delta_pt": acc.get("top1_delta_pt", 0.0), "delta_lo_pt": acc.get("delta_lo_pt", 0.0),
             "delta_hi_pt": acc.get("delta_hi_pt", 0.0), "disk_mb": acc["disk_mb"],
             **{f"{k}_bs{b}": lat[b][k] for b in sorted(lat) for k in ("p50_ms", "p95_ms", "p99_ms", "throughput_img_s")},
             "peak_mb": max((r.get("peak_mem_mb") or 0) for r in lat.values()) or None,
             "evaluate_s": runs.manifest(run_dir)["steps"]["evaluate"]["seconds"], "run": run_dir.name}]


def ablation_rows(run_dir: Path) -> list[dict]:
    """Every configuration of the run's sweep (on valid) and every check of its choices (on test)."""
    out = []
    for r in runs.read_json(runs.path(run_dir, "sensitivity")):
        kept = r["keep_16bit"] if isinstance(r["keep_16bit"], list) and all(isinstance(k, int) for k in r["keep_16bit"]) else r["config"]
        out.append({"quant_type": r["quant"], "kept": kept, "config": r["config"], "kind": r["kind"], "split": "valid",
                    **{k: r[k] for k in ("kl", "kl_lo", "kl_hi", "top1", "top1_lo", "top1_hi", "footprint_mb")}})
    choice = runs.read_json(runs.path(run_dir, "choice"))
    for c in choice["checks"]:
        out.append({"quant_type": c["quant"], "kept": c["keep_16bit"], "config": c["config"], "kind": "check",
                    "split": choice["verify_split"], "comparison": c["comparison"], "chosen": c["chosen"],
                    **{k: c[k] for k in ("kl", "top1", "top1_lo", "top1_hi", "footprint_mb", "d_top1", "d_top1_lo",
                                         "d_top1_hi", "d_kl", "d_kl_lo", "d_kl_hi")}})
    return out


def pretrain_row(run_dir: Path) -> dict:
    """A pretraining run on half_a (the ViT-S, then the ViT-L grown from it): its selected epoch and time."""
    train = runs.read_json(runs.path(run_dir, "train_metrics"))
    selected = next(h for h in train["history"] if h["selected"])
    return {"variant": runs.load_params(run_dir)["variant"], "run": run_dir.name, "epochs": len(train["history"]),
            "selected_epoch": selected["epoch"], "valid_top1": selected["val_acc"], "classes": len(train["class_names"]),
            "finetune_s": runs.manifest(run_dir)["steps"]["finetune"]["seconds"], "total_params": train["total_params"]}


# What a collect into a file keeps of its meta that it does not write itself: the transfer's provenance (written by
# collect --transfer) and the demo's (the widget seen in JupyterLab, recorded by hand with its screenshot).
KEPT_META = ("transfer", "demo")


def transfer_rows(run_dir: Path) -> list[dict]:
    """A transfer method's run (benchmarks/flowers_transfer.py --scale vitl16) in the issue's names."""
    r = transfer_row(run_dir)
    return [{"method": r.pop("method"), "top1": r.pop("test_top1"), "top1_lo": r.pop("lo"), "top1_hi": r.pop("hi"), **r}]


def start(args) -> Path:
    import dataclasses

    import torch

    from vitlab import config, data, finetune, infer, machine, metrics, models

    small, t0 = args.paths[0], time.time()
    params = config.resolve(runs.REPO_ROOT / "params/flowers_vitl16.yaml", [f"model.grow_from={small}", *args.set])
    device = machine.resolve_device(args.device)
    ds = data.for_checkpoint(params["data"] | {"pipeline": "pil"}, params["seed"], small)
    settings = models.ModelSettings.from_params(params["model"])
    built = {"small": lambda: models.load_checkpoint(small, models.ModelSettings(small, torch.bfloat16, "sdpa"), device)}
    for depth in ("copies", "identity"):
        built[f"grown_{depth}"] = lambda depth=depth: finetune.build(
            dataclasses.replace(settings, grow_depth=depth), params["finetune"] | {"method": "full"}, ds.class_names,
            device).to(torch.bfloat16)
    rows = []
    for name, make in built.items():
        model = make()
        row = {"model": name, "num_hidden_layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size}
        for split in ("valid", "test"):
            logits, labels = infer.predict(model, ds.loader(split, 128), device, desc=f"{name} {split}")
            row[f"{split}_top1"] = metrics.classification(logits, labels, len(ds.class_names))["top1"]
        print(row, flush=True)
        rows.append(row)
        del model
    return write(args, "vitl16_flowers", t0, rows, f"grown from {small} (no training)", part="start")


def teacher_of(params: dict) -> dict | None:
    """The run that trained the model this one grew from and distilled from, when it is a run folder here."""
    teacher = params["finetune"].get("teacher")
    run_dir = Path(teacher).parents[1] if teacher else None
    if not run_dir or not (run_dir / "manifest.json").exists():
        return {"checkpoint": teacher} if teacher else None
    man, train = runs.manifest(run_dir), runs.read_json(runs.path(run_dir, "train_metrics"))
    selected = next(r for r in train["history"] if r["selected"])
    return {"run": run_dir.name, "finetune_s": man["steps"]["finetune"]["seconds"], "valid_top1": selected["val_acc"],
            "selected_epoch": selected["epoch"], "commands": [c["command"] for c in man.get("commands", [])]}


def collect(args) -> Path:
    """The trained run and its variants' runs as rows, each with `trained_run`; with --into, added to that
    file's earlier trainings of the same recipe (a training collected again replaces its own rows)."""
    trained, given = Path(args.paths[0]), [Path(p) for p in args.paths[1:]]
    if mixed := [p for p in given if runs.load_params(p)["variant"] == "vitl16_mixed"]:
        sys.exit(f"collect: {', '.join(p.name for p in mixed)} is the mixed-format study: collect it with "
                 "python benchmarks/run.py mixed_formats RUN --model vit_l16 --into results/mixed_formats_<device>.json")
    others = [p for p in given if runs.manifest(p)["steps"].get("evaluate", {}).get("status") == "ok"]
    missing = {p.name: runs.manifest(p).get("failed_step") or runs.manifest(p)["status"] for p in given if p not in others}
    named = {"model": model_rows(trained, others[0]),
             "history": runs.read_json(runs.path(trained, "train_metrics"))["history"], "variant": [], "ablation": []}
    for run_dir in others:
        named["variant"] += variant_rows(run_dir)
        if runs.manifest(run_dir)["steps"].get("ablation", {}).get("status") == "ok":
            named["ablation"] += ablation_rows(run_dir)
    man, params = runs.manifest(trained), runs.load_params(trained)
    grown = params["model"]["grow_from"]
    weights = (f"grown from {grown} by vitlab.grow ({params['model']['grow_depth']}), then trained on Flowers-102's "
               "train split by params/flowers_vitl16.yaml" if grown else
               "trained from scratch on Flowers-102's train split by params/flowers_vitl16.yaml")
    rows = [{"table": name, "trained_run": trained.name, **row} for name, rows in named.items() for row in rows]
    training = {"weights": weights, "git": man["git"], "device": man["device"], "versions": man["versions"],
                "params": params, "teacher": teacher_of(params),
                "training_commands": [c["command"] for c in man.get("commands", [])], "not_evaluated": missing}
    trainings, kept = {trained.name: training}, {}
    if args.into:
        earlier = json.loads(Path(args.into).read_text())
        rows = [r for r in earlier["rows"] if r.get("trained_run") != trained.name] + rows
        trainings = earlier["meta"].get("trainings", {}) | trainings
        kept = {k: earlier["meta"][k] for k in KEPT_META if k in earlier["meta"]}
    path = write(args, "vitl16_flowers", time.time(), rows, weights, measured_on=man["device"], versions=man["versions"],
                 trainings=trainings, **kept)
    for row in named["variant"]:
        print(f"{row['variant']:>11}: top-1 {row['top1']:.4f} ({row['top1_delta_pt']:+.2f} pt "
              f"[{row['delta_lo_pt']:+.2f}, {row['delta_hi_pt']:+.2f}]) p50 bs256 {row.get('p50_ms_bs256', float('nan')):.2f} ms")
    return path


def collect_transfer(args) -> Path:
    """The transfer methods' runs (benchmarks/flowers_transfer.py --scale vitl16) as the `transfer` rows of the
    --into file: a method given replaces its earlier row, an earlier row of a method not given stays. Each row
    names the half_a pretraining it started from (`pretrain_run`): rows of different pretrainings differ by more
    than the methods do, so a table that mixes them must say so."""
    if not args.into:
        sys.exit("collect --transfer RUN ... (without a trained run) adds to the transfer rows of a file: give --into FILE")
    if not Path(args.into).is_file():
        sys.exit(f"collect --transfer: --into {args.into} is not a result file (it adds to one of a training's)")
    earlier = json.loads(Path(args.into).read_text())
    given = [Path(p) for p in args.transfer]
    pretraining = [v for v, _ in SCALES["vitl16"]["pretrain"]]
    folders = [f for f in given if runs.load_params(f)["variant"] not in pretraining]
    if not folders:
        sys.exit("collect --transfer: none of these folders is a method's run (vitl16_transfer_N); give them with the pretraining runs")
    by_index = {method_index(f): f for f in folders}
    # `pretrained` is the checkpoint's path, the same for every pretraining: the run that made it is the last
    # ViT-L pretraining that started before the method's run (run folders are named by their start time).
    old = earlier["meta"].get("transfer", {})
    made = sorted([f.name for f in given if runs.load_params(f)["variant"] == pretraining[-1]]
                  + [p["run"] for p in old.get("pretrain", []) if p["variant"] == pretraining[-1]])
    made_before = lambda run: max((m for m in made if m < run), default=None)  # noqa: E731
    new = [{"table": "transfer", **r, "pretrain_run": made_before(f.name),
            **(paired(f, by_index[PAIRED[i]]) if PAIRED.get(i) in by_index else {})}
           for i, f in by_index.items() for r in transfer_rows(f)]
    kept = [{**r, "pretrain_run": r.get("pretrain_run") or made_before(r["run"])} for r in earlier["rows"]
            if r["table"] == "transfer" and r["method"] not in {n["method"] for n in new}]
    rows = [r for r in earlier["rows"] if r["table"] != "transfer"] + new + kept
    done = {r["method"] for r in new + kept}
    man = runs.manifest(folders[0])
    transfer = {"runs": [f.name for f in folders], "git": man["git"], "versions": man["versions"],
                "commands": [c["command"] for f in given for c in runs.manifest(f).get("commands", [])],
                "pretrain": [pretrain_row(f) for f in given if f not in folders],
                "not_run": [m for i, m in enumerate(METHODS) if str(i) in SCALES["vitl16"]["only"].split(",") and m not in done]}
    if kept:  # where the rows kept from the earlier file came from, as that file said
        transfer["earlier"] = {"runs": [r["run"] for r in kept], **{k: old.get(k) for k in ("git", "commands", "pretrain")}}
    if transfer["not_run"]:
        transfer["why_not_run"] = args.why_not_run or "not given (collect --why-not-run TEXT)"
    kept_meta = {k: earlier["meta"][k] for k in KEPT_META if k in earlier["meta"] and k != "transfer"}
    return write(args, "vitl16_flowers", time.time(), rows, earlier["meta"]["weights"], measured_on=man["device"],
                 versions=earlier["meta"]["versions"], trainings=earlier["meta"]["trainings"], transfer=transfer, **kept_meta)


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, device="auto")
    ap.add_argument("what", choices=["variants", "collect", "start", "all"])
    ap.add_argument("paths", nargs="*", help="variants: the trained run; collect: the trained run, then the variants' "
                    "runs; start: the checkpoint grown from; all: none")
    ap.add_argument("--teacher", help="all: the ViT-S checkpoint to grow from and distil from (default: train it)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="variants: params for every run")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--transfer", nargs="*", default=[], help="collect: the transfer runs' folders and the pretraining runs on half_a")
    ap.add_argument("--why-not-run", help="collect --transfer: why the methods it lacks did not run (for the results)")
    ap.add_argument("--into", help="collect: a result file of earlier trainings of the recipe to add this one to")
    ap.add_argument("--time-limit", type=float, help="variants: seconds for them all (each `vitlab run` gets what is left)")
    args = ap.parse_intermixed_args(argv)
    if unknown := [v for v in args.variants.split(",") if v not in PLANNED]:
        ap.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(PLANNED)}")
    if args.what in ("variants", "all"):
        if args.what == "all":
            trained, *folders = run_all(args)
        else:
            trained, folders = args.paths[0], run_variants(Path(args.paths[0]), args.set, args.variants.split(","),
                                                           args.device, args.time_limit)
        print("collect with: python benchmarks/run.py vitl16_flowers collect", trained, *folders)
        return
    print(start(args) if args.what == "start" else collect(args) if args.paths else collect_transfer(args))


if __name__ == "__main__":
    main()
