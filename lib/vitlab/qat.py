"""Quantization-aware training (`finetune.method: qat`): the encoder-block linears trained through the
rounding of the format they will run in, so the weights learn to sit where that format can hold them.

Each linear becomes a `FakeQuantLinear`: its 16-bit weight goes through exactly the codec of vitlab's
own format (`lowbit.int_codes` for w{bits}a*: integer codes, row scales, power-of-two group exponents;
e4m3 with row scales for fp8) and its input through the FP8 cast at a static scale calibrated on
real images, as `lowbit.Fp8Linear` / `Int4Linear` do at inference; gradients pass the rounding
unchanged (the straight-through estimator). torchao's QAT blocks (`FakeQuantizedLinear` with
`IntxFakeQuantizeConfig` / `Float8FakeQuantizeConfig`) fake-quantize torchao's formats: affine
per-group scales and dynamic per-row FP8. vitlab's formats differ in both (power-of-two group steps,
±7/±3/±1 codes, one calibrated activation scale), and training towards another codec is training for
another model, so the few lines here mirror vitlab's own. After training, `strip` gives back the
plain linears, the checkpoint is saved in 16-bit, and the speed path converts it to the real format.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import lowbit, models
from .errors import SpeedPathError


def fake_weight(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """The weight `fmt`'s linear multiplies by, in the weight's dtype (a differentiable copy: the
    rounding's gradient is the identity)."""
    w = weight.float()
    if fmt == "fp8":
        row_scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / lowbit.FP8_MAX
        rounded = (w / row_scale).to(lowbit.FP8).float() * row_scale
    else:
        bits, _ = lowbit.parse_int(fmt)
        codes, exponent, row_scale = lowbit.int_codes(w.detach(), bits)
        step = torch.exp2(-exponent).repeat_interleave(lowbit.INT4_GROUP, dim=1) * row_scale[:, None]
        rounded = codes * step
    return (w + (rounded - w).detach()).to(weight.dtype)


def fake_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x` through the static-scale FP8 cast of `lowbit.Fp8Activations.quantize` and back."""
    rounded = (x.float() / scale).clamp(-lowbit.FP8_MAX, lowbit.FP8_MAX).to(lowbit.FP8).float() * scale
    return x + (rounded.to(x.dtype) - x).detach()


class FakeQuantLinear(nn.Module):
    """A trainable nn.Linear that computes as `fmt`'s linear would: the same rounded weights, and for
    FP8-activation formats the same rounded inputs (one scale from `input_amax`)."""

    def __init__(self, linear: nn.Linear, fmt: str, input_amax: float | None):
        super().__init__()
        self.linear, self.fmt = linear, fmt
        self.activations = fmt in lowbit.FP8_ACTIVATIONS
        if self.activations:
            self.register_buffer("input_scale", torch.tensor(max(input_amax, 1e-12) / lowbit.FP8_MAX,
                                                             device=linear.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fake_fp8(x, self.input_scale) if self.activations else x
        weight = fake_weight(self.linear.weight, self.fmt)
        return F.linear(x, weight.to(x.dtype), None if self.linear.bias is None else self.linear.bias.to(x.dtype))


def prepare(model: nn.Module, fmt: str, batches: Any, max_batches: int = 4) -> nn.Module:
    """Every encoder-block linear of `model` a `FakeQuantLinear` in `fmt`, in place; FP8 input scales from
    the largest |input| over `max_batches` of `batches` (real images, run in 16-bit first)."""
    names = models.block_linears(model)
    if not all(type(model.get_submodule(n)) is nn.Linear for n in names):
        raise SpeedPathError("finetune.method qat fake-quantizes the model's plain linears (a full fine-tune)")
    return lowbit.convert(model, dict.fromkeys(names, fmt), batches, max_batches,
                          make=lambda fmt, linear, amax, _gemm: FakeQuantLinear(linear, fmt, amax))


def strip(model: nn.Module) -> nn.Module:
    """The plain linears back, with the weights QAT trained, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantLinear):
            model.set_submodule(name, module.linear)
    return model
