"""Post-training quantization with bitsandbytes: LLM.int8 and 4-bit NF4/FP4, with chosen layers kept in 16-bit.

The quantized model is made by transformers' bitsandbytes integration (the path a user would load
it with) from the merged 16-bit checkpoint; `keep_16bit` becomes its list of modules not to convert.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from transformers import AutoImageProcessor, BitsAndBytesConfig

from . import models
from .errors import QuantError
from .models import DTYPES, ModelSettings


@dataclass(frozen=True)
class QuantSettings:
    """The `quant` params, typed: bits 16 (none), 8 (LLM.int8) or 4 (`type` nf4/fp4)."""
    bits: int
    type: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    int8_threshold: float = 6.0
    keep_16bit: tuple | str = ()

    @classmethod
    def from_params(cls, quant_params: dict[str, Any]) -> "QuantSettings":
        keep = quant_params["keep_16bit"]
        return cls(bits=quant_params["bits"], type=quant_params["type"], double_quant=quant_params["double_quant"],
                   compute_dtype=DTYPES[quant_params["compute_dtype"]], int8_threshold=quant_params["int8_threshold"],
                   keep_16bit=keep if isinstance(keep, str) else tuple(keep))

    def replace(self, **changes: Any) -> "QuantSettings":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        if self.bits == 16:
            return "16-bit"
        if self.bits == 8:
            return "int8"
        return self.type + ("+dq" if self.double_quant else "")


class _CastNotice(logging.Filter):
    """bitsandbytes logs a line on every int8 matmul whose input is not float16; it casts, as designed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in record.getMessage()


_CAST_NOTICE = _CastNotice()


def _quiet_cast_notice() -> None:
    cast_log = logging.getLogger("bitsandbytes.autograd._functions")
    if _CAST_NOTICE not in cast_log.filters:
        cast_log.addFilter(_CAST_NOTICE)


def resolve_keep(model: nn.Module, keep: tuple | list | str, setting: str = "quant.keep_16bit") -> list[str]:
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
                raise QuantError(f"{setting} names layer {item}, but the model has {n_layers} encoder "
                                 f"layers (0..{n_layers - 1})")
            idx = item % n_layers
            matched = [n for n in names if models.layer_index(model, n) == idx]
        else:
            matched = [n for n in names if re.search(str(item), n)]
            if not matched:
                raise QuantError(f"{setting} pattern '{item}' matches no linear layer; names look like "
                                 f"'{names[0]}'")
        kept.update(matched)
    return [n for n in names if n in kept]


def bnb_config(q: QuantSettings, keep: list[str]) -> BitsAndBytesConfig | None:
    """transformers' BitsAndBytesConfig for `q`, or None for 16-bit."""
    if q.bits == 16:
        return None
    # The classifier is tiny and decides the output: always 16-bit, as is usual for bnb.
    skip = ["classifier", *keep]
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=q.int8_threshold, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.type, bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=q.compute_dtype, llm_int8_skip_modules=skip)


# torchao's NF4 (QLoRA's format): 64 weights share an absmax scale, and 256 scales share the scale that
# quantizes them to int8 (double quantization), so a weight matrix must hold whole blocks of 64 x 256.
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256


def torchao_nf4_base(model: nn.Module) -> nn.Module:
    """`model` with every encoder-block linear's weight in torchao's NF4Tensor, frozen (the classifier and
    everything outside the blocks stay as they are): QLoRA's base in plain torch ops, which torch.compile
    fuses and a CUDA graph captures, where bitsandbytes' Linear4bit is a library call. Refused, naming the
    layer, when a weight is not made of whole blocks."""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        raise QuantError("finetune.qlora_base: torchao needs torchao: `pip install torchao` (or `pip install -e '.[fast]'`)")
    from torchao.quantization import to_nf4

    names = models.block_linears(model)
    for name in names:
        n = model.get_submodule(name).weight.numel()
        if n % (NF4_BLOCK * NF4_SCALER_BLOCK):
            raise QuantError(f"finetune.qlora_base: torchao quantizes weights in blocks of {NF4_BLOCK} x "
                             f"{NF4_SCALER_BLOCK} = {NF4_BLOCK * NF4_SCALER_BLOCK}; {name} has {n:,} weights. Use "
                             "finetune.qlora_base: bitsandbytes for this model")
    for name in names:
        linear = model.get_submodule(name)
        # From the float32 weight, so the NF4 tensor reads as float32 and peft keeps the adapters in float32.
        linear.weight = nn.Parameter(to_nf4(linear.weight.detach().float().contiguous(), NF4_BLOCK, NF4_SCALER_BLOCK),
                                     requires_grad=False)
    return model


def quantize(checkpoint: str | Path, q: QuantSettings, settings: ModelSettings, device: torch.device,
             keep: list[str] | None = None) -> nn.Module:
    """Load the 16-bit checkpoint quantized as `q` asks (keep: resolved 16-bit module names)."""
    if q.bits != 16 and device.type not in ("cpu", "cuda"):
        raise QuantError(f"bitsandbytes quantization runs on cpu or cuda, not {device.type}")
    _quiet_cast_notice()
    return models.load_checkpoint(checkpoint, settings, device, quantization_config=bnb_config(q, keep or []))


def quantize_linear(linear: nn.Linear, q: QuantSettings) -> nn.Module:
    """One 16-bit linear layer as the bitsandbytes layer `quantize` would load in its place (the same
    constructor arguments and weight quantization as transformers' integration), on its device. The
    ablation builds each layer once and swaps layers in and out instead of reloading the checkpoint."""
    import bitsandbytes as bnb

    _quiet_cast_notice()
    device, bias = linear.weight.device, linear.bias is not None
    if q.bits == 8:
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias, has_fp16_weights=False,
                                  threshold=q.int8_threshold, device="meta")
        new.weight = bnb.nn.Int8Params(linear.weight.data.to("cpu"), requires_grad=False,
                                       **{k: v for k, v in new.weight.__dict__.items() if k != "SCB"}).to(device)
    else:
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias, q.compute_dtype,
                                compress_statistics=q.double_quant, quant_type=q.type, device="meta")
        new.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, **new.weight.__dict__).to(device)
    if bias:
        new.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return models.generic_cpu_4bit(new.train(linear.training))


def save(model: nn.Module, checkpoint: str | Path, out: str | Path) -> Path:
    """The quantized model (bitsandbytes serialisation) with the 16-bit checkpoint's image processor beside it."""
    model.save_pretrained(str(out))
    AutoImageProcessor.from_pretrained(str(checkpoint)).save_pretrained(str(out))
    return Path(out)


def layer_table(model: nn.Module) -> pd.DataFrame:
    """One row per linear layer of the blocks and the classifier: its class, weight dtype and bytes."""
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        rows.append({
            "module": name,
            "layer": models.layer_index(model, name),
            "component": models.component(name),
            "class": type(module).__name__,
            "quantized": type(module).__name__ != "Linear",
            "weight_dtype": str(module.weight.dtype).replace("torch.", ""),
            "bytes": models.parameter_bytes(module),
        })
    return pd.DataFrame(rows)


def summary(q: QuantSettings, keep_param: Any, kept: list[str], table: pd.DataFrame, rows: list[dict],
            images: int) -> dict[str, Any]:
    """The run's `quant_summary` product: what was quantized and kept, and the sizes and drift of the
    quantized model (rows[1], `evaluate.measure`'s row) against the 16-bit one (rows[0])."""
    ref, mine = rows
    return {"quantization": q.describe(), "bits": q.bits, "keep_16bit": keep_param, "kept_modules": kept,
            "quantized_modules": int(table["quantized"].sum()), "linear_modules": len(table), "images": images,
            "disk_mb": mine["disk_mb"], "disk_mb_16bit": ref["disk_mb"],
            "footprint_mb": mine["footprint_mb"], "footprint_mb_16bit": ref["footprint_mb"],
            **{k: mine[k] for k in ("logits_rel_err", "top1_agreement", "kl_to_ref")}}
