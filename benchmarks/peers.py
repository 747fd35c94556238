"""vitlab's speed paths side by side with what a user would pick instead, in one process on one GPU.

    python benchmarks/peers.py speed --paths stock,timm,timm_compile,timm_compile_fp8 --tag a --out DIR   # DIR/peers_h200_a.json
    python benchmarks/peers.py speed --paths stock,vitlab_compile,vitlab_fp8 ... --tag b --out DIR
    python benchmarks/peers.py accuracy --checkpoint CKPT --data DIR --paths ... --out DIR   # DIR/peers_h200_accuracy.json
    python benchmarks/peers.py collect DIR/peers_h200_a.json DIR/peers_h200_b.json DIR/peers_h200_accuracy.json  # -> results/peers_h200.json

`speed`: a random-init ViT-L/16 (224 px, 102 classes; latency does not depend on the weights), the
same weights in every path (timm's VisionTransformer gets them converted, so its logits are
comparable), each path at batch 1, 32 and 256: p50/p95 of CUDA-event timings after warm-up (and after
compilation), img/s, achieved TFLOP/s (matmul FLOPs counted from the shapes) and its share of the
GPU's dense bf16 and FP8 peaks, logits drift against stock, and the top kernels at the largest and smallest batch.
`stock` runs first in every process: ratios are only taken within one process.
`accuracy`: every path on the test split of a trained checkpoint, paired bootstrap against stock.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import tempfile
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch
from common import by_table, dense_peaks, device_tag, parser, quant_settings, random_checkpoint, settings, tables, write
from torch import nn

from vitlab import bench, config, data, evaluate, infer, machine, metrics, models, quant, speed

class Timm(nn.Module):
    """A timm model called the way vitlab calls a transformers one: model(pixel_values=x).logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.model(pixel_values))


def timm_from_hf(hf: nn.Module) -> nn.Module:
    """timm's VisionTransformer with the weights of a transformers ViT (q/k/v concatenated into qkv)."""
    import timm.models.vision_transformer as tv

    cfg = hf.config
    vit = tv.VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.hidden_size,
                               depth=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
                               mlp_ratio=cfg.intermediate_size / cfg.hidden_size, num_classes=cfg.num_labels,
                               qkv_bias=cfg.qkv_bias, norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps))
    sd, e = hf.state_dict(), "vit.embeddings."
    new = {"cls_token": sd[e + "cls_token"], "pos_embed": sd[e + "position_embeddings"],
           "patch_embed.proj.weight": sd[e + "patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd[e + "patch_embeddings.projection.bias"],
           "norm.weight": sd["vit.layernorm.weight"], "norm.bias": sd["vit.layernorm.bias"],
           "head.weight": sd["classifier.weight"], "head.bias": sd["classifier.bias"]}
    for i in range(cfg.num_hidden_layers):
        h, t = f"vit.layers.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            new[t + f"attn.qkv.{p}"] = torch.cat([sd[h + f"attention.{x}_proj.{p}"] for x in "qkv"])
            new.update({t + f"norm1.{p}": sd[h + f"layernorm_before.{p}"], t + f"norm2.{p}": sd[h + f"layernorm_after.{p}"],
                        t + f"attn.proj.{p}": sd[h + f"attention.o_proj.{p}"], t + f"mlp.fc1.{p}": sd[h + f"mlp.fc1.{p}"],
                        t + f"mlp.fc2.{p}": sd[h + f"mlp.fc2.{p}"]})
    vit.load_state_dict(new)
    return vit.to(next(hf.parameters()).device, next(hf.parameters()).dtype).eval()


def torchao_fp8_rows(model: nn.Module) -> nn.Module:
    """torchao's dynamic FP8 (per-row scales) on every linear inside the blocks: the peers' FP8 recipe."""
    import torchao.quantization as tq
    tq.quantize_(model, tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerRow()),
                 filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and (".blocks." in f".{fqn}" or ".layers." in f".{fqn}"))
    return model


def hf(ckpt: Path, device: torch.device) -> nn.Module:
    return models.load_checkpoint(ckpt, settings(), device)


def vitlab(ckpt: Path, device: torch.device, calibration, **changes) -> nn.Module:
    """vitlab's own speed settings on the checkpoint, as `evaluate` applies them. On a CPU (the accuracy
    pass only) the same quantized linears run eager on cuBLAS's numerics' stand-in, torch._scaled_mm."""
    if device.type == "cpu":
        changes = {**changes, "compile": "none", "cuda_graph": False, "fp8_gemm": "cublas"}
    return speed.apply(hf(ckpt, device), speed.SpeedSettings(**changes), calibration)


def shipped(variant: str):
    """A shipped variant's speed settings, read from params/<variant>.yaml as `vitlab run` reads them (a
    16-bit base: the variants whose speed paths rewrite the linears themselves)."""
    params = config.resolve(config.PARAMS_DIR / f"{variant}.yaml")
    if params["quant"]["bits"] != 16:
        raise ValueError(f"params/{variant}.yaml quantizes with bitsandbytes first; peers times 16-bit bases")
    return lambda c, d, cal: vitlab(c, d, cal, **dataclasses.asdict(speed.SpeedSettings.from_params(params["speed"])))


# vitlab's fastest settings short of the low-bit linears: fused q/k/v, patch matmul, whole-model compile, CUDA graph.
FAST = {"fuse_qkv": True, "patch_matmul": True, "compile": "model", "cuda_graph": True}
AUTOTUNE = {**FAST, "compile_mode": "max-autotune"}

# name -> (vitlab's?, weight bits, build(checkpoint, device, calibration batches))
PATHS = {
    "stock": (False, 16, lambda c, d, cal: hf(c, d)),
    "timm": (False, 16, lambda c, d, cal: Timm(timm_from_hf(hf(c, d)))),
    "timm_compile": (False, 16, lambda c, d, cal: torch.compile(Timm(timm_from_hf(hf(c, d))))),
    "timm_compile_fp8": (False, 8, lambda c, d, cal: torch.compile(Timm(torchao_fp8_rows(timm_from_hf(hf(c, d)))))),
    "vitlab_graph": (True, 16, shipped("bf16_graph")),
    "vitlab_compile": (True, 16, lambda c, d, cal: vitlab(c, d, cal, fuse_qkv=True, compile="model")),
    "vitlab_compile_graph": (True, 16, lambda c, d, cal: vitlab(c, d, cal, fuse_qkv=True, compile="model", cuda_graph=True)),
    "vitlab_fp8_torchao_graph": (True, 8, lambda c, d, cal: vitlab(c, d, cal, fuse_qkv=True, torchao="fp8", compile="model",
                                                                    cuda_graph=True)),
    "vitlab_fp8_torchao": (True, 8, lambda c, d, cal: vitlab(c, d, cal, fuse_qkv=True, torchao="fp8", compile="model")),
    "vitlab_fp8": (True, 8, lambda c, d, cal: vitlab(c, d, cal, fuse_qkv=True, fp8="static", compile="model")),
    "vitlab_fp8_graph": (True, 8, lambda c, d, cal: vitlab(c, d, cal, fuse_qkv=True, fp8="static", compile="model",
                                                            cuda_graph=True)),
    "vitlab_bf16_fast": (True, 16, lambda c, d, cal: vitlab(c, d, cal, **FAST)),
    "vitlab_bf16_autotune": (True, 16, lambda c, d, cal: vitlab(c, d, cal, **AUTOTUNE)),
    "vitlab_fp8_fast": (True, 8, lambda c, d, cal: vitlab(c, d, cal, fp8="static", **FAST)),
    "vitlab_fp8_autotune": (True, 8, lambda c, d, cal: vitlab(c, d, cal, fp8="static", **AUTOTUNE)),
    "vitlab_fp8_triton": (True, 8, shipped("fp8_fused")),  # the names the results carry since #12
    "vitlab_w4a8_triton": (True, 4, shipped("w4a8_fused")),
    "vitlab_w4a8": (True, 4, lambda c, d, cal: vitlab(c, d, cal, int4="w4a8", **FAST)),
    "vitlab_w4a8_autotune": (True, 4, lambda c, d, cal: vitlab(c, d, cal, int4="w4a8", **AUTOTUNE)),
    "vitlab_w4a16": (True, 4, lambda c, d, cal: vitlab(c, d, cal, int4="w4a16", **FAST)),
    "vitlab_w4a16_autotune": (True, 4, lambda c, d, cal: vitlab(c, d, cal, int4="w4a16", **AUTOTUNE)),
    "nf4_graph": (True, 4, lambda c, d, cal: speed.CudaGraphed(quant.quantize(c, quant_settings(4, "nf4"), settings(), d))),
    "int4wo_graph": (True, 4, lambda c, d, cal: vitlab(c, d, cal, fuse_qkv=True, torchao="int4wo", compile="model",
                                                        cuda_graph=True)),
}


def matmul_flops(cfg, image_size: int) -> float:
    """Multiply-add FLOPs of one image's forward: patch embedding, the block linears, attention's two
    batched matmuls, the classifier (layer norms, softmax and GELU are not tensor-core work)."""
    n_patches = (image_size // cfg.patch_size) ** 2
    n, d, f = n_patches + 1, cfg.hidden_size, cfg.intermediate_size
    per_layer = 2 * n * (4 * d * d + 2 * d * f) + 2 * 2 * n * n * d
    return 2 * n_patches * 3 * cfg.patch_size ** 2 * d + cfg.num_hidden_layers * per_layer + 2 * d * cfg.num_labels


def measure(name: str, model: nn.Module, sizes: list[int], flops: float, peaks, ref, x_check, warmup: int, iters: int):
    """Rows (one per batch size) for one path, its logits on the check batch and its kernel table."""
    with torch.inference_mode():
        got = model(pixel_values=x_check).logits.float().cpu().numpy()
    vitlab_path, bits, _ = PATHS[name]
    label = {"path": name, "vitlab": vitlab_path, "weight_bits": bits,
             **(evaluate.drift(ref, got) if ref is not None else {})}
    rows = []
    for bs in sizes:
        r = bench.latency(model, bs, 224, x_check.device, warmup, iters)
        tflops = flops * bs / (r["p50_ms"] / 1e3) / 1e12
        rows.append({**label, "batch_size": bs, "p50_ms": r["p50_ms"], "p95_ms": r["p95_ms"], "img_s": r["throughput_img_s"],
                     "peak_mem_mb": r["peak_mem_mb"], "tflops": tflops,
                     "pct_bf16_peak": 100 * tflops / peaks[0] if peaks else None,
                     "pct_fp8_peak": 100 * tflops / peaks[1] if peaks else None})
        print(f"{name} bs {bs}: p50 {r['p50_ms']:.3f} ms, {r['throughput_img_s']:.0f} img/s, {tflops:.0f} TFLOP/s", flush=True)
    kernels = [bench.kernel_table(model, bench.random_batch(model, bs, 224, x_check.device), top=25).assign(path=name, batch_size=bs)
               for bs in sorted({max(sizes), min(sizes)}, reverse=True)]
    return rows, got, pd.concat(kernels).to_dict("records")


def run_speed(args) -> None:
    device = machine.resolve_device("cuda")
    for setting in args.inductor:  # e.g. coordinate_descent_tuning=true: Inductor settings for every compiled path
        key, value = setting.split("=")
        setattr(torch._inductor.config, key, {"true": True, "false": False}.get(value.lower(), value))
    torch.manual_seed(0)
    names, sizes, t0 = args.paths.split(","), [int(b) for b in args.batch_sizes.split(",")], time.time()
    if names[0] != "stock":
        names = ["stock", *names]  # every ratio is against stock measured in the same process
    peaks = dense_peaks(torch.cuda.get_device_name(device))
    rows, kernels, ref, model, measured = [], [], None, None, None
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = random_checkpoint(args.arch, Path(tmp))
        cfg = models.load_checkpoint(ckpt, settings(), torch.device("cpu")).config
        flops = matmul_flops(cfg, 224)
        gen = torch.Generator().manual_seed(1)
        # The drift check runs at one of the timed batch sizes: a compiled path compiles (and autotunes) no extra shape.
        x_check = torch.randn(min(32, max(sizes)), 3, 224, 224, generator=gen).to(device, torch.bfloat16)
        calibration = [(torch.randn(32, 3, 224, 224, generator=gen), None) for _ in range(2)]
        for name in names:
            t1 = time.time()
            try:
                # A "_graph" path right after its base replays the base's compiled model: no second compile.
                base = name.removesuffix("_graph")
                model = (speed.CudaGraphed(model) if name.endswith("_graph") and measured == base
                         else PATHS[name][2](ckpt, device, calibration))
                measured = name
                got_rows, got, got_kernels = measure(name, model, sizes, flops, peaks, ref, x_check, args.warmup, args.iters)
                ref = got if ref is None else ref
                rows += got_rows
                kernels += got_kernels
            except Exception as e:  # one path that cannot run must not hide the others
                rows.append({"path": name, "error": f"{type(e).__name__}: {str(e)[:400]}"})
                print(rows[-1], flush=True)
            print(f"{name}: {time.time() - t1:.0f} s (build, compile, timing)", flush=True)
            if f"{name}_graph" not in names:
                model, measured = None, None
                gc.collect()
                torch.cuda.empty_cache()
                torch._dynamo.reset()
            stock = {r["batch_size"]: r["img_s"] for r in rows if r.get("path") == "stock"}
            for r in rows:
                if "img_s" in r:
                    r["ratio_vs_stock"] = r["img_s"] / stock[r["batch_size"]]
            write(args, "peers", t0, tables(rows=rows, kernels=kernels),
                  context={"arch": args.arch, "matmul_gflop_per_image": flops / 1e9, "peaks_tflops": peaks})
    table = pd.DataFrame([r for r in rows if "img_s" in r])
    print(table.pivot_table(index="path", columns="batch_size", values=["p50_ms", "ratio_vs_stock"], sort=False).round(3))


def run_accuracy(args) -> None:
    """Every path on the test split of a trained checkpoint; top-1 and the paired difference to stock."""
    device = machine.resolve_device(args.device)
    cfg = {"source": "imagefolder", "root": args.data, "pipeline": "pil", "num_workers": 8, "max_per_class": None,
           "max_samples": None, "classes": "all"}
    from vitlab import config
    ds = data.for_checkpoint({**config.defaults()["data"], **cfg}, 0, args.checkpoint)
    test = list(ds.loader("test", 64))
    calibration = list(ds.loader("valid", 64))[:4]
    rows, t0, ref_correct, ref_logits = [], time.time(), None, None
    for name in ["stock", *[n for n in args.paths.split(",") if n != "stock"]]:
        try:
            model = PATHS[name][2](Path(args.checkpoint), device, calibration)
            logits, labels = infer.predict(model, test, device, desc=name, progress=False)
        except Exception as e:
            rows.append({"path": name, "error": f"{type(e).__name__}: {str(e)[:400]}"})
            print(rows[-1], flush=True)
            continue
        correct = logits.argmax(1) == labels
        ref_correct = correct if ref_correct is None else ref_correct
        ref_logits = logits if ref_logits is None else ref_logits
        diff, lo, hi = metrics.paired_bootstrap_diff(correct, ref_correct)
        rows.append({"path": name, "test_images": len(labels), "top1": float(correct.mean()),
                     "top1_lo": metrics.bootstrap_ci(correct)[0], "top1_hi": metrics.bootstrap_ci(correct)[1],
                     "top1_delta_pt": 100 * diff, "delta_lo_pt": 100 * lo, "delta_hi_pt": 100 * hi,
                     **evaluate.drift(ref_logits, logits)})
        print(rows[-1], flush=True)
        model = None
        torch._dynamo.reset()
        write(args, "peers", t0, rows, f"trained: {args.checkpoint}", part="accuracy")


def collect(args) -> None:
    """One JSON (a row per path and batch size), a markdown table and a figure from the parts."""
    parts = [by_table(json.loads(Path(p).read_text())) for p in args.parts]
    for p in parts:  # the accuracy command's main table is its accuracy
        if p["meta"]["args"]["what"] == "accuracy":
            p["accuracy"], p["rows"] = p.pop("rows"), []
    accuracy = {r["path"]: r for p in parts for r in p.get("accuracy", []) if "top1" in r}
    rows = []
    for i, part in enumerate(p for p in parts if p["rows"]):
        for r in (r for r in part["rows"] if "img_s" in r):
            # Each process timed stock for its own ratios; the first is the stock row, the others say which process.
            path = r["path"] if r["path"] != "stock" or i == 0 else f"stock (process {i + 1})"
            rows.append({**r, "path": path, "process": i + 1, "top1_delta_pt": accuracy.get(r["path"], {}).get("top1_delta_pt")})
    errors = [r for p in parts for r in p.get("rows", []) + p.get("accuracy", []) if "error" in r]
    meta = next(p["meta"] for p in parts if p["rows"])
    out = {"meta": meta, "rows": tables(rows=rows, accuracy=list(accuracy.values()), errors=errors,
                                        kernels=[k for p in parts for k in p.get("kernels", [])])}
    path = Path(args.out) / f"peers_{device_tag(meta['device'])}{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(out, indent=1, default=str))
    print(pd.DataFrame(rows).pivot_table(index=["process", "path"], columns="batch_size", values="ratio_vs_stock",
                                        sort=False).round(3).to_string())
    print("tables and figure: python benchmarks/run.py summarize")


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("what", choices=["speed", "accuracy", "collect"])
    ap.add_argument("parts", nargs="*", help="collect: the JSON files speed and accuracy wrote")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--arch", default="vit_l16")
    ap.add_argument("--batch-sizes", default="256,32,1")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE", help="speed: a torch._inductor.config setting")
    ap.add_argument("--checkpoint", help="accuracy: a trained save_pretrained folder")
    ap.add_argument("--data", help="accuracy: the ImageFolder root it was trained on")
    args = ap.parse_intermixed_args(argv)
    {"speed": run_speed, "accuracy": run_accuracy, "collect": collect}[args.what](args)


if __name__ == "__main__":
    main()
