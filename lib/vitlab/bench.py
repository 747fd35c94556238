"""Latency, throughput, memory and a profiler breakdown of a model's forward pass.

One function per measurement, each returning one flat row or a table. Timings: warm-up iterations
first, then one timing per iteration (CUDA events on a GPU, perf_counter on the CPU); medians and tails.
"""
from __future__ import annotations

import os
import re
import resource
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from . import metrics, models
from .infer import input_dtype

COMPONENTS = ("patch_embed", "attention", "mlp", "norm", "classifier")
# bitsandbytes kernels that turn packed weights back into 16-bit (4-bit) or scale int8 results.
DEQUANT_KERNEL = re.compile(r"dequant|kDequant|int8_vectorwise|kInt8", re.IGNORECASE)


def random_batch(model: nn.Module, batch_size: int, image_size: int, device: torch.device) -> torch.Tensor:
    """Pixel values for timing: the forward's cost does not depend on their content."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, 3, image_size, image_size, generator=gen).to(device, input_dtype(model))


@torch.inference_mode()
def time_forward(model: nn.Module, x: torch.Tensor, warmup: int, iters: int) -> list[float]:
    """Per-iteration forward latency in ms, after `warmup` untimed iterations."""
    cuda = x.device.type == "cuda"
    for _ in range(warmup):
        model(pixel_values=x)
    if cuda:
        torch.cuda.synchronize(x.device)
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(pixel_values=x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            model(pixel_values=x)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def latency(model: nn.Module, batch_size: int, image_size: int, device: torch.device, warmup: int,
            iters: int) -> dict[str, Any]:
    """One flat row for one batch size: latency statistics, throughput (img/s at the median) and peak
    memory: on a GPU the most allocated during these forwards; on the CPU the process's peak resident
    set so far (`peak_mem_kind` says which)."""
    x = random_batch(model, batch_size, image_size, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    stats = metrics.latency_stats(time_forward(model, x, warmup, iters))
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, "process peak RSS"  # KiB on Linux
    # The machine's load while timing: a wide spread on a busy machine is noise, not the model.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"batch_size": batch_size, **stats, "throughput_img_s": batch_size / stats["p50_ms"] * 1e3,
            "peak_mem_mb": peak, "peak_mem_kind": kind, "load_1min": load, "cpus": os.cpu_count()}


def _quiet_kineto() -> None:
    # Kineto logs "gpuGetDeviceCount failed" as an ERROR whenever a CUDA build of torch profiles on a
    # machine without a GPU; it is harmless and reads like a failure in the executed notebooks. It
    # reads this when the profiler first starts, so setting it here, before the first trace, suffices.
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")


def _annotate(model: nn.Module) -> list:
    """Wrap the outermost module of each component in a profiler range `vitlab::<component>`."""
    handles, covered = [], []
    for name, module in model.named_modules():
        comp = models.component(name) if name else "other"
        if comp == "other" or any(name.startswith(c + ".") for c in covered):
            continue
        covered.append(name)
        label = f"vitlab::{comp}"

        def pre(mod, args, label=label):
            mod._vitlab_range = record_function(label)
            mod._vitlab_range.__enter__()

        def post(mod, args, out):
            mod._vitlab_range.__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


@torch.inference_mode()
def profile_components(model: nn.Module, x: torch.Tensor, iters: int,
                       trace_path: str | Path | None = None) -> pd.DataFrame:
    """Forward time per component (device time on a GPU, CPU time otherwise), averaged over `iters`.

    `other` is what no component covers (residual adds, dropout, reshapes); the last row, on a GPU,
    is bitsandbytes' (de)quantisation kernels, already counted inside their component.
    """
    cuda = x.device.type == "cuda"
    _quiet_kineto()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    model(pixel_values=x)  # warm-up outside the trace
    handles = _annotate(model)
    try:
        with profile(activities=activities) as prof:
            for _ in range(iters):
                with record_function("vitlab::forward"):
                    model(pixel_values=x)
            if cuda:
                torch.cuda.synchronize(x.device)
    finally:
        for h in handles:
            h.remove()
    if trace_path is not None:
        prof.export_chrome_trace(str(trace_path))
    # Only CPU-side ranges: key_averages() would merge in the GPU-timeline copy of each range (its
    # wall span, gaps included) and count it twice. A CPU range's device time sums its kernels.
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type != DeviceType.CPU:
            continue
        if event.name.startswith("vitlab::"):
            totals[event.name.removeprefix("vitlab::")] += event.device_time_total if cuda else event.cpu_time_total
        if cuda:
            totals["dequant"] += sum(k.duration for k in event.kernels if DEQUANT_KERNEL.search(k.name))
    forward = totals.pop("forward")
    rows = [{"component": c, "time_ms": totals.get(c, 0.0) / iters / 1e3} for c in COMPONENTS]
    rows.append({"component": "other", "time_ms": max(forward - sum(totals.get(c, 0.0) for c in COMPONENTS), 0) / iters / 1e3})
    table = pd.DataFrame(rows)
    table["share"] = table["time_ms"] / (forward / iters / 1e3)
    if totals.get("dequant"):
        dq = totals["dequant"] / iters / 1e3
        table = pd.concat([table, pd.DataFrame([{"component": "bnb (de)quantisation kernels (within the above)", "time_ms": dq,
                                                  "share": dq / (forward / iters / 1e3)}])], ignore_index=True)
    table.attrs["forward_ms"] = forward / iters / 1e3
    table.attrs["clock"] = "device" if cuda else "cpu"
    return table


@torch.inference_mode()
def kernel_table(model: nn.Module, x: torch.Tensor, iters: int = 3, top: int = 12) -> pd.DataFrame:
    """The GPU kernels of a forward pass by total device time per forward: what a speed-up must beat."""
    _quiet_kineto()
    model(pixel_values=x)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            model(pixel_values=x)
        torch.cuda.synchronize(x.device)
    rows = [{"kernel": e.key[:90], "ms_per_forward": e.self_device_time_total / iters / 1e3,
             "calls_per_forward": e.count / iters}
            for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    table = pd.DataFrame(rows).sort_values("ms_per_forward", ascending=False)
    table["share"] = table["ms_per_forward"] / table["ms_per_forward"].sum()
    return table.head(top).reset_index(drop=True)
