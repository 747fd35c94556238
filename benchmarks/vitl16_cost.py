"""What the real experiment costs at ViT-L/16 scale on one GPU, on the real Flowers-102 images.

    python benchmarks/vitl16_cost.py --data DIR --out results/     # DIR: a Flowers-102 copy in the seeds' layout
    python benchmarks/vitl16_cost.py --data DIR --arch tiny        # the same code path, small enough for a CPU

The weights are random (no pretrained ViT-L/16 can be had offline), so every accuracy here is
meaningless; the cost is not. torchvision's layout (the official 1,020 / 1,020 / 6,149 split) is
linked from DIR. Measured, each as one table of the output JSON:
- training: LoRA and QLoRA (vitlab's defaults), batch 32, images/s of the second epoch and peak VRAM;
- accuracy_pass: the 6,149 test images through the 16-bit, NF4 and int8 models (decoded once, timed apart);
- ablation: the whole NF4 + int8 ablation (every single layer, groups, the greedy path, the checks of the
  choice on the test split) as 04_ablation runs it, its wall time (`ablation_wall_s`) and where it went.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import parser, random_checkpoint, tables, write

from vitlab import ablation, config, data, finetune, infer, machine, models, quant, training

TRAIN_BATCH = 32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_rows(settings: models.ModelSettings, ds: data.Data, device: torch.device, epochs: int) -> list[dict]:
    """One row per method: LoRA and QLoRA on the train split, the median epoch after the first."""
    rows = []
    for method in ("lora", "qlora"):
        ft = {**config.defaults()["finetune"], "method": method, "epochs": epochs, "batch_size": TRAIN_BATCH}
        torch.manual_seed(0)
        model = finetune.build(settings, ft, ds.class_names, device)
        trainable, total = finetune.trainable_parameters(model)
        history = training.train(model, ds.batches("train", TRAIN_BATCH, device), ds.batches("valid", 256, device), ft,
                                 device, num_classes=len(ds.class_names))
        rows.append({"method": method, "batch_size": TRAIN_BATCH, "train_images": len(ds.splits.train),
                     "train_img_per_s": statistics.median(r["train_img_s"] for r in history[1:] or history),
                     "s_per_epoch": statistics.median(r["seconds"] for r in history[1:] or history),
                     "peak_vram_mb": history[-1]["peak_vram_mb"], "trainable_params": trainable, "total_params": total})
        print(rows[-1], flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def accuracy_pass(checkpoint: Path, settings: models.ModelSettings, ds: data.Data, device: torch.device) -> list[dict]:
    """The test split decoded once onto the device, then one pass per precision."""
    t0 = time.perf_counter()
    test = ds.batches("test", 256, device)
    decode_s = time.perf_counter() - t0
    base = quant.QuantSettings.from_params(config.defaults()["quant"])
    rows = []
    for name, q in (("16-bit", base.replace(bits=16)), ("nf4", base.replace(bits=4)), ("int8", base.replace(bits=8))):
        model = quant.quantize(checkpoint, q, settings, device)
        _sync(device)
        t0 = time.perf_counter()
        logits, labels = infer.predict(model, test, device, progress=False)
        _sync(device)
        seconds = time.perf_counter() - t0
        rows.append({"precision": name, "images": len(labels), "decode_s": decode_s, "pass_s": seconds,
                     "img_per_s": len(labels) / seconds, "top1_meaningless": float((logits.argmax(1) == labels).mean())})
        print(rows[-1], flush=True)
        del model
    return rows


def ablation_cost(checkpoint: Path, settings: models.ModelSettings, ds: data.Data, device: torch.device) -> dict:
    """04_ablation's work with the defaults (NF4 and int8, valid to choose, test to check), timed."""
    params = config.defaults()
    base = quant.QuantSettings.from_params(params["quant"])
    t0 = time.perf_counter()
    valid, test = list(ds.batches("valid", 64, device)), list(ds.batches("test", 256, device))
    decode_s = time.perf_counter() - t0
    sweep_t: dict = {}
    rows = ablation.sweep(checkpoint, settings, base, params["ablation"]["quant_types"], valid, device, timings=sweep_t)
    choices = ablation.choose_all(rows, params["ablation"])
    sweep_s = time.perf_counter() - t0 - decode_s
    check_t: list[dict] = []
    for choice in choices.values():
        check_t.append({})
        ablation.check_choice(checkpoint, settings, base, choice, rows, test, device, timings=check_t[-1])
    wall = time.perf_counter() - t0
    return {"ablation_wall_s": wall, "decode_s": decode_s, "sweep_s": sweep_s, "checks_s": wall - decode_s - sweep_s,
            "configurations": len(rows) - 1, "sweep_seconds": sweep_t, "check_seconds": check_t,
            "choices": {q: c["keep_16bit"] for q, c in choices.items()}, "valid_images": len(ds.splits.valid),
            "test_images": len(ds.splits.test)}


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, device="auto")
    ap.add_argument("--data", required=True, help="Flowers-102 in the seeds' layout (train/ valid/ test/, official_split/)")
    ap.add_argument("--arch", default="vit_l16")
    ap.add_argument("--epochs", type=int, default=2, help="training epochs per method (the first is warm-up)")
    ap.add_argument("--max-per-class", type=int, default=None, help="fewer images (a CPU check of the code path)")
    args = ap.parse_args(argv)
    device, t0 = machine.resolve_device(args.device), time.time()
    with tempfile.TemporaryDirectory() as tmp:
        layout = data.flowers102_layout(args.data, Path(tmp) / "torchvision")
        checkpoint = random_checkpoint(args.arch, Path(tmp), 224 if args.arch != "tiny" else 32)
        models.load_processor(models.ModelSettings(None, torch.bfloat16, "sdpa",
                                                   {"image_size": 224 if args.arch != "tiny" else 32})
                              ).save_pretrained(str(checkpoint))
        settings = models.ModelSettings(str(checkpoint), torch.bfloat16, "sdpa")
        cfg = copy.deepcopy(config.defaults()["data"])
        cfg.update(source="flowers102", root=str(layout), pipeline="gpu", max_per_class=args.max_per_class)
        ds = data.for_checkpoint(cfg, 0, checkpoint)
        named = {"training": training_rows(settings, ds, device, args.epochs)}
        write(args, "vitl16_cost", t0, tables(**named))
        named["accuracy_pass"] = accuracy_pass(checkpoint, settings, ds, device)
        write(args, "vitl16_cost", t0, tables(**named))
        named["ablation"] = [ablation_cost(checkpoint, settings, ds, device)]
        write(args, "vitl16_cost", t0, tables(**named))
        print(f"ablation wall time: {named['ablation'][0]['ablation_wall_s']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
