"""Speed paths beyond stock eager PyTorch (the `speed` params): CUDA-graph replay, torch.compile,
and torchao's tensor-core int8 / FP8 and int4 weight-only kernels (Hopper).

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
    """The `speed` params: torchao quantization, then torch.compile, then CUDA-graph replay."""
    torchao: str = "none"
    compile: str = "none"
    cuda_graph: bool = False

    @classmethod
    def from_params(cls, speed_params: dict[str, Any]) -> "SpeedSettings":
        return cls(torchao=speed_params["torchao"], compile=speed_params["compile"],
                   cuda_graph=speed_params["cuda_graph"])

    @property
    def active(self) -> bool:
        return self.torchao != "none" or self.compile != "none" or self.cuda_graph

    def describe(self) -> str:
        parts = [f"torchao {self.torchao}"] if self.torchao != "none" else []
        parts += [f"compile {self.compile}"] if self.compile != "none" else []
        parts += ["cuda graph"] if self.cuda_graph else []
        return " + ".join(parts)


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
    if kind == "fp8" and (device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9)):
        raise SpeedPathError("FP8 matmuls need an Ada or Hopper GPU (SM89+)")
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


def apply(model: nn.Module, speed: SpeedSettings) -> nn.Module:
    """The `speed` settings on a loaded model: torchao quantization, then compile, then CUDA graphs."""
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


def storage_bytes(model: nn.Module) -> int:
    """Size on disk: save_pretrained for plain and bitsandbytes models, torch.save for torchao tensors."""
    inner = unwrapped(model)
    with tempfile.TemporaryDirectory() as tmp:
        if any(type(p).__module__.startswith("torchao") for p in inner.parameters()):
            torch.save(inner.state_dict(), Path(tmp) / "model.pt")
        else:
            inner.save_pretrained(tmp)
        return models.disk_bytes(tmp)
