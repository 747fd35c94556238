"""Evaluate models the way timm's validate.py and benchmark.py do: one function measures one model and
returns one flat row; loops, tables and files sit around it.

- `measure`: accuracy on a split (top-1/top-5/F1, bootstrap interval of top-1), size on disk and in
  memory, and drift from a reference model's logits: one row per model.
- `bench.latency`: latency percentiles, throughput and peak memory at one batch size: one row.
- `evaluate_run`: both, plus a profile, for every model of a run folder (what 03_evaluate shows).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import bench, data, infer, metrics, models, parallel, run_models, runs, speed
from .models import ModelSettings


def sizes(model: nn.Module, saved: str | Path | None = None) -> dict[str, float | None]:
    """Size on disk (the saved folder, or the model saved now) and in memory, in MB.

    Weights the speed paths convert after loading (torchao, vitlab's FP8) are sized as saved now;
    torchao's get no footprint (its tensors report their outer dtype's element size, so no honest
    number comes from them)."""
    disk = speed.storage_bytes(model) if speed.converted(model) or saved is None else models.disk_bytes(saved)
    footprint = None if speed.torchao_weights(model) else models.parameter_bytes(speed.unwrapped(model)) / 2**20
    return {"disk_mb": disk / 2**20, "footprint_mb": footprint}


def drift(ref_logits: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """How far a model's logits are from a reference's on the same images."""
    return {"logits_rel_err": float(np.linalg.norm(logits - ref_logits) / np.linalg.norm(ref_logits)),
            "top1_agreement": float((logits.argmax(1) == ref_logits.argmax(1)).mean()),
            "kl_to_ref": metrics.kl_divergence(ref_logits, logits)}


def measure(model: nn.Module, label: str, batches: Iterable, device: torch.device, num_classes: int, seed: int = 0,
            saved: str | Path | None = None, ref_logits: np.ndarray | None = None,
            predictions: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """One flat row for one model: accuracy with a bootstrap 95% interval of top-1, sizes, and (given a
    reference's logits on the same batches) drift. Also returns the logits and labels. `predictions`:
    logits and labels already computed (by the data-parallel pass) instead of predicting `batches`."""
    # Sized before the first forward: on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights then
    # and drops the double-quant state, so the same model would measure smaller after a forward.
    size = sizes(model, saved)
    logits, labels = predictions or infer.predict(model, batches, device, desc=label)
    lo, hi = metrics.bootstrap_ci(logits.argmax(1) == labels, seed=seed)
    row = {"model": label, **metrics.classification(logits, labels, num_classes), "top1_lo": lo, "top1_hi": hi, **size}
    if ref_logits is not None:
        # The paired difference to the reference (the run's 16-bit model): the same images resampled for both.
        d, d_lo, d_hi = metrics.paired_bootstrap_diff(logits.argmax(1) == labels, ref_logits.argmax(1) == labels, seed=seed)
        row.update(drift(ref_logits, logits), top1_delta_pt=100 * d, delta_lo_pt=100 * d_lo, delta_hi_pt=100 * d_hi)
    return row, logits, labels


@dataclass
class Evaluation:
    """Everything 03_evaluate measures, as tables with a `model` column."""
    accuracy: pd.DataFrame
    latency: pd.DataFrame
    profile: pd.DataFrame
    kernels: dict[str, pd.DataFrame] = field(default_factory=dict)
    confusions: dict[str, list[dict]] = field(default_factory=dict)  # the most confused pairs per model
    matrices: dict[str, pd.DataFrame] = field(default_factory=dict)  # the full confusion matrix per model
    predictions: pd.DataFrame = field(default_factory=pd.DataFrame)  # model, image (test index), true, predicted

    def save(self, run_dir: Path, meta: dict[str, Any]) -> None:
        """The run's `results` (every table, JSON) and `results_table` (latency rows joined with accuracy, CSV)."""
        self.latency.merge(self.accuracy, on="model").to_csv(runs.path(run_dir, "results_table"), index=False)
        cells = [m.stack().rename("count").reset_index().assign(model=label) for label, m in self.matrices.items()]
        pd.concat(cells)[["model", "true", "predicted", "count"]].to_csv(runs.path(run_dir, "confusion"), index=False)
        self.predictions.to_csv(runs.path(run_dir, "predictions"), index=False)
        runs.write_json(runs.path(run_dir, "results"), {
            **meta, "accuracy": self.accuracy.to_dict("records"), "confusions": self.confusions,
            "latency": self.latency.to_dict("records"), "profile": self.profile.to_dict("records"),
            "kernels": {name: t.to_dict("records") for name, t in self.kernels.items()}})


def evaluate_run(run_dir: Path, params: dict[str, Any], ds, device: torch.device, out: Path) -> Evaluation:
    """Every model of the run on the test split: `measure`, `bench.latency` at each of
    eval.latency_batch_sizes, and a profile (by component for eager models; a kernel table on a GPU for
    compiled or graph-replayed ones, whose insides module hooks cannot see)."""
    ev, settings = params["eval"], ModelSettings.from_params(params["model"])
    batches = ds.loader("test", ev["batch_size"])
    accuracy, latency, profiles, kernels, confusions, matrices, predicted = [], [], [], {}, {}, {}, []
    ref = None
    for entry in run_models.models_of(run_dir, params):
        model = run_models.load(entry, settings, device, lambda: ds.loader("valid", ev["batch_size"]))
        # eval.processes > 1: the accuracy pass sharded over that many processes (one per GPU).
        predictions = (predict_in_processes(entry, settings, params["data"], params["seed"], "test", ev["batch_size"],
                                        ev["processes"]) if ev["processes"] > 1 else None)
        row, logits, labels = measure(model, entry.label, batches, device, len(ds.class_names), params["seed"],
                                      entry.path, ref, predictions)
        ref = logits if ref is None else ref
        accuracy.append(row)
        print(f"{entry.label}: top-1 {row['top1']:.4f} [{row['top1_lo']:.4f}, {row['top1_hi']:.4f}] on {row['n']} images",
              flush=True)
        matrices[entry.label] = metrics.confusion_table(labels, logits.argmax(1), ds.class_names)
        confusions[entry.label] = metrics.confused_pairs(matrices[entry.label])
        predicted.append(pd.DataFrame({"model": entry.label, "image": np.arange(len(labels)), "true": labels,
                                       "predicted": logits.argmax(1)}))
        for bs in ev["latency_batch_sizes"]:
            latency.append({"model": entry.label, **bench.latency(model, bs, ds.image_size, device, ev["warmup"],
                                                                  ev["iters"])})
            print(f"{entry.label}: batch {bs}: p50 {latency[-1]['p50_ms']:.2f} ms, "
                  f"{latency[-1]['throughput_img_s']:.0f} img/s", flush=True)
        if ev["profile"]:
            print(f"{entry.label}: profiling {ev['profile_iters']} forwards at batch {ev['profile_batch_size']}", flush=True)
            x = bench.random_batch(model, ev["profile_batch_size"], ds.image_size, device)
            if not entry.speed.active:
                trace = out / f"trace_{len(profiles)}.json" if device.type == "cuda" else None
                table = bench.profile_components(model, x, ev["profile_iters"], trace)
                profiles.append(table.assign(model=entry.label, forward_ms=table.attrs["forward_ms"],
                                             clock=table.attrs["clock"], batch_size=ev["profile_batch_size"]))
            elif device.type == "cuda":
                kernels[entry.label] = bench.kernel_table(model, x)
        del model
    profile = pd.concat(profiles, ignore_index=True) if profiles else pd.DataFrame()
    if not profile.empty:
        profile.attrs["clock"] = profile["clock"].iloc[0]
    return Evaluation(pd.DataFrame(accuracy), pd.DataFrame(latency), profile, kernels, confusions, matrices,
                      pd.concat(predicted, ignore_index=True))


def _predict_worker(entry, settings, data_cfg: dict[str, Any], seed: int, split: str, batch_size: int, out: str) -> None:
    acc = parallel.accelerator()
    ds = data.for_checkpoint(data_cfg, seed, entry.path)
    model = run_models.load(entry, settings, acc.device, lambda: ds.loader("valid", batch_size))  # speed paths too
    loader = acc.prepare_data_loader(ds.loader(split, batch_size))
    dtype = infer.input_dtype(model)
    logits, labels = [], []
    with torch.inference_mode():
        for x, y in loader:
            out_logits = model(pixel_values=x.to(acc.device, dtype)).logits.float()
            got_logits, got_labels = acc.gather_for_metrics((out_logits, torch.as_tensor(y, device=acc.device)))
            logits.append(got_logits.cpu())
            labels.append(got_labels.cpu())
    if acc.is_main_process:
        np.savez(out, logits=torch.cat(logits).numpy(), labels=torch.cat(labels).numpy(), processes=acc.num_processes)
    acc.wait_for_everyone()
    acc.end_training()


def predict_in_processes(entry, settings, data_cfg: dict[str, Any], seed: int, split: str, batch_size: int,
                         processes: int) -> tuple[np.ndarray, np.ndarray]:
    """Float32 logits and labels of a run's model (a `run_models.RunModel`, loaded as evaluate loads it) on a
    split sharded over `processes` processes (one per GPU): every image once, in the split's order."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "predictions.npz")
        parallel.launch(_predict_worker, processes, entry, settings, data_cfg, seed, split, batch_size, out)
        got = np.load(out)
        if int(got["processes"]) != processes:
            raise RuntimeError(f"asked for {processes} processes, the prediction ran in {int(got['processes'])}")
        return got["logits"], got["labels"]
