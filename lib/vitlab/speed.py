"""Speed paths beyond stock eager PyTorch (the `speed` params): one fused q/k/v projection with
mask-free attention, the patch embedding as one matmul, vitlab's static-scale FP8 linears and 4-bit
linears (int4 weights with FP8 or 16-bit activations), torchao's tensor-core int8 / FP8 and int4
weight-only kernels (Hopper), torch.compile (with Inductor's GEMM autotuning) and CUDA-graph replay.

bitsandbytes makes a model small; on a GPU its eager forward pays Python dispatch and a
dequantisation per linear layer. These paths attack those costs. Each returns something called as
`model(pixel_values=x)` whose `.logits` are the output, so bench and infer use it unchanged.
"""
from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels, models
from .settings import Speed as SpeedSettings  # noqa: F401 (the typed `speed` params, torch-free)

TORCHAO = {
    "fp8": "Float8DynamicActivationFloat8WeightConfig",  # FP8 activations and weights, per-row scales
    "int8dyn": "Int8DynamicActivationInt8WeightConfig",  # int8 activations and weights, int8 tensor cores
    "int4wo": "Int4WeightOnlyConfig",  # int4 weights (group 128), bf16 activations, tinygemm kernel
}


class SpeedPathError(RuntimeError):
    """A speed path this machine or model cannot take."""


class FusedQKVAttention(nn.Module):
    """transformers' ViTAttention with q, k and v as one linear (one GEMM, one read of its input, one
    activation quantization under FP8) and SDPA called without a mask: a ViT classifier attends to
    every token, and a mask (which transformers builds under a whole-model compile) keeps SDPA off
    its flash kernel. Same outputs as the module it replaces."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
        if not all(type(m) is nn.Linear for m in (q, k, v)):
            raise SpeedPathError("fuse_qkv needs plain 16-bit q/k/v linears (quant.bits: 16, before any FP8 or torchao)")
        self.head_dim, self.scaling = attention.head_dim, attention.scaling
        self.qkv = nn.Linear(q.in_features, 3 * q.out_features, bias=q.bias is not None,
                             device=q.weight.device, dtype=q.weight.dtype)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            if q.bias is not None:
                self.qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        self.o_proj = attention.o_proj

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        b, n, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states).view(b, n, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1)), None


def fuse_qkv(model: nn.Module) -> nn.Module:
    """Every encoder block's attention as a `FusedQKVAttention`, in place."""
    _, layers = models.encoder_layers(model)
    for layer in layers:
        layer.attention = FusedQKVAttention(layer.attention)
    return model


class PatchMatmul(nn.Module):
    """The patch embedding's convolution as one matmul. Its kernel equals its stride, so cutting the
    image into patches is a reshape, and the convolution is a GEMM over channels x patch pixels
    (cuDNN's convolution and the layout changes around it took 2.5 ms of a 53 ms FP8 ViT-L/16
    forward at batch 256 on the H100; as a GEMM it is ~0.2 ms). Returns the convolution's layout."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not (conv.kernel_size == conv.stride and conv.padding == (0, 0) and conv.dilation == (1, 1)
                and conv.groups == 1 and conv.kernel_size[0] == conv.kernel_size[1]):
            raise SpeedPathError("patch_matmul needs a square patch convolution whose stride equals its kernel")
        self.patch = conv.kernel_size[0]
        self.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1), requires_grad=False)
        self.bias = conv.bias

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, c, h, w = pixel_values.shape
        p = self.patch
        rows, cols = h // p, w // p  # like the convolution, drop pixels past the last whole patch
        patches = (pixel_values[:, :, :rows * p, :cols * p].reshape(b, c, rows, p, cols, p)
                   .permute(0, 2, 4, 1, 3, 5).reshape(b * rows * cols, c * p * p))
        return F.linear(patches, self.weight, self.bias).view(b, rows, cols, -1).permute(0, 3, 1, 2)


def patch_matmul(model: nn.Module) -> nn.Module:
    """The ViT's patch-embedding convolution as a `PatchMatmul`, in place."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and models.component(n) == "patch_embed"]
    if len(convs) != 1:
        raise SpeedPathError(f"patch_matmul looks for one patch-embedding convolution and found {len(convs)}")
    parent, leaf = convs[0].rsplit(".", 1)
    setattr(model.get_submodule(parent), leaf, PatchMatmul(model.get_submodule(convs[0])))
    return model


FP8 = kernels.FP8
FP8_MAX = torch.finfo(FP8).max  # 448


def _check_fp8_gpu(device: torch.device) -> None:
    """FP8 tensor cores arrived with Ada and Hopper: on an older GPU, say so before any work."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise SpeedPathError(f"FP8 matmuls need an Ada or Hopper GPU (SM89+); {torch.cuda.get_device_name(device)} is SM{major}{minor}")


INT4_GROUP = kernels.INT4_GROUP  # inputs that share one power-of-two exponent in an Int4Linear row
INT4_MAX_EXPONENT = 9  # q * 2**-9 is still exact in e4m3 (its subnormals are multiples of 2**-9)


def int4_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric int4 codes of a (out, in) weight: one float scale per output row, and per group of 128
    inputs a power-of-two exponent e (the group's step is the row's step / 2**e). Power-of-two group
    steps keep every dequantized value q * 2**-e exact in FP8 e4m3 and bf16, so the tensor cores see
    the 4-bit weights themselves, with the row scale applied to the GEMM's output.
    Returns (codes packed two per byte (out, in/2) uint8: inputs 2j and 2j + 1 in byte j's low and high
    nibble; exponents (out, in/128) uint8; row scales (out,) float32)."""
    out, inp = weight.shape
    if inp % INT4_GROUP:
        raise SpeedPathError(f"int4 linears need inputs in groups of {INT4_GROUP}; this layer has {inp}")
    w = weight.detach().float().view(out, inp // INT4_GROUP, INT4_GROUP)
    row_max = w.abs().amax(dim=(1, 2)).clamp(min=1e-12)
    group_max = w.abs().amax(dim=2).clamp(min=1e-30)
    exponent = torch.floor(torch.log2(row_max[:, None] / group_max)).clamp(0, INT4_MAX_EXPONENT)
    step = (row_max / 7)[:, None, None] * torch.exp2(-exponent)[..., None]
    codes = (torch.round(w / step).clamp(-7, 7) + 8).to(torch.uint8).view(out, inp)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), exponent.to(torch.uint8), row_max / 7


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
    or, with kernel "triton" (`fuse_fp8`), vitlab's (kernels.fp8_linear) where that one is faster: at up
    to kernels.SMALL_M rows, where its tiles fit the shape; with more rows cuBLAS's main loop is faster,
    and only fc1 (whose GELU and FP8 output cast the kernel fuses, `FusedMLP`) stays on vitlab's."""

    kernel = "cublas"
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
        return self.matmul(xq) if self.kernel == "triton" and xq.shape[0] <= kernels.SMALL_M else self.cublas(xq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return self.gemm(self.quantize(rows)).view(*x.shape[:-1], self.out_features)


class Fp8Linear(Fp8Activations):
    """A linear layer on FP8 tensor cores with a *static* activation scale: weights in e4m3 with one
    scale per output row, inputs scaled by one number calibrated on real images (`calibrate_fp8`)."""

    def __init__(self, linear: nn.Linear, input_amax: float):
        super().__init__()
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
    """A linear layer with 4-bit weights (`int4_quantize`: ~4.06 bits per weight with its exponents).
    activations "fp8" (W4A8): inputs cast to e4m3 with a static scale, and the exact 4-bit weights
    expanded to e4m3 for the FP8 tensor cores: in memory by a compiled kernel before cuBLAS (or before
    vitlab's kernel for many rows), in registers inside vitlab's kernel for few rows, where reading
    half a byte per weight matters; "bf16" (W4A16): the weights expanded to the input's 16-bit type."""

    def __init__(self, linear: nn.Linear, activations: str, input_amax: float | None = None):
        super().__init__()
        if activations not in ("fp8", "bf16"):
            raise SpeedPathError(f"Int4Linear activations are 'fp8' or 'bf16', not '{activations}'")
        packed, exponent, row_scale = int4_quantize(linear.weight)
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


def fuse_fp8(model: nn.Module) -> nn.Module:
    """Every FP8-activation linear on vitlab's kernel, and each block's fc1 -> GELU -> fc2 a `FusedMLP`."""
    if not kernels.AVAILABLE:
        raise SpeedPathError("vitlab's FP8 kernel needs Triton (`pip install triton`; torch's CUDA wheels bring it)")
    if getattr(model.config, "hidden_act", None) != "gelu":
        raise SpeedPathError(f"the fused MLP applies exact GELU; this model's activation is {model.config.hidden_act!r}")
    linears = [m for m in model.modules() if isinstance(m, Fp8Activations) and m.activations == "fp8"]
    if not linears:
        raise SpeedPathError("fuse_fp8 runs FP8 linears (speed.fp8 or speed.int4 w4a8 first)")
    for linear in linears:
        linear.kernel = "triton"
    for layer in models.encoder_layers(model)[1]:
        layer.mlp = FusedMLP(layer.mlp.fc1, layer.mlp.fc2)
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


def _plain_linears(model: nn.Module, setting: str) -> list[str]:
    """The encoder-block linears, refused unless all are the 16-bit model's own."""
    names = models.block_linears(model)
    if not all(type(model.get_submodule(n)) is nn.Linear for n in names):
        raise SpeedPathError(f"{setting} needs the 16-bit model's plain linears (quant.bits: 16, speed.torchao: none)")
    return names


def _replace(model: nn.Module, names: list[str], make) -> nn.Module:
    for name in names:
        parent, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), leaf, make(name, model.get_submodule(name)))
    return model


def calibrate_fp8(model: nn.Module, batches: Any, max_batches: int) -> nn.Module:
    """Replace every encoder-block linear with an `Fp8Linear` whose input scale is the largest |input|
    seen over `max_batches` batches of real images (the model runs them in 16-bit first)."""
    _check_fp8_gpu(next(model.parameters()).device)
    names = _plain_linears(model, "speed.fp8")
    amax = input_amax(model, names, batches, max_batches)
    return _replace(model, names, lambda name, linear: Fp8Linear(linear, amax[name]))


def int4_linears(model: nn.Module, mode: str, batches: Any = None, max_batches: int = 4) -> nn.Module:
    """Every encoder-block linear as an `Int4Linear`: mode "w4a8" (FP8 activations, scales calibrated on
    `batches` of real images) or "w4a16"."""
    if mode not in ("w4a8", "w4a16"):
        raise SpeedPathError(f"unknown speed.int4 '{mode}'; choose 'w4a8' or 'w4a16'")
    names = _plain_linears(model, "speed.int4")
    if mode == "w4a16":
        return _replace(model, names, lambda name, linear: Int4Linear(linear, "bf16"))
    _check_fp8_gpu(next(model.parameters()).device)
    amax = input_amax(model, names, batches, max_batches)
    return _replace(model, names, lambda name, linear: Int4Linear(linear, "fp8", amax[name]))


class CudaGraphed(nn.Module):
    """Replays one captured CUDA graph per input shape: no Python or launch overhead per layer.

    Inputs are copied into a static buffer; the returned logits live in the graph's static output
    and are overwritten by the next call (clone them to keep them).
    """

    def __init__(self, model: nn.Module, warmup: int = 3):
        super().__init__()
        self.model, self.warmup = model, warmup
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    @torch.inference_mode()
    def _capture(self, x: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        static_x = x.clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):  # lazy initialisation (cuBLAS handles, autotuning) before capture
                self.model(pixel_values=static_x)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.model(pixel_values=static_x).logits
        return graph, static_x, static_out

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        if pixel_values.device.type != "cuda":
            raise SpeedPathError("CUDA graphs need the model and inputs on a CUDA GPU")
        key = (tuple(pixel_values.shape), pixel_values.dtype)
        if key not in self._graphs:
            self._graphs[key] = self._capture(pixel_values)
        graph, static_x, static_out = self._graphs[key]
        static_x.copy_(pixel_values)
        graph.replay()
        return SimpleNamespace(logits=static_out)


def torchao_quantize(model: nn.Module, kind: str) -> nn.Module:
    """Quantize the encoder-block linears in place with torchao (the classifier stays 16-bit)."""
    if kind not in TORCHAO:
        raise SpeedPathError(f"unknown torchao quantization '{kind}'; choose one of {list(TORCHAO)}")
    if importlib.util.find_spec("torchao") is None:
        raise SpeedPathError("torchao is not installed: `pip install torchao` (a release matching your torch)")
    import torchao.quantization as tq

    device = next(model.parameters()).device
    if kind == "fp8":
        if device.type != "cuda":
            raise SpeedPathError("torchao's FP8 matmuls need an Ada or Hopper GPU (SM89+); speed.fp8: static also runs on a CPU")
        _check_fp8_gpu(device)
    if kind == "fp8":
        config = tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerRow())
    elif kind == "int8dyn":
        config = tq.Int8DynamicActivationInt8WeightConfig()
    else:
        config = tq.Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    targets = set(models.block_linears(model))
    tq.quantize_(model, config, filter_fn=lambda module, fqn: isinstance(module, nn.Linear) and fqn in targets)
    return model


COMPILE_MODES = {"default": None, "max-autotune": "max-autotune-no-cudagraphs"}  # graphs are CudaGraphed's job


def compiled(model: nn.Module, mode: str = "default", scope: str = "model") -> nn.Module:
    """torch.compile with a static shape per batch size (each new batch size compiles once).

    mode "max-autotune" lets Inductor time Triton GEMM templates against cuBLAS for every shape and
    fuse the pointwise work around a GEMM (bias, GELU, an FP8 cast, a weight's dequantization) into
    the template that wins; it compiles for minutes rather than seconds.

    scope "model" compiles the whole forward. Traced whole, transformers' ViT hands SDPA a mask,
    which rules out the flash and cuDNN kernels and leaves a float32 math attention (measured on
    the H100: 58 of 125 ms per ViT-L forward at batch 256). scope "linears" compiles each block's
    MLP and attention projections and keeps attention eager, on the fused kernel.
    """
    if mode not in COMPILE_MODES:
        raise SpeedPathError(f"unknown compile mode '{mode}'; choose one of {list(COMPILE_MODES)}")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    mode = COMPILE_MODES[mode]
    if scope == "model":
        return torch.compile(model, mode=mode, dynamic=False)
    if scope != "linears":
        raise SpeedPathError(f"unknown compile scope '{scope}'; choose 'model' or 'linears'")
    names = [n for n, _ in model.named_modules()
             if "." in n and models.component(n) == "mlp" and models.component(n.rsplit(".", 1)[0]) != "mlp"]
    for name in names + models.attention_linears(model):
        parent, leaf = name.rsplit(".", 1)
        owner = model.get_submodule(parent)
        setattr(owner, leaf, torch.compile(getattr(owner, leaf), mode=mode, dynamic=False))
    return model


def apply(model: nn.Module, speed: SpeedSettings, calibration: Any = None) -> nn.Module:
    """The `speed` settings on a loaded model: fused q/k/v and patch matmul, FP8, int4 or torchao
    linears, then compile, then CUDA graphs. `calibration`: batches of real images, needed by
    `fp8: static` and `int4: w4a8` (their activation scales)."""
    if speed.calibrates and calibration is None:
        raise SpeedPathError(f"{speed.describe()} calibrates FP8 activation scales on real images: pass calibration batches")
    if speed.fuse_qkv:
        model = fuse_qkv(model)
    if speed.patch_matmul:
        model = patch_matmul(model)
    if speed.fp8 == "static":
        model = calibrate_fp8(model, calibration, speed.calibration_batches)
    if speed.int4 != "none":
        model = int4_linears(model, speed.int4, calibration, speed.calibration_batches)
    if speed.fp8_gemm == "triton":
        model = fuse_fp8(model)
    if speed.torchao != "none":
        model = torchao_quantize(model, speed.torchao)
    if speed.compile != "none":
        model = compiled(model, mode=speed.compile_mode, scope=speed.compile)
    if speed.cuda_graph:
        model = CudaGraphed(model)
    return model


def unwrapped(model: nn.Module) -> nn.Module:
    """The module that holds the weights, under CUDA-graph and whole-model compile wrappers."""
    while isinstance(model, CudaGraphed) or hasattr(model, "_orig_mod"):
        model = model.model if isinstance(model, CudaGraphed) else model._orig_mod
    return model


def torchao_weights(model: nn.Module) -> bool:
    return any(type(p).__module__.startswith("torchao") for p in unwrapped(model).parameters())


def converted(model: nn.Module) -> bool:
    """Whether the speed paths changed the weights after loading (torchao tensors, vitlab FP8 / int4 linears):
    then the checkpoint on disk is not what runs."""
    return torchao_weights(model) or any(isinstance(m, Fp8Activations) for m in unwrapped(model).modules())


def storage_bytes(model: nn.Module) -> int:
    """Size on disk: save_pretrained for plain and bitsandbytes models, torch.save for weights the speed
    paths converted (torchao tensors, FP8 and int4 buffers)."""
    inner = unwrapped(model)
    with tempfile.TemporaryDirectory() as tmp:
        if converted(model):
            torch.save(inner.state_dict(), Path(tmp) / "model.pt")
        else:
            inner.save_pretrained(tmp)
        return models.disk_bytes(tmp)
