"""Formats per layer under a latency or an accuracy budget, on vitlab's own kernels: which encoder layers
run in which format (16-bit, FP8, W4A8, W3A8, ...) so that the model is as fast as it can be within an
accuracy budget, or as accurate as it can be within a latency budget.

The sweep (`ablation.sweep`) measured each layer's share of each format's drift: the KL removed by
keeping that layer alone in 16-bit. `path` orders single-layer format changes, starting from the
fastest uniform format, by KL removed per millisecond added, the milliseconds from the uniform formats'
measured latencies spread evenly over the layers: a cost model that only orders. Every candidate on
it is then measured as it runs: `measure` builds the model on the run's speed path with
`speed.layer_formats` (one compiled, CUDA-graphed model on a GPU, whatever the mix) and takes its top-1
and KL on the split and its p50 latency with CUDA events. `choose` picks from measured rows only;
`study` (the ablation step's whole choice) then scores it on held-out images against the uniform
formats, the seeds' heuristics and the size-budget choice, with paired intervals, at every latency
batch size, each distinct assignment built once and kept for a resumed run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from . import ablation, bench, fmt, infer, metrics, models, runs, speed
from .errors import TimeLimitReached
from .settings import FP8_ACTIVATIONS, Speed

SIXTEEN = "16bit"


class Candidate(NamedTuple):
    """A per-layer format assignment and the name it is reported under."""
    name: str
    formats: list[str]


def shares(rows: list[dict], name: str, n_layers: int) -> np.ndarray:
    """Layer i's share of format `name`'s KL (from the sweep's rows): what keeping it alone in 16-bit removed."""
    if name == SIXTEEN:
        return np.zeros(n_layers)
    mine = [r for r in rows if r["quant"] == name]
    if not mine:
        raise ValueError(f"the sweep has no rows for '{name}': add it to ablation.quant_types")
    base = next(r["kl"] for r in mine if r["kind"] == "all quantized")
    out = np.zeros(n_layers)
    for r in mine:
        if r["kind"] == "single layer":
            out[int(r["layer"])] = max(0.0, base - r["kl"])
    return out


def path(share: dict[str, np.ndarray], latency_ms: dict[str, float]) -> list[list[str]]:
    """From the fastest uniform format, one layer at a time to a slower format that holds it better, the
    change with the most KL removed per estimated millisecond first; every step's assignment."""
    n = len(next(iter(share.values())))
    current = [min(latency_ms, key=latency_ms.get)] * n
    steps = []
    while True:
        moves = [((share[a][i] - share[b][i]) / max((latency_ms[b] - latency_ms[a]) / n, 1e-9), i, b)
                 for i, a in enumerate(current) for b in share
                 if latency_ms[b] >= latency_ms[a] and share[b][i] < share[a][i]]
        if not moves:
            return steps
        _, i, b = max(moves)
        current = current[:i] + [b] + current[i + 1:]
        steps.append(current)


def candidates(steps: list[list[str]], formats: list[str], n_layers: int, points: int = 8) -> list[Candidate]:
    """Every uniform format, and `points` assignments along `path` (denser near its fast end, where a
    few layers buy most of the accuracy)."""
    out = [Candidate(f"uniform_{f}", [f] * n_layers) for f in formats]
    if steps and points:
        picks = sorted({int(round(k)) - 1 for k in np.geomspace(1, len(steps), points)})
        out += [Candidate(f"path {k + 1}", steps[k]) for k in picks]
    seen, unique = set(), []
    for c in out:
        if tuple(c.formats) not in seen:
            seen.add(tuple(c.formats))
            unique.append(c)
    return unique


def speed_for(base: Speed, formats: list[str]) -> Speed:
    """The run's speed path (compile, graphs, fused q/k/v ...) with these formats per layer."""
    gemm = base.fp8_gemm if any(f in FP8_ACTIVATIONS for f in formats) else "cublas"
    return base.replace(fp8="none", int4="none", torchao="none", keep_16bit=[], fp8_gemm=gemm,
                        layer_formats=[] if set(formats) == {SIXTEEN} else list(formats))


def measure(checkpoint, settings: models.ModelSettings, base: Speed, candidate: Candidate, splits: list[list],
            calibration: list, device: torch.device, batch_sizes: list[int], warmup: int,
            iters: int) -> tuple[list[np.ndarray], dict[int, float]]:
    """The candidate as it runs, built once: its logits on each of `splits` (lists of batches) and its p50
    latency (ms) at each batch size. FP8 scales are calibrated on `calibration` (validation images, as
    evaluate calibrates them)."""
    hf_logging.disable_progress_bar()  # one loading bar per candidate would bury the notebook's lines
    try:
        model = models.load_checkpoint(checkpoint, settings, device)
    finally:
        hf_logging.enable_progress_bar()
    size = model.config.image_size
    sped = speed.apply(model, speed_for(base, candidate.formats), calibration)
    logits = [infer.predict(sped, batches, device, progress=False)[0] for batches in splits]
    p50 = {b: bench.latency(sped, b, size, device, warmup, iters)["p50_ms"] for b in batch_sizes}
    del sped, model
    if base.compile == "model":  # a whole-model graph is this candidate's alone: do not let them pile up
        torch._dynamo.reset()  # (compiled blocks are shared by every candidate with such a block: kept)
    return logits, p50


def row(candidate: Candidate, logits: np.ndarray, ref: np.ndarray, labels: np.ndarray, p50: dict[int, float],
        seed: int) -> list[dict]:
    """One flat row per batch size: top-1 with its interval, the paired top-1 difference against 16-bit
    (points), the KL from 16-bit, p50 latency."""
    hits = (logits.argmax(1) == labels).astype(float)
    lo, hi = metrics.bootstrap_ci(hits, seed=seed)
    d, d_lo, d_hi = metrics.paired_bootstrap_diff(hits, (ref.argmax(1) == labels).astype(float), seed=seed)
    common = {"choice": candidate.name, "formats": list(candidate.formats), "top1": float(hits.mean()),
              "top1_lo": lo, "top1_hi": hi, "top1_delta_pt": 100 * d, "delta_lo_pt": 100 * d_lo,
              "delta_hi_pt": 100 * d_hi, "kl": metrics.kl_divergence(ref, logits), "n": len(labels)}
    return [{**common, "batch_size": b, "p50_ms": ms} for b, ms in p50.items()]


def choose(rows: list[dict], batch_size: int, latency_budget_ms: float | None = None,
           max_top1_drop_pt: float | None = None) -> dict:
    """From measured rows at `batch_size`: the most accurate within the latency budget (ties: lower KL),
    or the fastest whose top-1 is at most `max_top1_drop_pt` points below 16-bit's."""
    if (latency_budget_ms is None) == (max_top1_drop_pt is None):
        raise ValueError("the mixed choice takes one budget: ablation.latency_budget_ms or ablation.max_top1_drop_pt")
    mine = [r for r in rows if r["batch_size"] == batch_size]
    ref = next(r for r in mine if r["choice"] == f"uniform_{SIXTEEN}")
    if latency_budget_ms is not None:
        fits = [r for r in mine if r["p50_ms"] <= latency_budget_ms]
        pick = max(fits, key=lambda r: (r["top1"], -r["kl"]), default=None)
    else:
        fits = [r for r in mine if 100 * (ref["top1"] - r["top1"]) <= max_top1_drop_pt + 1e-9]
        pick = min(fits, key=lambda r: (r["p50_ms"], r["kl"]), default=None)
    if pick is None:
        fastest = min(mine, key=lambda r: r["p50_ms"])
        raise ValueError(f"no measured mix fits latency_budget_ms={latency_budget_ms}, max_top1_drop_pt="
                         f"{max_top1_drop_pt} at batch {batch_size}: the fastest is {fastest['choice']} at "
                         f"{fastest['p50_ms']:.3f} ms, top-1 {fastest['top1']:.4f} (16-bit {ref['top1']:.4f})")
    budget = ("latency_budget" if latency_budget_ms is not None else "top1_budget")
    return {**pick, "budget": budget, "latency_budget_ms": latency_budget_ms, "max_top1_drop_pt": max_top1_drop_pt}


def heuristics(fastest: str, n_layers: int, size_choice: dict | None) -> list[Candidate]:
    """The seeds' hand-picked mixes on the fastest format (first and last layer, the last four layers in
    16-bit) and the size-budget choice of the same format (ablation.choose), as per-layer formats."""
    def keeping(layers) -> list[str]:
        return [SIXTEEN if i in layers else fastest for i in range(n_layers)]
    out = [Candidate("heuristic_first_last", keeping({0, n_layers - 1}))]
    out += [Candidate("heuristic_deep_four", keeping(set(c.keep))) for c in ablation.deep_four(n_layers)]
    if size_choice is not None and all(isinstance(k, int) for k in size_choice["keep_16bit"]):
        out.append(Candidate("size_budget", keeping({k % n_layers for k in size_choice["keep_16bit"]})))
    return out


def _key(formats: tuple) -> str:
    return hashlib.sha1(",".join(formats).encode()).hexdigest()[:16]


def _kept(keep: Path | None, formats: tuple):
    """A build measured before the study was stopped, or None."""
    path = keep / f"{_key(formats)}.npz" if keep is not None else None
    if path is None or not path.is_file():
        return None
    got = np.load(path)
    return [got["valid"], got["verify"]], dict(zip(got["sizes"].tolist(), got["p50"].tolist()))


def _timed_build(c: Candidate, run, keep: Path | None, pace: list[float]):
    """`run()` unless it would, at the last build's pace (`pace`: every build's seconds so far), end after
    `vitlab run --time-limit`'s deadline: then TimeLimitReached, the builds so far kept for --resume."""
    done = len(pace)
    if pace and runs.seconds_left() < 1.5 * pace[-1] + 5:
        raise TimeLimitReached(f"stopped at the time limit before building '{c.name}' ({done} builds measured and "
                               "kept): `vitlab run --resume` continues the study there")
    t0 = time.monotonic()
    (valid, verify), p50 = got = run()
    pace.append(time.monotonic() - t0)
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        np.savez(keep / f"{_key(tuple(c.formats))}.npz", valid=valid, verify=verify,
                 sizes=np.array(list(p50)), p50=np.array(list(p50.values())))
    return got


def study(checkpoint, settings: models.ModelSettings, params: dict[str, Any], rows: list[dict], batches: list,
          verify_batches: list, device: torch.device, size_choices: dict[str, dict] | None = None,
          keep: Path | None = None) -> dict[str, Any]:
    """The whole mixed choice of the ablation step: uniform formats timed, the path, candidates measured on
    `batches` at ablation.latency_batch_size, the choice, and the check on `verify_batches` at every
    eval.latency_batch_sizes. Returns {"candidates", "choice", "checks"} (flat rows). With `keep` (a folder:
    the step's resume folder), every build's measurements are kept there, and a study that finds them
    (the same run resumed) measures only what is missing."""
    ab, ev, base = params["ablation"], params["eval"], Speed.of(params["speed"])
    n_layers = max(int(r["layer"]) for r in rows if r["kind"] == "single layer") + 1
    formats = list(dict.fromkeys([SIXTEEN, *ab["formats"]]))
    seed, at = params["seed"], ab["latency_batch_size"]

    sizes = sorted({at, *ev["latency_batch_sizes"]})
    labels = [np.concatenate([np.asarray(y) for _, y in on]) for on in (batches, verify_batches)]
    built: dict[tuple, tuple[list[np.ndarray], dict[int, float]]] = {}
    pace: list[float] = []

    def build(c: Candidate) -> tuple[list[np.ndarray], dict[int, float]]:
        """Each distinct assignment built and compiled once: its logits on both splits, every latency
        (kept in `keep`, so a stopped study continues where it stopped)."""
        key = tuple(c.formats)
        if key not in built:
            built[key] = _kept(keep, key) or _timed_build(c, lambda: measure(
                checkpoint, settings, base, c, [batches, verify_batches], batches, device, sizes, ev["warmup"],
                ev["iters"]), keep, pace)
            (valid, _), p50 = built[key]
            print(f"mixed: {c.name}: top-1 {(valid.argmax(1) == labels[0]).mean():.4f} on {ab['split']}, "
                  + ", ".join(f"bs{b} {ms:.3f} ms" for b, ms in p50.items()) + f" ({fmt.formats(c.formats)})", flush=True)
        return built[key]

    def scored(cands: list[Candidate], split: int, at_sizes: list[int]) -> list[dict]:
        ref = build(Candidate(f"uniform_{SIXTEEN}", [SIXTEEN] * n_layers))[0][split]
        return [r for c in cands for r in row(c, build(c)[0][split], ref, labels[split],
                                              {b: build(c)[1][b] for b in at_sizes}, seed)]

    uniform = scored(candidates([], formats, n_layers), 0, [at])
    latency = {r["formats"][0]: r["p50_ms"] for r in uniform}
    steps = path({f: shares(rows, f, n_layers) for f in formats}, latency)
    cands = uniform + scored(candidates(steps, [], n_layers, ab["mixed_points"]), 0, [at])
    drop = None if ab["latency_budget_ms"] is not None else (ab["max_top1_drop_pt"] or 0.0)
    try:
        choice = choose(cands, at, ab["latency_budget_ms"], drop)
    except ValueError as e:  # an answer too: what was measured stays, and says what the budget would need
        return {"candidates": cands, "choice": None, "checks": [], "no_fit": str(e), "latency_batch_size": at,
                "verify_split": ab["verify_split"], "builds": len(built)}
    # The heuristics keep layers of the fastest quantized format in 16-bit (of 16-bit itself they keep nothing).
    fastest = min((f for f in latency if f != SIXTEEN), key=latency.get, default=SIXTEEN)
    pool = [Candidate(f"uniform_{f}", [f] * n_layers) for f in formats]
    pool += heuristics(fastest, n_layers, (size_choices or {}).get(fastest))
    pool.append(Candidate(choice["budget"], choice["formats"]))
    checks = scored(pool, 1, sizes)
    hits = {c.name: (build(c)[0][1].argmax(1) == labels[1]).astype(float) for c in pool}
    for r in checks:  # the choice minus each configuration, on the same held-out images
        d = metrics.paired_bootstrap_diff(hits[choice["budget"]], hits[r["choice"]], seed=seed)
        r.update(zip(("vs_choice_pt", "vs_choice_lo_pt", "vs_choice_hi_pt"), (100 * v for v in d)))
    return {"candidates": cands, "choice": choice, "checks": checks, "latency_batch_size": at,
            "verify_split": ab["verify_split"], "builds": len(built)}


def verdict(study: dict[str, Any]) -> str:
    """The check in sentences: each configuration's latency and top-1 at the choice's batch size, against
    the choice (a paired difference whose interval holds 0 is a tie)."""
    at, choice = study["latency_batch_size"], study["choice"]
    rows = [r for r in study["checks"] if r["batch_size"] == at]
    mine = next(r for r in rows if r["choice"] == choice["budget"])
    ref = next(r for r in rows if r["choice"] == f"uniform_{SIXTEEN}")
    quick = [r["choice"] for r in rows if r["choice"].startswith("uniform_") and r["p50_ms"] < ref["p50_ms"]]
    lines = [] if quick else [f"No format runs faster than 16-bit at batch {at} on this speed path: the choice is "
                              "16-bit everywhere.\n"]
    lines += [f"**{choice['budget']}** on {study['verify_split']} ({mine['n']} images), batch {at}: "
             f"{fmt.formats(mine['formats'])}: {mine['p50_ms']:.3f} ms, top-1 {mine['top1']:.4f} "
             f"({mine['top1_delta_pt']:+.2f} pt vs 16-bit [{mine['delta_lo_pt']:+.2f}, {mine['delta_hi_pt']:+.2f}])"]
    for r in rows:
        if r is mine:
            continue
        tie = r["vs_choice_lo_pt"] <= 0 <= r["vs_choice_hi_pt"]
        lines.append(f"- {r['choice']}: {r['p50_ms']:.3f} ms ({r['p50_ms'] / mine['p50_ms']:.2f}x the choice's), "
                     f"top-1 {r['top1']:.4f}; the choice minus it {r['vs_choice_pt']:+.2f} pt "
                     f"[{r['vs_choice_lo_pt']:+.2f}, {r['vs_choice_hi_pt']:+.2f}] ({'a tie' if tie else 'a real difference'})")
    return "\n".join(lines)


def mixed_params(params: dict[str, Any], choice: dict, checkpoint) -> dict[str, Any]:
    """The run's params with the choice's formats per layer on its speed path, from the trained checkpoint
    as it is: a params file `vitlab run` takes."""
    return {**ablation.from_checkpoint(params, f"{params['variant']}_mixed_formats", checkpoint),
            "quant": {**params["quant"], "bits": 16, "keep_16bit": []},
            "speed": dataclasses.asdict(speed_for(Speed.of(params["speed"]), choice["formats"]))}


def write_params(out: Path, params: dict[str, Any], choice: dict, checkpoint) -> Path:
    """The choice as <out>/<variant>_mixed_formats.yaml."""
    return ablation.write_params(out, mixed_params(params, choice, checkpoint))
