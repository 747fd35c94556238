"""ViT-L/16 training steps on one GPU: LoRA, QLoRA and full fine-tuning, eager, compiled and CUDA-graphed,
with where a step's time goes.

    python benchmarks/run.py train_step                                   # ViT-L/16, batch 32, every path
    python benchmarks/run.py train_step --arch tiny --device cpu --steps 3 --paths eager   # the code path, on a CPU
    python benchmarks/run.py train_step --methods lora --case "" --case finetune.lora.dropout=0   # the defaults, then one changed

Paths: `eager`; `compile` (torch.compile of the whole model); `cuda_graph` (the step replayed as one CUDA graph);
`blocks` (each encoder block compiled in place: finetune.compile: blocks); `blocks_graph` (both).

Each row is one (method, path) trained by vitlab's own loop (`training.train`, as `vitlab run` trains)
on batches already on the device (random pixels and labels: a step's cost does not depend on them,
and the data pipeline is measured elsewhere): images/s of the second epoch (the first compiles,
captures and warms up), peak memory, and the model FLOP rate, counted as 2 x matmul parameters x tokens
per image for the forward and x3 for a step that computes weight gradients (full) or x2 for one that
does not (LoRA's and QLoRA's frozen base: only the input gradients and the adapters'), against the dense
bf16 peak. Then a third, profiled epoch of the same step: the `kernels` table groups its CUDA time
into GEMMs, attention, optimizer, norms and the rest (elementwise, casts, copies), and `top_kernels` names
the kernels that take most of it. A combination
vitlab refuses (QLoRA under a CUDA graph) is a row that says so, and so is one that fails (its error).
"""
from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from common import ARCHS, dense_peaks, parser, random_checkpoint, tables, write

from vitlab import config, finetune, models, training
from vitlab.errors import ParamsError

PATHS = {"eager": {}, "compile": {"compile": True}, "cuda_graph": {"cuda_graph": True}, "blocks": {"compile": "blocks"},
         "blocks_graph": {"compile": "blocks", "cuda_graph": True}}
# First match wins: cuDNN's attention kernels are named sdpa_sm90_..., which the GEMM pattern would take.
KERNELS = [("attention", r"flash|fmha|attention|sdpa"), ("gemm", r"gemm|cutlass|sm90_|sm80_|cublas|matmul|nvjet"),
           ("optimizer", r"adam|foreach|multi_tensor"), ("norm", r"layer_norm|layernorm|rms")]


def _batches(batch: int, steps: int, size: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, 102, (batch,), generator=gen).to(device)
    return [(x, y)] * steps


def _flops_per_image(config) -> float:
    """The forward's matmul FLOPs per image from the ViT's geometry: q/k/v/o and the MLP per token and
    layer, attention's two token-by-token products, the patch embedding (the classifier is negligible)."""
    h, mlp, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    patches = (config.image_size // config.patch_size) ** 2
    tokens = patches + 1
    per_layer = 2 * tokens * (4 * h * h + 2 * h * mlp) + 2 * 2 * tokens * tokens * h
    return layers * per_layer + 2 * patches * 3 * config.patch_size ** 2 * h


def _device_kernels(prof) -> list[tuple[float, str, int]]:
    """(ms, name, calls) of each GPU kernel and copy: only the device's own events, since a CPU-side event
    (an autograd node, a compiled region, an aten op) carries the device time of the kernels under it,
    and summing both counts that time twice."""
    return sorted(((e.device_time_total / 1e3, e.key, e.count) for e in prof.key_averages()
                   if e.device_type == DeviceType.CUDA and e.device_time_total > 0), reverse=True)


def _group(kernel: str) -> str:
    return next((g for g, pattern in KERNELS if re.search(pattern, kernel, re.IGNORECASE)), "other")


def _kernels(prof, steps: int) -> list[dict]:
    totals: dict[str, float] = {}
    for ms, key, _ in _device_kernels(prof):
        totals[_group(key)] = totals.get(_group(key), 0.0) + ms
    whole = sum(totals.values()) or 1.0
    return [{"group": g, "ms_per_step": ms / steps, "share": ms / whole} for g, ms in sorted(totals.items())]


def _top_kernels(prof, steps: int, n: int = 12) -> list[dict]:
    """The n GPU kernels with the most device time per step, each with its group."""
    return [{"kernel": key[:160], "group": _group(key), "ms_per_step": ms / steps, "calls_per_step": count / steps}
            for ms, key, count in _device_kernels(prof)[:n]]


def measure(checkpoint: Path, method: str, path: str, batch: int, steps: int, device: torch.device,
            sets: list[str] = ()) -> tuple[dict, list, list]:
    """One (method, path) of the random-init `checkpoint`, with the finetune settings `sets` changed:
    its row, its kernel groups and its top kernels."""
    row = {"path": path, "method": method, "model": checkpoint.name, "batch_size": batch, "set": " ".join(sets)}
    ft = {**config.merge(config.defaults(), config.parse_set(list(sets)))["finetune"], "method": method, "epochs": 2,
          "batch_size": batch, "warmup_ratio": 0.0, **PATHS[path]}
    try:
        training.Finetune.of(ft)
    except ParamsError as e:
        return {**row, "refused": str(e)}, [], []
    if ft["cuda_graph"] and device.type != "cuda":
        return {**row, "refused": "a CUDA graph needs a CUDA GPU"}, [], []
    settings = models.ModelSettings(id=str(checkpoint), dtype=torch.bfloat16, attention="sdpa")
    torch.manual_seed(0)
    model = finetune.build(settings, ft, [str(i) for i in range(102)], device)
    trainable, total = finetune.trainable_parameters(model)
    size = model.config.image_size
    batches = _batches(batch, steps, size, device)
    history = training.train(model, batches, batches[:1], ft, device, num_classes=102)
    img_s = history[-1]["train_img_s"]
    factor = 3 if method == "full" else 2
    tflops = img_s * factor * _flops_per_image(model.config) / 1e12
    peaks = dense_peaks(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    row.update(img_s=img_s, peak_vram_mb=history[-1]["peak_vram_mb"], trainable_params=trainable, total_params=total,
               model_tflops=tflops, pct_bf16_dense_peak=100 * tflops / peaks[0] if peaks else None)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        training.train(model, batches, batches[:1], {**ft, "epochs": 1}, device, num_classes=102)
    named = {"path": path, "method": method, "set": row["set"]}
    kernels = [{**named, **k} for k in _kernels(prof, steps)] if device.type == "cuda" else []
    top = [{**named, **k} for k in _top_kernels(prof, steps)] if device.type == "cuda" else []
    print(f"{method:6s} {path:12s} {row['set']} {img_s:8.1f} img/s  {tflops:6.1f} TFLOP/s  peak {history[-1]['peak_vram_mb']} MB", flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row, kernels, top


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--arch", default="vit_l16", choices=sorted(ARCHS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="training steps per epoch")
    ap.add_argument("--methods", default="lora,qlora,full")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--case", action="append", metavar="finetune.KEY=VALUE[,...]",
                    help="finetune settings changed for a set of rows (every method and path), recorded in each "
                         "row's `set`; repeat it to measure several in one process (\"\": the defaults; default: that alone)")
    args = ap.parse_args(argv)
    cases = [[s for s in case.split(",") if s] for case in (args.case or [""])]
    outside = [s for case in cases for s in case if not s.startswith("finetune.")]
    if outside:
        ap.error(f"--case takes finetune settings only: {outside}")
    try:  # an unknown key is refused before any model is built
        for case in cases:
            config.merge(config.defaults(), config.parse_set(case))
    except ParamsError as e:
        ap.error(str(e))
    device, t0 = torch.device(args.device), time.time()
    rows, kernels, top = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = random_checkpoint(args.arch, Path(tmp), 224 if args.arch != "tiny" else 32)
        for method, case, path in ((m, c, p) for m in args.methods.split(",") for c in cases for p in args.paths.split(",")):
            try:
                row, groups, names = measure(checkpoint, method, path, args.batch, args.steps, device, case)
            except Exception as e:  # noqa: BLE001 (a path that fails is a row saying how, the others still run)
                row, groups, names = {"path": path, "method": method, "model": args.arch, "batch_size": args.batch,
                                      "set": " ".join(case),
                                      "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}, [], []
                print(f"{method:6s} {path:12s} FAILED {row['error']}", flush=True)
                torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            kernels += groups
            top += names
            out = write(args, "train_step", t0, tables(rows=rows, kernels=kernels, top_kernels=top),
                        weights="random init (seed 0)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
