"""Which layers can be quantized: sweep keep-in-16-bit configurations and measure the drift.

Each configuration quantizes the merged checkpoint with some block linears kept in 16-bit and
is scored against the 16-bit model on the same images: top-1, top-5 and the KL divergence of
its logits (far less noisy than accuracy on a few hundred images).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import infer, metrics, models, quant

QUANT_TYPES = {"nf4": {"bits": 4, "type": "nf4"}, "fp4": {"bits": 4, "type": "fp4"}, "int8": {"bits": 8}}


def quant_config(base: dict[str, Any], name: str) -> dict[str, Any]:
    if name not in QUANT_TYPES:
        raise ValueError(f"unknown ablation quant type '{name}'; choose from {list(QUANT_TYPES)}")
    return {**copy.deepcopy(base), **QUANT_TYPES[name]}


def configurations(n_layers: int) -> list[tuple[str, int | None, list | str]]:
    """(name, layer, keep_16bit) for: everything quantized, each layer kept alone, first/last,
    attention only in 16-bit, MLP only in 16-bit."""
    configs: list[tuple[str, int | None, list | str]] = [("all quantized", None, [])]
    configs += [(f"keep layer {i}", i, [i]) for i in range(n_layers)]
    configs += [("keep first+last", None, "first_last"), ("keep attention", None, ["attention"]),
                ("keep mlp", None, ["mlp"])]
    return configs


def sweep(checkpoint: str | Path, model_cfg: dict[str, Any], quant_cfg: dict[str, Any], quant_types: Iterable[str],
          batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device, seed: int = 0,
          configs: list[tuple[str, int | None, list | str]] | None = None) -> list[dict]:
    """Score each (name, layer, keep_16bit) configuration (default: `configurations`) for every quant
    type against the 16-bit model."""
    dtype = models.DTYPES[model_cfg["dtype"]]
    attn = model_cfg["attention"]
    base = models.load_checkpoint(checkpoint, dtype, attn, device)
    ref, labels = infer.predict(base, batches, device, attn, desc="16-bit")
    n_layers = len(models.encoder_layers(base)[1])
    base_bytes = models.parameter_bytes(base)
    rows = [_row("16-bit", None, "16-bit", ref, ref, labels, base_bytes, seed)]
    for qname in quant_types:
        qcfg = quant_config(quant_cfg, qname)
        for name, layer, keep in tqdm(configs or configurations(n_layers), desc=qname, leave=False):
            kept = quant.resolve_keep(base, keep)
            model = quant.quantize(checkpoint, qcfg, model_cfg, device, kept)
            logits, _ = infer.predict(model, batches, device, attn, desc=name)
            rows.append(_row(qname, layer, name, ref, logits, labels, models.parameter_bytes(model), seed,
                             kept_modules=len(kept)))
            del model
    return rows


def _row(qname: str, layer: int | None, name: str, ref: np.ndarray, logits: np.ndarray, labels: np.ndarray,
         footprint: int, seed: int, kept_modules: int = 0) -> dict:
    scores = metrics.classification(logits, labels, logits.shape[1])
    lo, hi = metrics.bootstrap_ci(logits.argmax(1) == labels, seed=seed)
    return {"quant": qname, "config": name, "layer": layer, "kept_modules": kept_modules, "top1": scores["top1"],
            "top1_lo": lo, "top1_hi": hi, "top5": scores["top5"], "kl": metrics.kl_divergence(ref, logits),
            "footprint_mb": footprint / 2**20}


def choose_keep(rows: list[dict], quant_name: str, budget_mb: float) -> dict:
    """Layers to keep in 16-bit under a memory budget, greedily by measured KL saved per MB.

    From the sweep's rows for `quant_name`: keeping layer i alone saves kl(all quantized) - kl(keep i)
    and costs footprint(keep i) - footprint(all quantized). Savings are assumed to add up across
    layers; the estimate is reported, and the choice is to be verified on held-out data.
    """
    mine = [r for r in rows if r["quant"] == quant_name]
    base = next((r for r in mine if r["config"] == "all quantized"), None)
    if base is None:
        raise ValueError(f"no 'all quantized' row for '{quant_name}': run sweep with that quant type first")
    if budget_mb < base["footprint_mb"]:
        raise ValueError(f"budget {budget_mb:.3f} MB is below the fully quantized model ({base['footprint_mb']:.3f} MB)")
    candidates = []
    for r in mine:
        if r["layer"] is None:
            continue
        gain, cost = base["kl"] - r["kl"], r["footprint_mb"] - base["footprint_mb"]
        if gain > 0 and cost > 0:
            candidates.append((gain / cost, int(r["layer"]), gain, cost))
    keep, footprint, kl = [], base["footprint_mb"], base["kl"]
    for _, layer, gain, cost in sorted(candidates, reverse=True):
        if footprint + cost <= budget_mb:
            keep.append(layer)
            footprint += cost
            kl -= gain
    return {"quant": quant_name, "keep_16bit": sorted(keep), "est_footprint_mb": footprint,
            "est_kl": max(kl, 0.0), "budget_mb": budget_mb}


def heuristics(n_layers: int) -> list[tuple[str, int | None, list | str]]:
    """The seeds' hand-picked configurations: first and last layer kept; layer 21 kept (ViT-L/16)."""
    out: list[tuple[str, int | None, list | str]] = [("all quantized", None, []), ("keep first+last", None, "first_last")]
    return out + ([("keep layer 21", 21, [21])] if n_layers > 21 else [])
