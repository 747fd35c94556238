"""The models of a run: which ones a run folder holds, under the labels every table, figure and the demo
use, and how each is loaded to run (its saved weights, then its speed paths). evaluate, the demo and
the data-parallel workers all take them from here."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import config, models, runs, speed
from .models import ModelSettings
from .settings import Speed


@dataclass(frozen=True)
class RunModel:
    """One model a run holds: its label (used by every table, figure and the demo), where its weights are,
    and the speed paths evaluate runs it with."""
    label: str
    path: Path
    speed: Speed


def models_of(run_dir: str | Path, params: dict[str, Any] | None = None) -> list[RunModel]:
    """The models of a run: its merged 16-bit checkpoint, and the variant this run is about (quantized
    and/or run a `speed` way) when it differs from that."""
    p = config.validate(params or runs.load_params(run_dir))
    q, sp = p.quant, p.speed
    out = [RunModel(f"16-bit ({p.model.dtype})", runs.path(run_dir, "checkpoint"), Speed())]
    if q.bits != 16 or sp.active:
        label = q.describe() if q.bits != 16 else p.model.dtype
        out.append(RunModel(label + (f" + {sp.describe()}" if sp.active else ""), runs.path(run_dir, "quantized"), sp))
    return out


def load(entry: RunModel, settings: ModelSettings, device: torch.device,
         valid: Callable[[], Iterable] | None = None) -> nn.Module:
    """A model of a run as evaluate runs it: its saved weights, then its speed paths. `valid` gives
    batches of validation images, asked for only by the settings that calibrate FP8 activation scales
    on them (`speed.fp8: static`, `speed.int4: w4a8`)."""
    model = models.load_checkpoint(entry.path, settings, device)
    if not entry.speed.active:
        return model
    return speed.apply(model, entry.speed, valid() if valid is not None and entry.speed.calibrates else None)
