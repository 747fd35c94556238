"""vitlab's own low-bit linears: static-scale FP8 (e4m3 weights with per-row scales, one activation scale
calibrated on real images) and 4-bit weights (int4 codes, a row scale and power-of-two group exponents,
exact in FP8 and bf16), their codec and calibration, and the fused FP8 MLP on vitlab's kernel
(`kernels.fp8_linear`). `speed.apply` puts them into a model."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels, models, quant
from .errors import SpeedPathError
from .settings import FP8_ACTIVATIONS, LAYER_FORMATS

FP8 = kernels.FP8
FP8_MAX = torch.finfo(FP8).max  # 448


def check_fp8_gpu(device: torch.device) -> None:
    """FP8 tensor cores arrived with Ada and Hopper: on an older GPU, say so before any work."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise SpeedPathError(f"FP8 matmuls need an Ada or Hopper GPU (SM89+); {torch.cuda.get_device_name(device)} is SM{major}{minor}")


INT4_GROUP = kernels.INT4_GROUP  # inputs that share one power-of-two exponent in an Int4Linear row
INT4_MAX_EXPONENT = 9  # q * 2**-9 is still exact in e4m3 (its subnormals are multiples of 2**-9)


def int_codes(weight: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric integer codes of a (out, in) weight in -L..L (L = 2**(bits-1) - 1: 7, 3 or 1 for 4-, 3- and
    2-bit), one float scale per output row, and per group of 128 inputs a power-of-two exponent e (the
    group's step is the row's step / 2**e). Power-of-two group steps keep every dequantized value
    q * 2**-e exact in FP8 e4m3 and bf16, so the tensor cores see the low-bit weights themselves, with
    the row scale applied to the GEMM's output.
    Returns (codes (out, in) float32, exponents (out, in/128) float32, row scales (out,) float32)."""
    out, inp = weight.shape
    if inp % INT4_GROUP:
        raise SpeedPathError(f"int4 linears need inputs in groups of {INT4_GROUP}; this layer has {inp}")
    if bits not in (2, 3, 4):
        raise SpeedPathError(f"vitlab's integer weight codes have 2, 3 or 4 bits, not {bits}")
    levels = 2 ** (bits - 1) - 1
    w = weight.float().view(out, inp // INT4_GROUP, INT4_GROUP)
    row_max = w.abs().amax(dim=(1, 2)).clamp(min=1e-12)
    group_max = w.abs().amax(dim=2).clamp(min=1e-30)
    exponent = torch.floor(torch.log2(row_max[:, None] / group_max)).clamp(0, INT4_MAX_EXPONENT)
    step = (row_max / levels)[:, None, None] * torch.exp2(-exponent)[..., None]
    codes = torch.round(w / step).clamp(-levels, levels)
    return codes.view(out, inp), exponent, row_max / levels


def int4_quantize(weight: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`int_codes` in int4 storage: (codes + 8 packed two per byte (out, in/2) uint8: inputs 2j and 2j + 1 in
    byte j's low and high nibble; exponents (out, in/128) uint8; row scales (out,) float32). Fewer bits
    use the same nibbles (and kernels) with fewer levels."""
    codes, exponent, row_scale = int_codes(weight.detach(), bits)
    codes = (codes + 8).to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), exponent.to(torch.uint8), row_scale


def int4_dequantize(packed: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """The (out, in) float32 weight of `int4_quantize`'s codes in units of the row scale. Plain tensor
    ops, so under torch.compile it is one kernel per layer reading half a byte per weight (or a
    prologue fused into the GEMM that reads it)."""
    out = packed.shape[0]
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).view(out, -1, INT4_GROUP)
    return ((codes.to(torch.float32) - 8) * torch.exp2(-exponent.to(torch.float32))[..., None]).view(out, -1)


class Fp8Activations(nn.Module):
    """What the linears with static FP8 activation scales share. Inputs are divided by one number
    calibrated on real images (`input_amax`), so the cast to FP8 is a pointwise op that torch.compile
    fuses into whatever produced the input (layer norm, GELU, the attention output); inputs beyond the
    calibrated range saturate at +-448 rather than overflow. The GEMM is cuBLAS's (`torch._scaled_mm`)
    or, with fp8_gemm "triton" (given when the layer is built), vitlab's (kernels.fp8_linear) where that one is faster: at up
    to kernels.SMALL_M rows, where its tiles fit the shape; with more rows cuBLAS's main loop is faster,
    and only fc1 (whose GELU and FP8 output cast the kernel fuses, `FusedMLP`) stays on vitlab's."""

    fp8_gemm = "cublas"  # speed.fp8_gemm: "cublas" or "triton", set by the constructor
    activations = "fp8"

    def quantize(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows.float() / self.input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)

    def fp8_weight(self) -> torch.Tensor:
        """The (out, in) e4m3 weight, in units of the row scales."""
        raise NotImplementedError

    def kernel_weight(self, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight operand (and int4 exponents) vitlab's kernel reads for this many rows."""
        return self.fp8_weight(), None

    def cublas(self, xq: torch.Tensor) -> torch.Tensor:
        return torch._scaled_mm(xq, self.fp8_weight().t(), scale_a=self.input_scale.expand(xq.shape[0], 1).contiguous(),
                                scale_b=self.weight_scale, bias=self.bias, out_dtype=self.out_dtype, use_fast_accum=True)

    def matmul(self, xq: torch.Tensor, gelu: bool = False, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        """FP8 rows times the weight on vitlab's kernel: GELU and an FP8 output cast in its epilogue."""
        weight, exponent = self.kernel_weight(xq.shape[0])
        return kernels.fp8_linear(xq, weight, exponent, self.input_scale, self.weight_scale, self.bias, out_scale,
                                  gelu, self.out_dtype)

    def gemm(self, xq: torch.Tensor) -> torch.Tensor:
        """The faster GEMM for this many rows."""
        return self.matmul(xq) if self.fp8_gemm == "triton" and xq.shape[0] <= kernels.SMALL_M else self.cublas(xq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return self.gemm(self.quantize(rows)).view(*x.shape[:-1], self.out_features)


class Fp8Linear(Fp8Activations):
    """A linear layer on FP8 tensor cores with a *static* activation scale: weights in e4m3 with one
    scale per output row, inputs scaled by one number calibrated on real images (`calibrate_fp8`)."""

    def __init__(self, linear: nn.Linear, input_amax: float, fp8_gemm: str = "cublas"):
        super().__init__()
        self.fp8_gemm = _gemm(fp8_gemm)
        weight = linear.weight.detach().float()
        row_scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        self.register_buffer("weight", (weight / row_scale).to(FP8))  # (out, in): .t() is the column-major operand
        self.register_buffer("weight_scale", row_scale.t().contiguous())  # (1, out)
        self.register_buffer("input_scale", torch.tensor(max(input_amax, 1e-12) / FP8_MAX, device=weight.device))
        self.bias = linear.bias
        self.out_dtype = linear.weight.dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def fp8_weight(self) -> torch.Tensor:
        return self.weight


class Int4Linear(Fp8Activations):
    """A linear layer with 4-bit weights (`int4_quantize`: ~4.06 bits per weight with its exponents; `bits`
    3 or 2 store fewer levels in the same nibbles).
    activations "fp8" (W4A8): inputs cast to e4m3 with a static scale, and the exact 4-bit weights
    expanded to e4m3 for the FP8 tensor cores: in memory by a compiled kernel before cuBLAS (or before
    vitlab's kernel for many rows), in registers inside vitlab's kernel for few rows, where reading
    half a byte per weight matters; "bf16" (W4A16): the weights expanded to the input's 16-bit type."""

    def __init__(self, linear: nn.Linear, activations: str, input_amax: float | None = None, fp8_gemm: str = "cublas",
                 bits: int = 4):
        super().__init__()
        if activations not in ("fp8", "bf16"):
            raise SpeedPathError(f"Int4Linear activations are 'fp8' or 'bf16', not '{activations}'")
        self.fp8_gemm = _gemm(fp8_gemm) if activations == "fp8" else "cublas"
        packed, exponent, row_scale = int4_quantize(linear.weight, bits)
        self.register_buffer("packed", packed)
        self.register_buffer("exponent", exponent)
        self.register_buffer("weight_scale", row_scale[None, :].contiguous())  # (1, out)
        if activations == "fp8":
            self.register_buffer("input_scale", torch.tensor(max(input_amax, 1e-12) / FP8_MAX, device=packed.device))
        self.bias, self.activations = linear.bias, activations
        self.out_dtype = linear.weight.dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def fp8_weight(self) -> torch.Tensor:
        return int4_dequantize(self.packed, self.exponent).to(FP8)

    def kernel_weight(self, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return (self.packed, self.exponent) if rows <= kernels.SMALL_M else (self.fp8_weight(), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations == "fp8":
            return super().forward(x)
        rows = x.reshape(-1, x.shape[-1])
        out = F.linear(rows, int4_dequantize(self.packed, self.exponent).to(rows.dtype)) * self.weight_scale.to(rows.dtype)
        out = out + self.bias if self.bias is not None else out
        return out.view(*x.shape[:-1], self.out_features)


class FusedMLP(nn.Module):
    """A ViT block's MLP on vitlab's FP8 kernel: fc1 applies GELU and casts to FP8 at fc2's static input
    scale in its epilogue, so fc2 reads one byte per activation and no kernel sits between them."""

    def __init__(self, fc1: nn.Module, fc2: nn.Module):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        hidden = self.fc1.matmul(self.fc1.quantize(rows), gelu=True, out_scale=self.fc2.input_scale)
        return self.fc2.gemm(hidden).view(*x.shape[:-1], self.fc2.out_features)


def _gemm(fp8_gemm: str) -> str:
    if fp8_gemm not in ("cublas", "triton"):
        raise SpeedPathError(f"speed.fp8_gemm is 'cublas' or 'triton', not '{fp8_gemm}'")
    if fp8_gemm == "triton" and not kernels.AVAILABLE:
        raise SpeedPathError("vitlab's FP8 kernel needs Triton (`pip install triton`; torch's CUDA wheels bring it)")
    return fp8_gemm


def fuse_mlp(model: nn.Module, layers: models.Layers | None = None) -> nn.Module:
    """Each block's fc1 -> GELU -> fc2 a `FusedMLP`, for FP8-activation linears built on vitlab's kernel
    (blocks kept in 16-bit keep their MLP)."""
    if getattr(model.config, "hidden_act", None) != "gelu":
        raise SpeedPathError(f"the fused MLP applies exact GELU; this model's activation is {model.config.hidden_act!r}")
    fused = 0
    for layer in (layers or models.encoder_layers(model)).blocks:
        fc1, fc2 = layer.mlp.fc1, layer.mlp.fc2
        if all(isinstance(m, Fp8Activations) and m.activations == "fp8" and m.fp8_gemm == "triton" for m in (fc1, fc2)):
            layer.mlp = FusedMLP(fc1, fc2)
            fused += 1
    if not fused:
        raise SpeedPathError("the fused MLP runs FP8 linears built with fp8_gemm 'triton' (speed.fp8 static or "
                             "speed.int4 w4a8, with speed.fp8_gemm: triton)")
    return model


@torch.inference_mode()
def input_amax(model: nn.Module, names: list[str], batches: Any, max_batches: int) -> dict[str, float]:
    """The largest |input| of each named module over `max_batches` batches of real images."""
    amax = dict.fromkeys(names, 0.0)

    def record(name):
        return lambda module, args: amax.__setitem__(name, max(amax[name], args[0].detach().abs().amax().item()))

    hooks = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
    parameter = next(model.parameters())
    seen = 0
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(pixel_values=x.to(parameter.device, parameter.dtype))
            seen += 1
            if seen == max_batches:
                break
    finally:
        for h in hooks:
            h.remove()
    if seen == 0:
        raise SpeedPathError("static FP8 activation scales are calibrated on real images, and none came")
    return amax


def _plain_linears(model: nn.Module, layers: models.Layers | None, keep: list | str = ()) -> list[str]:
    """The encoder-block linears but those `keep` names (quant.resolve_keep)."""
    names = models.block_linears(model, layers)
    kept = set(quant.resolve_keep(model, keep, "speed.keep_16bit")) if keep else set()
    return [n for n in names if n not in kept]


def _replace(model: nn.Module, names: list[str], make) -> nn.Module:
    for name in names:
        parent, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), leaf, make(name, model.get_submodule(name)))
    return model


def make_linear(fmt: str, linear: nn.Linear, input_amax: float | None, fp8_gemm: str = "cublas") -> nn.Module:
    """`linear` in one of vitlab's formats (settings.LAYER_FORMATS but 16bit): fp8 or w{bits}a{8|16}."""
    if fmt == "fp8":
        return Fp8Linear(linear, input_amax, fp8_gemm)
    bits, activations = parse_int(fmt)
    return Int4Linear(linear, activations, input_amax, fp8_gemm if activations == "fp8" else "cublas", bits)


def parse_int(fmt: str) -> tuple[int, str]:
    """'w3a8' -> (3, 'fp8'); 'w4a16' -> (4, 'bf16')."""
    if fmt not in LAYER_FORMATS or not fmt.startswith("w"):
        raise SpeedPathError(f"unknown low-bit format '{fmt}'; choose from {list(LAYER_FORMATS)}")
    bits, acts = fmt[1:].split("a")
    return int(bits), "fp8" if acts == "8" else "bf16"


def assignment(model: nn.Module, speed, layers: models.Layers | None = None) -> dict[str, str]:
    """Each encoder-block linear that the `speed` settings put in a low-bit format -> that format: one per
    layer from speed.layer_formats, or speed.fp8 / speed.int4 everywhere but speed.keep_16bit. Refused
    unless the linears are the 16-bit model's own."""
    layers = layers or models.encoder_layers(model)
    if speed.layer_formats:
        if len(speed.layer_formats) != len(layers.blocks):
            raise SpeedPathError(f"speed.layer_formats lists {len(speed.layer_formats)} formats for "
                                 f"{len(layers.blocks)} encoder layers: give one per layer")
        index = lambda name: int(name[len(layers.prefix) + 1:].split(".", 1)[0])  # noqa: E731
        formats = {n: speed.layer_formats[index(n)] for n in models.block_linears(model, layers)}
        formats = {n: f for n, f in formats.items() if f != "16bit"}
        setting = "speed.layer_formats"
    else:
        setting = "speed.fp8" if speed.fp8 == "static" else "speed.int4"
        formats = dict.fromkeys(_plain_linears(model, layers, speed.keep_16bit), speed.uniform_format)
    if not all(type(model.get_submodule(n)) is nn.Linear for n in formats):
        raise SpeedPathError(f"{setting} needs the 16-bit model's plain linears (quant.bits: 16, speed.torchao: none)")
    return formats


def convert(model: nn.Module, formats: dict[str, str], batches: Any = None, max_batches: int = 4,
            fp8_gemm: str = "cublas", make=make_linear) -> nn.Module:
    """Replace each named linear with `make(format, linear, input_amax, fp8_gemm)` (its `make_linear` twin, or
    QAT's fake-quantized one); FP8-activation formats get the largest |input| seen over `max_batches`
    batches of real images (the model runs them in 16-bit first)."""
    scaled = [n for n, f in formats.items() if f in FP8_ACTIVATIONS]
    if scaled:
        check_fp8_gpu(next(model.parameters()).device)
    amax = input_amax(model, scaled, batches, max_batches) if scaled else {}
    return _replace(model, list(formats), lambda name, linear: make(formats[name], linear, amax.get(name), fp8_gemm))
