"""Speed paths beyond stock eager PyTorch (the `speed` params): one fused q/k/v projection with
mask-free attention, vitlab's static-scale FP8 linears, torchao's tensor-core int8 / FP8 and int4
weight-only kernels (Hopper), torch.compile and CUDA-graph replay.

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

from . import models

TORCHAO = {
    "fp8": "Float8DynamicActivationFloat8WeightConfig",  # FP8 activations and weights, per-row scales
    "int8dyn": "Int8DynamicActivationInt8WeightConfig",  # int8 activations and weights, int8 tensor cores
    "int4wo": "Int4WeightOnlyConfig",  # int4 weights (group 128), bf16 activations, tinygemm kernel
}


class SpeedPathError(RuntimeError):
    """A speed path this machine or model cannot take."""


@dataclass(frozen=True)
class SpeedSettings:
    """The `speed` params, applied in this order: fused q/k/v, FP8 linears (vitlab's static ones or
    torchao's), torch.compile, CUDA-graph replay."""
    torchao: str = "none"
    compile: str = "none"
    cuda_graph: bool = False
    fuse_qkv: bool = False
    fp8: str = "none"
    calibration_batches: int = 4

    @classmethod
    def from_params(cls, speed_params: dict[str, Any]) -> "SpeedSettings":
        return cls(torchao=speed_params["torchao"], compile=speed_params["compile"],
                   cuda_graph=speed_params["cuda_graph"], fuse_qkv=speed_params["fuse_qkv"],
                   fp8=speed_params["fp8"], calibration_batches=speed_params["calibration_batches"])

    @property
    def active(self) -> bool:
        return (self.torchao != "none" or self.compile != "none" or self.cuda_graph or self.fuse_qkv
                or self.fp8 != "none")

    def describe(self) -> str:
        parts = ["fused qkv"] if self.fuse_qkv else []
        parts += [f"fp8 {self.fp8}"] if self.fp8 != "none" else []
        parts += [f"torchao {self.torchao}"] if self.torchao != "none" else []
        parts += [f"compile {self.compile}"] if self.compile != "none" else []
        parts += ["cuda graph"] if self.cuda_graph else []
        return " + ".join(parts)


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


FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def _check_fp8_gpu(device: torch.device) -> None:
    """FP8 tensor cores arrived with Ada and Hopper: on an older GPU, say so before any work."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise SpeedPathError(f"FP8 matmuls need an Ada or Hopper GPU (SM89+); {torch.cuda.get_device_name(device)} is SM{major}{minor}")


class Fp8Linear(nn.Module):
    """A linear layer on FP8 tensor cores with a *static* activation scale: weights in e4m3 with one
    scale per output row, inputs scaled by one number calibrated on real images (`calibrate_fp8`).
    With no amax to compute at run time, the cast to FP8 is a pointwise op that torch.compile fuses
    into whatever produced the input (layer norm, GELU, the attention output). Inputs beyond the
    calibrated range saturate at +-448 rather than overflow."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        xq = (rows.float() / self.input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=self.input_scale.expand(rows.shape[0], 1).contiguous(),
                               scale_b=self.weight_scale, bias=self.bias, out_dtype=self.out_dtype, use_fast_accum=True)
        return out.view(*x.shape[:-1], self.out_features)


@torch.inference_mode()
def calibrate_fp8(model: nn.Module, batches: Any, max_batches: int) -> nn.Module:
    """Replace every encoder-block linear with an `Fp8Linear` whose input scale is the largest |input|
    seen over `max_batches` batches of real images (the model runs them in 16-bit first)."""
    device = next(model.parameters()).device
    _check_fp8_gpu(device)
    names = models.block_linears(model)
    if not all(type(model.get_submodule(n)) is nn.Linear for n in names):
        raise SpeedPathError("speed.fp8 needs the 16-bit model's plain linears (quant.bits: 16, speed.torchao: none)")
    amax = dict.fromkeys(names, 0.0)

    def record(name):
        return lambda module, args: amax.__setitem__(name, max(amax[name], args[0].detach().abs().amax().item()))

    hooks = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
    seen = 0
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(pixel_values=x.to(device, next(model.parameters()).dtype))
            seen += 1
            if seen == max_batches:
                break
    finally:
        for h in hooks:
            h.remove()
    if seen == 0:
        raise SpeedPathError("speed.fp8 static needs calibration images, and none came")
    for name in names:
        parent, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), leaf, Fp8Linear(model.get_submodule(name), amax[name]))
    return model


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


def compiled(model: nn.Module, mode: str | None = None, scope: str = "model") -> nn.Module:
    """torch.compile with a static shape per batch size (each new batch size compiles once).

    scope "model" compiles the whole forward. Traced whole, transformers' ViT hands SDPA a mask,
    which rules out the flash and cuDNN kernels and leaves a float32 math attention (measured on
    the H100: 58 of 125 ms per ViT-L forward at batch 256). scope "linears" compiles each block's
    MLP and attention projections and keeps attention eager, on the fused kernel.
    """
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
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
    """The `speed` settings on a loaded model: fused q/k/v, FP8 or torchao quantization, then compile,
    then CUDA graphs. `calibration`: batches of real images, needed by `fp8: static`."""
    if speed.fuse_qkv:
        model = fuse_qkv(model)
    if speed.fp8 == "static":
        if calibration is None:
            raise SpeedPathError("speed.fp8 static calibrates on real images: pass calibration batches")
        model = calibrate_fp8(model, calibration, speed.calibration_batches)
    if speed.torchao != "none":
        model = torchao_quantize(model, speed.torchao)
    if speed.compile != "none":
        model = compiled(model, scope=speed.compile)
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
    """Whether the speed paths changed the weights after loading (torchao tensors, vitlab FP8 linears):
    then the checkpoint on disk is not what runs."""
    return torchao_weights(model) or any(isinstance(m, Fp8Linear) for m in unwrapped(model).modules())


def storage_bytes(model: nn.Module) -> int:
    """Size on disk: save_pretrained for plain and bitsandbytes models, torch.save for weights the speed
    paths converted (torchao tensors, FP8 buffers)."""
    inner = unwrapped(model)
    with tempfile.TemporaryDirectory() as tmp:
        if converted(model):
            torch.save(inner.state_dict(), Path(tmp) / "model.pt")
        else:
            inner.save_pretrained(tmp)
        return models.disk_bytes(tmp)
