"""Forward passes over data: logits for a loader, top-k for one image."""
from __future__ import annotations

import time
from typing import Iterable

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from . import speed


PROGRESS_EVERY_S = 10.0


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype pixel values must have: that of the patch embedding (16-bit or float32)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


@torch.inference_mode()
def predict(model: nn.Module, batches: Iterable, device: torch.device, desc: str = "predict",
            progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Float32 logits and integer labels over every batch of (pixel_values, labels). A compiled or
    graph-replayed model gets a short last batch padded to the first batch's size: one shape, no
    recompile or new capture for a batch that is run once."""
    model.eval()
    dtype = input_dtype(model)
    static = speed.unwrapped(model) is not model
    logits, labels, size = [], [], None
    shown, total = time.monotonic(), len(batches) if hasattr(batches, "__len__") else "?"
    for i, (x, y) in enumerate(tqdm(batches, desc=desc, leave=False, disable=not progress), 1):
        n, size = len(x), size or len(x)
        if static and n < size:
            x = torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])])
        # copy under static: every input then made the same way (an inference tensor), or it recompiles anyway
        out = model(pixel_values=x.to(device, dtype, copy=static)).logits[:n]
        logits.append(out.float().cpu())
        labels.append(torch.as_tensor(y).cpu())
        if progress and time.monotonic() - shown > PROGRESS_EVERY_S:
            # A line now and then for the terminal of `vitlab run` (tqdm draws a widget in a notebook).
            print(f"{desc}: {i}/{total} batches", flush=True)
            shown = time.monotonic()
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


@torch.inference_mode()
def top_k(model: nn.Module, image: Image.Image, transform, class_names: list[str], device: torch.device,
          k: int = 5) -> tuple[list[tuple[str, float]], float]:
    """The k most probable classes of one image with their probabilities, and the forward's latency in ms."""
    model.eval()
    x = transform(image).unsqueeze(0).to(device, input_dtype(model))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    logits = model(pixel_values=x).logits
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ms = (time.perf_counter() - start) * 1e3
    probs = logits.float().softmax(-1)[0].cpu()
    values, idx = probs.topk(min(k, len(class_names)))
    return [(class_names[i], float(v)) for v, i in zip(values, idx)], ms
