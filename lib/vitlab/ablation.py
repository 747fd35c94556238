"""Which layers can be quantized: sweep keep-in-16-bit configurations, measure the drift, choose.

Each configuration quantizes the merged checkpoint with some block linears kept in 16-bit and
is scored against the 16-bit model on the same images: top-1, top-5 and the KL divergence of
its logits (far less noisy than accuracy on a few hundred images), each with a bootstrap interval.
The choice walks the layers in order of measured KL saved per MB, measures every prefix of that
order, and picks under a size budget or a top-1 budget; `check_choice` then scores it on held-out
images against the seeds' heuristics with paired bootstrap intervals. The checkpoint is loaded once
and each layer quantized once per type (`_Scorer`): what makes a 24-layer sweep take minutes.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, NamedTuple, get_args

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import data, infer, lowbit, metrics, models, parallel, quant
from .models import ModelSettings
from .quant import QuantSettings
from .settings import Int4Format

# bitsandbytes' formats (quant params), and vitlab's own on its kernels (speed params; lowbit's linears).
QUANT_TYPES = {"nf4": {"bits": 4, "type": "nf4"}, "fp4": {"bits": 4, "type": "fp4"}, "int8": {"bits": 8}}
LOWBIT_TYPES = {"fp8": {"fp8": "static"}, **{f: {"int4": f} for f in get_args(Int4Format)}}
FORMATS = [*QUANT_TYPES, *LOWBIT_TYPES]


class Lowbit(NamedTuple):
    """One of vitlab's own formats (LOWBIT_TYPES) as the sweep swaps it in: every block linear its own
    FP8 / int4 twin, FP8 activation scales calibrated on the sweep's first `calibration_batches` batches
    (as `speed.apply` calibrates on validation images)."""
    name: str
    calibration_batches: int = 4

    def describe(self) -> str:
        return self.name

    def twin(self, linear: nn.Linear, input_amax: float) -> nn.Module:
        return lowbit.make_linear(self.name, linear, input_amax)


class Config(NamedTuple):
    """One configuration of the sweep: its name, the encoder layer it keeps alone (None for the others),
    and what it keeps in 16-bit (layer indices, name patterns, or "first_last")."""
    name: str
    layer: int | None
    keep: list | str


def quant_settings(base: QuantSettings, name: str) -> QuantSettings | Lowbit:
    """`base` (the run's quant settings: double quant, compute dtype, threshold) as quant type `name`, or
    vitlab's own format `name`."""
    if name in LOWBIT_TYPES:
        return Lowbit(name)
    if name not in QUANT_TYPES:
        raise ValueError(f"unknown ablation quant type '{name}'; choose from {FORMATS}")
    return base.replace(**QUANT_TYPES[name])


def last_quarter(n_layers: int) -> list[int]:
    """The seeds' "late layers are the sensitive ones": the last quarter of the encoder layers."""
    return list(range(n_layers - max(1, n_layers // 4), n_layers))


def deep_four(n_layers: int) -> list[Config]:
    """The seeds' "deep layers 20-23 are the most sensitive" (ViT-L/16): the last four layers kept, on
    models deep enough for that to differ from the last quarter."""
    if n_layers < 8:
        return []
    return [Config(f"keep layers {n_layers - 4}-{n_layers - 1}", None, list(range(n_layers - 4, n_layers)))]


def configurations(n_layers: int) -> list[Config]:
    """Everything quantized, each layer kept alone, first/last, the last quarter, the last four, attention
    only / MLP only in 16-bit."""
    configs = [Config("all quantized", None, [])]
    configs += [Config(f"keep layer {i}", i, [i]) for i in range(n_layers)]
    configs += [Config("keep first+last", None, "first_last"), Config("keep last quarter", None, last_quarter(n_layers)),
                *deep_four(n_layers), Config("keep attention", None, ["attention"]), Config("keep mlp", None, ["mlp"])]
    return configs


def heuristics(n_layers: int) -> list[Config]:
    """The seeds' hand-picked configurations: first and last layer kept; the last quarter of the layers
    kept; the last four (layers 20-23 of ViT-L/16); layer 21 kept (ViT-L/16)."""
    out = [Config("all quantized", None, []), Config("keep first+last", None, "first_last"),
           Config("keep last quarter", None, last_quarter(n_layers)), *deep_four(n_layers)]
    return out + ([Config("keep layer 21", 21, [21])] if n_layers > 21 else [])


class _Scorer:
    """The 16-bit reference on a fixed set of batches, and quantized variants scored against it.

    The checkpoint is loaded once. A configuration is that model with each block linear swapped for
    its quantized twin or the 16-bit original; each twin is quantized once per quant type (at first
    use) and shared by every configuration, so a configuration costs one accuracy pass, not a reload
    and a quantization of the whole model. `seconds` says where the time went."""

    def __init__(self, checkpoint: str | Path, settings: ModelSettings, batches: list, device: torch.device):
        self.checkpoint, self.settings, self.batches, self.device = checkpoint, settings, batches, device
        self.seconds = {"load": 0.0, "reference": 0.0, "quantize_layers": 0.0, "predict": 0.0}
        t0 = time.perf_counter()
        self.model = models.load_checkpoint(checkpoint, settings, device)
        self.seconds["load"] = time.perf_counter() - t0
        self.ref, self.labels = infer.predict(self.model, batches, device, desc="16-bit")
        self.seconds["reference"] = time.perf_counter() - t0 - self.seconds["load"]
        self.n_layers = len(models.encoder_layers(self.model)[1])
        self.ref_bytes = models.parameter_bytes(self.model)
        self.originals = {n: self.model.get_submodule(n) for n in models.block_linears(self.model)}
        self.twins: dict[tuple[str, str], tuple[nn.Module, int]] = {}
        self.input_amax: dict[str, float] | None = None
        self.configs = 0

    def resolve(self, keep: list | str) -> list[str]:
        return quant.resolve_keep(self.model, keep)

    def _calibrate(self, q: Lowbit) -> None:
        """Every block linear's largest |input| on the 16-bit model (all originals in place)."""
        if self.input_amax is None:
            t0 = time.perf_counter()
            self.input_amax = lowbit.input_amax(self.model, list(self.originals), self.batches, q.calibration_batches)
            self.seconds["quantize_layers"] += time.perf_counter() - t0

    def _twin(self, q: QuantSettings | Lowbit, name: str) -> tuple[nn.Module, int]:
        key = (repr(q), name)
        if key not in self.twins:
            t0 = time.perf_counter()
            layer = (q.twin(self.originals[name], self.input_amax[name]) if isinstance(q, Lowbit)
                     else quant.quantize_linear(self.originals[name], q))
            # Its bytes before the first forward (bitsandbytes repacks 4-bit weights there on some CPUs).
            self.twins[key] = (layer, models.parameter_bytes(layer))
            self.seconds["quantize_layers"] += time.perf_counter() - t0
        return self.twins[key]

    def assemble(self, q: QuantSettings | Lowbit, kept: list[str]) -> int:
        """Make self.model the configuration keeping `kept` in 16-bit; its footprint in bytes."""
        size = self.ref_bytes
        for name, original in self.originals.items():
            layer, nbytes = (original, None) if name in kept else self._twin(q, name)
            self.model.set_submodule(name, layer)
            size += 0 if nbytes is None else nbytes - models.parameter_bytes(original)
        return size

    def run(self, q: QuantSettings | Lowbit, configs: list[Config]) -> Iterator[tuple[Config, list[str], np.ndarray, int]]:
        if isinstance(q, Lowbit):
            self._calibrate(q)
        # Names resolve on the 16-bit model: vitlab's own twins are not nn.Linear, so an assembled model hides them.
        keeps = [self.resolve(config.keep) for config in configs]
        # One bar over the configurations: a predict bar per configuration would bury the notebook.
        try:
            for config, kept in zip(tqdm(configs, desc=q.describe(), leave=False), keeps):
                size = self.assemble(q, kept)
                t0 = time.perf_counter()
                logits, _ = infer.predict(self.model, self.batches, self.device, progress=False)
                self.seconds["predict"] += time.perf_counter() - t0
                self.configs += 1
                yield config, kept, logits, size
        finally:
            for name, original in self.originals.items():
                self.model.set_submodule(name, original)


def _row(qname: str, config: Config, kind: str, scorer: _Scorer, logits: np.ndarray, footprint: int, seed: int,
         kept_modules: int = 0) -> dict:
    correct = logits.argmax(1) == scorer.labels
    kl = metrics.kl_per_image(scorer.ref, logits)
    scores = metrics.classification(logits, scorer.labels, logits.shape[1])
    top1_lo, top1_hi = metrics.bootstrap_ci(correct, seed=seed)
    kl_lo, kl_hi = metrics.bootstrap_ci(kl, seed=seed)
    return {"quant": qname, "config": config.name, "kind": kind, "layer": config.layer, "keep_16bit": config.keep,
            "kept_modules": kept_modules, "n": scores["n"], "top1": scores["top1"], "top1_lo": top1_lo, "top1_hi": top1_hi,
            "top5": scores["top5"], "kl": float(kl.mean()), "kl_lo": kl_lo, "kl_hi": kl_hi,
            "footprint_mb": footprint / 2**20}


def _kind(config: Config) -> str:
    if config.name == "all quantized":
        return "all quantized"
    return "single layer" if config.layer is not None else "group"


def sweep(checkpoint: str | Path, settings: ModelSettings, base: QuantSettings, quant_types: list[str],
          batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device, seed: int = 0,
          timings: dict | None = None, shard: tuple[int, int] = (0, 1), gather=None) -> list[dict]:
    """Score every `configurations` entry for each quant type against the 16-bit model, then every
    prefix of `greedy_order` (configs "greedy 1", "greedy 2", ...): the candidates `choose` picks from.
    `timings`, when given, is filled with the seconds each part took. Data parallel (sweep_in_processes):
    `shard` (rank, processes) scores configurations rank, rank + processes, ... and `gather` (every
    process's list -> all of them) joins the shares, so each process holds every row, in order."""
    scorer = _Scorer(checkpoint, settings, batches, device)
    rank, world = shard

    def score(q: QuantSettings, qname: str, configs: list[Config], kind) -> list[dict]:
        mine = list(range(rank, len(configs), world))
        got = []
        for i, (config, kept, logits, size) in zip(mine, scorer.run(q, [configs[i] for i in mine])):
            got.append((i, _row(qname, config, kind(config), scorer, logits, size, seed, len(kept))))
            _say(got[-1][1], f"{i + 1}/{len(configs)}")
        return [row for _, row in sorted(gather(got) if gather is not None else got, key=lambda pair: pair[0])]

    rows = [_row("16-bit", Config("16-bit", None, []), "16-bit", scorer, scorer.ref, scorer.ref_bytes, seed)]
    for qname in quant_types:
        q = quant_settings(base, qname)
        rows += score(q, qname, configurations(scorer.n_layers), _kind)
        order = greedy_order(rows, qname)  # from every process's rows: the same order everywhere
        rows += score(q, qname, [Config(f"greedy {k}", None, sorted(order[:k])) for k in range(1, len(order) + 1)],
                      lambda config: "greedy")
    if timings is not None:
        timings.update(scorer.seconds, configurations=scorer.configs)
    return rows


def _sweep_worker(checkpoint: str, settings, base, quant_types: list[str], data_cfg: dict[str, Any], seed: int,
                  split: str, batch_size: int, out: str) -> None:
    from accelerate.utils import gather_object

    acc = parallel.accelerator()
    ds = data.for_checkpoint(data_cfg, seed, checkpoint)
    batches = list(ds.loader(split, batch_size))  # the same images, in the same order, in every process
    timings: dict = {}
    rows = sweep(checkpoint, settings, base, quant_types, batches, acc.device, seed, timings,
                          shard=(acc.process_index, acc.num_processes), gather=gather_object)
    if acc.is_main_process:
        Path(out).write_text(json.dumps({"rows": rows, "timings": timings, "processes": acc.num_processes}))
    acc.wait_for_everyone()
    acc.end_training()


def sweep_in_processes(checkpoint: str | Path, settings, base, quant_types: list[str], data_cfg: dict[str, Any], seed: int,
                   split: str, batch_size: int, processes: int, timings: dict | None = None) -> list[dict]:
    """`sweep` with its configurations spread over `processes` processes (each scores its share
    on the same images; the rows are gathered in the one-process order)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        parallel.launch(_sweep_worker, processes, str(checkpoint), settings, base, quant_types, data_cfg, seed, split, batch_size, str(out))
        got = json.loads(out.read_text())
    if got["processes"] != processes:
        raise RuntimeError(f"asked for {processes} processes, the sweep ran in {got['processes']}")
    if timings is not None:
        timings.update(got["timings"])
    return got["rows"]


def _say(row: dict, where: str) -> None:
    # One line per configuration: the terminal of `vitlab run` shows it while the step runs.
    print(f"{row['quant']} {where}: {row['config']}: top-1 {row['top1']:.4f} KL {row['kl']:.2e} "
          f"{row['footprint_mb']:.3f} MB", flush=True)


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


def choose_all(rows: list[dict], ablation_params: dict[str, Any]) -> dict[str, dict]:
    """`choose` for every quant type of the `ablation` params that has a configuration within them (the others
    are named and left out). With neither budget set, the size budget is a quarter of the way from fully
    quantized to 16-bit: enough room to keep the most sensitive layers."""
    drop = None if ablation_params["max_top1_drop_pt"] is None else ablation_params["max_top1_drop_pt"] / 100
    full = next(r for r in rows if r["config"] == "16-bit")["footprint_mb"]
    choices = {}
    for q in ablation_params["quant_types"]:
        budget = ablation_params["budget_mb"]
        if budget is None and drop is None:
            smallest = next(r for r in rows if r["quant"] == q and r["config"] == "all quantized")["footprint_mb"]
            budget = smallest + (full - smallest) / 4
        try:
            choices[q] = choose(rows, q, budget, drop)
        except ValueError as e:  # one format with no fitting configuration does not cost the others theirs
            print(f"no size choice for {q}: {e}", flush=True)
    return choices


def from_checkpoint(params: dict[str, Any], variant: str, checkpoint: str | Path) -> dict[str, Any]:
    """The run's params as a new run `variant` of its trained `checkpoint` as it is (finetune.method none:
    nothing is trained again), without the ablation: what every choice's params file starts from."""
    return {**params, "variant": variant, "steps": [s for s in params["steps"] if s != "ablation"],
            "model": {**params["model"], "id": str(Path(checkpoint).resolve()), "init": "default"},
            "finetune": {**params["finetune"], "method": "none", "qat_format": None}}


def write_params(folder: Path, params: dict[str, Any]) -> Path:
    """`params` as <folder>/<its variant>.yaml, a file `vitlab run` takes."""
    import yaml

    path = folder / f"{params['variant']}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def mixed_params(params: dict[str, Any], choice: dict, checkpoint: str | Path) -> dict[str, Any]:
    """The run's params with the choice's format and layers kept in 16-bit (bitsandbytes' in `quant`,
    vitlab's own in `speed`, on the run's speed path), from the run's trained `checkpoint`."""
    q = choice["quant"]
    if q in LOWBIT_TYPES:
        quant_part = {**params["quant"], "bits": 16, "keep_16bit": []}
        speed_part = {**params["speed"], "fp8": "none", "int4": "none", "torchao": "none", **LOWBIT_TYPES[q],
                      "keep_16bit": choice["keep_16bit"]}
        if q.endswith("a16") and speed_part["fp8_gemm"] == "triton":
            speed_part["fp8_gemm"] = "cublas"  # W4A16 has no FP8 activations for vitlab's kernel
    else:
        quant_part = {**params["quant"], **QUANT_TYPES[q], "keep_16bit": choice["keep_16bit"]}
        speed_part = params["speed"]
    return {**from_checkpoint(params, f"{params['variant']}_{q}_mixed", checkpoint), "quant": quant_part,
            "speed": speed_part}


def write_mixed(out: Path, params: dict[str, Any], choices: dict[str, dict], checkpoint: str | Path) -> list[Path]:
    """Each choice as <out>/<variant>_<quant>_mixed.yaml; returns the files."""
    return [write_params(out, mixed_params(params, choice, checkpoint)) for choice in choices.values()]


def sweep_for_run(checkpoint: str | Path, settings: ModelSettings, base: QuantSettings, params: dict[str, Any],
                  batches: list, device: torch.device) -> list[dict]:
    """`sweep` as the ablation step runs it: in this process, or spread over `ablation.processes`."""
    ab = params["ablation"]
    if ab["processes"] == 1:
        return sweep(checkpoint, settings, base, ab["quant_types"], batches, device, params["seed"])
    return sweep_in_processes(checkpoint, settings, base, ab["quant_types"], params["data"], params["seed"], ab["split"],
                              params["eval"]["batch_size"], ab["processes"])


def verdicts(checks: list[dict]) -> list[str]:
    """One sentence per comparison of `check_choice`: the top-1 difference (a tie when its paired interval
    holds 0) and whether the KL is lower, higher or indistinguishable."""
    lines = []
    groups = list(dict.fromkeys((c["quant"], c["comparison"]) for c in checks))
    for q, comparison in groups:
        group = [c for c in checks if (c["quant"], c["comparison"]) == (q, comparison)]
        mine = next(c for c in group if c["chosen"])
        for r in (c for c in group if not c["chosen"]):
            tie = r["d_top1_lo"] <= 0 <= r["d_top1_hi"]
            kl_word = "lower" if r["d_kl_hi"] < 0 else "higher" if r["d_kl_lo"] > 0 else "indistinguishable"
            lines.append(f"**{q}**, {comparison}: *{mine['config']}* ({mine['footprint_mb']:.3f} MB) vs *{r['config']}* "
                         f"({r['footprint_mb']:.3f} MB): top-1 {r['d_top1'] * 100:+.2f} pt "
                         f"[{r['d_top1_lo'] * 100:+.2f}, {r['d_top1_hi'] * 100:+.2f}] "
                         f"({'a tie' if tie else 'a real difference'}); "
                         f"KL {kl_word}: {r['d_kl']:+.2e} [{r['d_kl_lo']:+.2e}, {r['d_kl_hi']:+.2e}]")
    return lines


def _label(keep: list) -> str:
    return f"greedy {keep}" if keep else "all quantized"


def _budget_label(choice: dict) -> str:
    parts = [f"≤ {choice['budget_mb']:.3f} MB"] if choice["budget_mb"] is not None else []
    parts += [f"≤ {choice['max_top1_drop'] * 100:g} pt top-1 loss"] if choice["max_top1_drop"] is not None else []
    return "budget " + " and ".join(parts)


def check_choice(checkpoint: str | Path, settings: ModelSettings, base: QuantSettings, choice: dict,
                 rows: list[dict], batches: list, device: torch.device, seed: int = 0,
                 timings: dict | None = None) -> list[dict]:
    """`choose`'s answer on (held-out) batches, against the seeds' heuristics; and, for each heuristic the
    sweep measured, the greedy configuration at exactly that heuristic's size against it.

    Rows come in comparison groups (`comparison`; `chosen` marks the greedy one); `d_top1` / `d_kl` are
    greedy minus that configuration with paired bootstrap intervals (the same images resampled for
    both). Each distinct keep_16bit is quantized once.
    """
    q = choice["quant"]
    n_layers = max(int(r["layer"]) for r in rows if r["kind"] == "single layer") + 1
    heur = heuristics(n_layers)
    groups = [(_budget_label(choice), Config(f"chosen: {_label(choice['keep_16bit'])}", None, choice["keep_16bit"]),
               [h for h in heur if h.keep != choice["keep_16bit"]])]
    for h in heur[1:]:
        measured = [r for r in rows if r["quant"] == q and r["config"] == h.name]
        if measured:
            match = choose(rows, q, budget_mb=measured[0]["footprint_mb"])
            groups.append((f"size of {h.name}", Config(f"{_label(match['keep_16bit'])} at that size", None,
                                                       match["keep_16bit"]), [h]))
    distinct = {repr(c.keep): c for _, mine, others in groups for c in [*others, mine]}
    scorer = _Scorer(checkpoint, settings, batches, device)
    scored = {}
    for i, (c, kept, logits, size) in enumerate(scorer.run(quant_settings(base, q), list(distinct.values())), 1):
        scored[repr(c.keep)] = (kept, logits, size)
        print(f"{q} check on {len(scorer.labels)} held-out images {i}/{len(distinct)}: {c.name}: top-1 "
              f"{(logits.argmax(1) == scorer.labels).mean():.4f}", flush=True)
    hits = lambda logits: (logits.argmax(1) == scorer.labels).astype(float)
    out = []
    for comparison, mine, others in groups:
        greedy = scored[repr(mine.keep)][1]
        for config in [*others, mine]:
            kept, logits, size = scored[repr(config.keep)]
            d1 = metrics.paired_bootstrap_diff(hits(greedy), hits(logits), seed=seed)
            dk = metrics.paired_bootstrap_diff(metrics.kl_per_image(scorer.ref, greedy),
                                               metrics.kl_per_image(scorer.ref, logits), seed=seed)
            out.append({**_row(q, config, "check", scorer, logits, size, seed, len(kept)), "comparison": comparison,
                        "chosen": config is mine, **dict(zip(("d_top1", "d_top1_lo", "d_top1_hi"), d1)),
                        **dict(zip(("d_kl", "d_kl_lo", "d_kl_hi"), dk))})
    if timings is not None:
        timings.update(scorer.seconds, configurations=scorer.configs)
    return out


def pareto_front(rows: list[dict], value: str = "top1", higher_is_better: bool = True,
                 cost: str = "footprint_mb") -> list[dict]:
    """The rows no other row beats on both `cost` (smaller: footprint, latency) and `value`, by increasing cost."""
    sign = 1 if higher_is_better else -1
    front, best = [], -np.inf
    for r in sorted(rows, key=lambda r: (r[cost], -sign * r[value])):
        if sign * r[value] > best:
            front.append(r)
            best = sign * r[value]
    return front
