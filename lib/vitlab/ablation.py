"""Which layers can be quantized: sweep keep-in-16-bit configurations, measure the drift, choose.

Each configuration quantizes the merged checkpoint with some block linears kept in 16-bit and
is scored against the 16-bit model on the same images: top-1, top-5 and the KL divergence of
its logits (far less noisy than accuracy on a few hundred images), each with a bootstrap interval.
The choice walks the layers in order of measured KL saved per MB, measures every prefix of that
order, and picks under a size budget or a top-1 budget; `check_choice` then scores it on held-out
images against the seeds' heuristics with paired bootstrap intervals.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from . import infer, metrics, models, quant

QUANT_TYPES = {"nf4": {"bits": 4, "type": "nf4"}, "fp4": {"bits": 4, "type": "fp4"}, "int8": {"bits": 8}}

Config = tuple[str, "int | None", "list | str"]  # (name, encoder layer or None, keep_16bit)


def quant_config(base: dict[str, Any], name: str) -> dict[str, Any]:
    if name not in QUANT_TYPES:
        raise ValueError(f"unknown ablation quant type '{name}'; choose from {list(QUANT_TYPES)}")
    return {**copy.deepcopy(base), **QUANT_TYPES[name]}


def configurations(n_layers: int) -> list[Config]:
    """Everything quantized, each layer kept alone, first/last, attention only / MLP only in 16-bit."""
    configs: list[Config] = [("all quantized", None, [])]
    configs += [(f"keep layer {i}", i, [i]) for i in range(n_layers)]
    configs += [("keep first+last", None, "first_last"), ("keep attention", None, ["attention"]),
                ("keep mlp", None, ["mlp"])]
    return configs


def heuristics(n_layers: int) -> list[Config]:
    """The seeds' hand-picked configurations: first and last layer kept; layer 21 kept (ViT-L/16)."""
    out: list[Config] = [("all quantized", None, []), ("keep first+last", None, "first_last")]
    return out + ([("keep layer 21", 21, [21])] if n_layers > 21 else [])


class _Scorer:
    """The 16-bit reference on a fixed set of batches, and quantized variants scored against it."""

    def __init__(self, checkpoint: str | Path, model_cfg: dict[str, Any], batches: list, device: torch.device):
        self.checkpoint, self.model_cfg, self.batches, self.device = checkpoint, model_cfg, batches, device
        self.attn = model_cfg["attention"]
        base = models.load_checkpoint(checkpoint, models.DTYPES[model_cfg["dtype"]], self.attn, device)
        self.ref, self.labels = infer.predict(base, batches, device, self.attn, desc="16-bit")
        self.n_layers = len(models.encoder_layers(base)[1])
        self.ref_bytes = models.parameter_bytes(base)
        self._base = base

    def resolve(self, keep: list | str) -> list[str]:
        return quant.resolve_keep(self._base, keep)

    def run(self, qcfg: dict[str, Any], configs: list[Config]) -> Iterator[tuple[Config, list[str], np.ndarray, int]]:
        # One bar over the configurations: a loading and a predict bar per quantized copy would bury the notebook.
        transformers.utils.logging.disable_progress_bar()
        try:
            for name, layer, keep in tqdm(configs, desc=quant.describe(qcfg), leave=False):
                kept = self.resolve(keep)
                model = quant.quantize(self.checkpoint, qcfg, self.model_cfg, self.device, kept)
                logits, _ = infer.predict(model, self.batches, self.device, self.attn, progress=False)
                yield (name, layer, keep), kept, logits, models.parameter_bytes(model)
                del model
        finally:
            transformers.utils.logging.enable_progress_bar()


def _row(qname: str, config: Config, kind: str, scorer: _Scorer, logits: np.ndarray, footprint: int, seed: int,
         kept_modules: int = 0) -> dict:
    name, layer, keep = config
    correct = logits.argmax(1) == scorer.labels
    kl = metrics.kl_per_image(scorer.ref, logits)
    scores = metrics.classification(logits, scorer.labels, logits.shape[1])
    top1_lo, top1_hi = metrics.bootstrap_ci(correct, seed=seed)
    kl_lo, kl_hi = metrics.bootstrap_ci(kl, seed=seed)
    return {"quant": qname, "config": name, "kind": kind, "layer": layer, "keep_16bit": keep,
            "kept_modules": kept_modules, "n": scores["n"], "top1": scores["top1"], "top1_lo": top1_lo, "top1_hi": top1_hi,
            "top5": scores["top5"], "kl": float(kl.mean()), "kl_lo": kl_lo, "kl_hi": kl_hi,
            "footprint_mb": footprint / 2**20}


def _kind(name: str) -> str:
    if name == "all quantized":
        return "all quantized"
    return "single layer" if name.startswith("keep layer") else "group"


def sweep(checkpoint: str | Path, model_cfg: dict[str, Any], quant_cfg: dict[str, Any], quant_types: list[str],
          batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device, seed: int = 0,
          configs: list[Config] | None = None, greedy: bool = True) -> list[dict]:
    """Score each configuration (default: `configurations`) for every quant type against the 16-bit model.

    With `greedy`, also measure every prefix of `greedy_order` (configs "greedy 1", "greedy 2", ...):
    the candidates `choose` picks from.
    """
    scorer = _Scorer(checkpoint, model_cfg, batches, device)
    rows = [_row("16-bit", ("16-bit", None, []), "16-bit", scorer, scorer.ref, scorer.ref_bytes, seed)]
    for qname in quant_types:
        qcfg = quant_config(quant_cfg, qname)
        for config, kept, logits, size in scorer.run(qcfg, configs or configurations(scorer.n_layers)):
            rows.append(_row(qname, config, _kind(config[0]), scorer, logits, size, seed, len(kept)))
        if greedy:
            order = greedy_order(rows, qname)
            path = [(f"greedy {k}", None, sorted(order[:k])) for k in range(1, len(order) + 1)]
            for config, kept, logits, size in scorer.run(qcfg, path):
                rows.append(_row(qname, config, "greedy", scorer, logits, size, seed, len(kept)))
    return rows


def greedy_order(rows: list[dict], quant_name: str) -> list[int]:
    """Encoder layers by measured KL saved per MB of 16-bit weights, best first; layers that save
    nothing are left out. Keeping layer i alone saves kl(all quantized) - kl(keep layer i)."""
    mine = [r for r in rows if r["quant"] == quant_name]
    base = next((r for r in mine if r["config"] == "all quantized"), None)
    if base is None:
        raise ValueError(f"no 'all quantized' row for '{quant_name}': run sweep with that quant type first")
    scored = []
    for r in mine:
        if r["kind"] != "single layer":
            continue
        gain, cost = base["kl"] - r["kl"], r["footprint_mb"] - base["footprint_mb"]
        if gain > 0 and cost > 0:
            scored.append((gain / cost, int(r["layer"])))
    return [layer for _, layer in sorted(scored, reverse=True)]


def choose(rows: list[dict], quant_name: str, budget_mb: float | None = None,
           max_top1_drop: float | None = None) -> dict:
    """The measured greedy configuration (or all quantized) that fits the budgets.

    With `max_top1_drop` (a fraction: 0.005 is half a point): the smallest one whose top-1 is at most
    that far below the 16-bit model's; otherwise the one with the lowest KL within `budget_mb`.
    Both budgets may be given; at least one must be.
    """
    if budget_mb is None and max_top1_drop is None:
        raise ValueError("choose needs a size budget (budget_mb) or an accuracy budget (max_top1_drop)")
    ref = next(r for r in rows if r["config"] == "16-bit")
    cands = [r for r in rows if r["quant"] == quant_name and r["kind"] in ("all quantized", "greedy")]
    if not cands:
        raise ValueError(f"no measured configurations for '{quant_name}': run sweep with that quant type first")
    fits = [r for r in cands if (budget_mb is None or r["footprint_mb"] <= budget_mb)
            and (max_top1_drop is None or ref["top1"] - r["top1"] <= max_top1_drop + 1e-12)]
    if not fits:
        smallest = min(cands, key=lambda r: r["footprint_mb"])
        best = max((r for r in cands if budget_mb is None or r["footprint_mb"] <= budget_mb),
                   key=lambda r: r["top1"], default=None)
        reach = (f"the best top-1 within it is {best['top1']:.4f} vs 16-bit {ref['top1']:.4f}" if best else
                 f"the smallest configuration is {smallest['footprint_mb']:.3f} MB")
        raise ValueError(f"no {quant_name} configuration fits budget_mb={budget_mb} and max_top1_drop={max_top1_drop}: "
                         f"{reach}; loosen a budget")
    key = (lambda r: (r["footprint_mb"], r["kl"])) if max_top1_drop is not None else (
        lambda r: (r["kl"], r["footprint_mb"]))
    pick = min(fits, key=key)
    return {"quant": quant_name, "config": pick["config"], "keep_16bit": list(pick["keep_16bit"]),
            "footprint_mb": pick["footprint_mb"], "top1": pick["top1"], "kl": pick["kl"],
            "budget_mb": budget_mb, "max_top1_drop": max_top1_drop}


def _label(keep: list) -> str:
    return f"greedy {keep}" if keep else "all quantized"


def _budget_label(choice: dict) -> str:
    parts = [f"≤ {choice['budget_mb']:.3f} MB"] if choice["budget_mb"] is not None else []
    parts += [f"≤ {choice['max_top1_drop'] * 100:g} pt top-1 loss"] if choice["max_top1_drop"] is not None else []
    return "budget " + " and ".join(parts)


def check_choice(checkpoint: str | Path, model_cfg: dict[str, Any], quant_cfg: dict[str, Any], choice: dict,
                 rows: list[dict], batches: list, device: torch.device, seed: int = 0) -> list[dict]:
    """`choose`'s answer on (held-out) batches, against the seeds' heuristics; and, for each heuristic the
    sweep measured, the greedy configuration at exactly that heuristic's size against it.

    Rows come in comparison groups (`comparison`; `chosen` marks the greedy one); `d_top1` / `d_kl` are
    greedy minus that configuration with paired bootstrap intervals (the same images resampled for
    both). Each distinct keep_16bit is quantized once.
    """
    q = choice["quant"]
    n_layers = max(int(r["layer"]) for r in rows if r["kind"] == "single layer") + 1
    heur = heuristics(n_layers)
    groups = [(_budget_label(choice), (f"chosen: {_label(choice['keep_16bit'])}", None, choice["keep_16bit"]),
               [h for h in heur if h[2] != choice["keep_16bit"]])]
    for h in heur[1:]:
        measured = [r for r in rows if r["quant"] == q and r["config"] == h[0]]
        if measured:
            match = choose(rows, q, budget_mb=measured[0]["footprint_mb"])
            groups.append((f"size of {h[0]}", (f"{_label(match['keep_16bit'])} at that size", None,
                                               match["keep_16bit"]), [h]))
    distinct = {repr(c[2]): c for _, mine, others in groups for c in [*others, mine]}
    scorer = _Scorer(checkpoint, model_cfg, batches, device)
    scored = {repr(c[2]): (kept, logits, size)
              for c, kept, logits, size in scorer.run(quant_config(quant_cfg, q), list(distinct.values()))}
    hits = lambda logits: (logits.argmax(1) == scorer.labels).astype(float)
    out = []
    for comparison, mine, others in groups:
        greedy = scored[repr(mine[2])][1]
        for config in [*others, mine]:
            kept, logits, size = scored[repr(config[2])]
            d1 = metrics.paired_bootstrap_diff(hits(greedy), hits(logits), seed=seed)
            dk = metrics.paired_bootstrap_diff(metrics.kl_per_image(scorer.ref, greedy),
                                               metrics.kl_per_image(scorer.ref, logits), seed=seed)
            out.append({**_row(q, config, "check", scorer, logits, size, seed, len(kept)), "comparison": comparison,
                        "chosen": config is mine, **dict(zip(("d_top1", "d_top1_lo", "d_top1_hi"), d1)),
                        **dict(zip(("d_kl", "d_kl_lo", "d_kl_hi"), dk))})
    return out


def pareto_front(rows: list[dict], value: str = "top1", higher_is_better: bool = True) -> list[dict]:
    """The rows no other row beats on both footprint (smaller) and `value`, by increasing footprint."""
    sign = 1 if higher_is_better else -1
    front, best = [], -np.inf
    for r in sorted(rows, key=lambda r: (r["footprint_mb"], -sign * r[value])):
        if sign * r[value] > best:
            front.append(r)
            best = sign * r[value]
    return front
