"""Post-training quantization with bitsandbytes: LLM.int8 and 4-bit NF4/FP4, with chosen layers kept in 16-bit.

The quantized model is made by transformers' bitsandbytes integration (the path a user would load
it with) from the merged 16-bit checkpoint; `keep_16bit` becomes its list of modules not to convert.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from transformers import BitsAndBytesConfig

from . import models
from .models import DTYPES


# bitsandbytes logs a line on every int8 matmul whose input is not float16; it casts, as designed.
logging.getLogger("bitsandbytes.autograd._functions").addFilter(
    lambda record: "inputs will be cast" not in record.getMessage())


class QuantError(ValueError):
    """A quantization setting that does not fit the model."""


def resolve_keep(model: nn.Module, keep: list[Any] | str) -> list[str]:
    """Qualified names of the block linears kept in 16-bit.

    `keep` holds encoder-layer indices (negative ones count from the end), regexes searched in module
    names ("attention", r"mlp\\.fc2"), or is "first_last" (the first and the last encoder layer).
    """
    names = models.block_linears(model)
    n_layers = len(models.encoder_layers(model)[1])
    items = [0, n_layers - 1] if keep == "first_last" else list(keep)
    kept: set[str] = set()
    for item in items:
        if isinstance(item, int):
            if not -n_layers <= item < n_layers:
                raise QuantError(f"quant.keep_16bit names layer {item}, but the model has {n_layers} encoder "
                                 f"layers (0..{n_layers - 1})")
            idx = item % n_layers
            matched = [n for n in names if models.layer_index(model, n) == idx]
        else:
            matched = [n for n in names if re.search(str(item), n)]
            if not matched:
                raise QuantError(f"quant.keep_16bit pattern '{item}' matches no linear layer; names look like "
                                 f"'{names[0]}'")
        kept.update(matched)
    return [n for n in names if n in kept]


def bnb_config(quant_cfg: dict[str, Any], keep: list[str]) -> BitsAndBytesConfig | None:
    """transformers' BitsAndBytesConfig for `quant`, or None for 16-bit."""
    bits = quant_cfg["bits"]
    if bits == 16:
        return None
    # The classifier is tiny and decides the output: always 16-bit, as is usual for bnb.
    skip = ["classifier", *keep]
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=quant_cfg["int8_threshold"],
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_cfg["type"],
                              bnb_4bit_use_double_quant=quant_cfg["double_quant"],
                              bnb_4bit_compute_dtype=DTYPES[quant_cfg["compute_dtype"]],
                              llm_int8_skip_modules=skip)


def describe(quant_cfg: dict[str, Any]) -> str:
    bits = quant_cfg["bits"]
    if bits == 16:
        return "16-bit"
    if bits == 8:
        return "int8"
    return quant_cfg["type"] + ("+dq" if quant_cfg["double_quant"] else "")


def quantize(checkpoint: str | Path, quant_cfg: dict[str, Any], model_cfg: dict[str, Any],
             device: torch.device, keep: list[str] | None = None) -> nn.Module:
    """Load the 16-bit checkpoint quantized as `quant_cfg` asks (keep: resolved 16-bit module names)."""
    if quant_cfg["bits"] != 16 and device.type not in ("cpu", "cuda"):
        raise QuantError(f"bitsandbytes quantization runs on cpu or cuda, not {device.type}")
    return models.load_checkpoint(checkpoint, DTYPES[model_cfg["dtype"]], model_cfg["attention"], device,
                                  quantization_config=bnb_config(quant_cfg, keep or []))


def layer_table(model: nn.Module) -> pd.DataFrame:
    """One row per linear layer of the blocks and the classifier: its class, weight dtype and bytes."""
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        rows.append({
            "module": name,
            "layer": models.layer_index(model, name),
            "component": models.component(name),
            "class": type(module).__name__,
            "quantized": type(module).__name__ != "Linear",
            "weight_dtype": str(weight.dtype).replace("torch.", ""),
            "bytes": models.parameter_bytes(module),
        })
    return pd.DataFrame(rows)


def dir_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
