"""Speed paths beyond stock eager PyTorch (the `speed` params), applied by `apply` in one order: one
fused q/k/v projection with mask-free attention, the patch embedding as one matmul, vitlab's low-bit
linears (`lowbit`: static-scale FP8, int4 weights with FP8 or 16-bit activations, on `kernels`),
torchao's tensor-core int8 / FP8 and int4 weight-only kernels, torch.compile and CUDA-graph replay.

bitsandbytes makes a model small; on a GPU its eager forward pays Python dispatch and a
dequantisation per linear layer. These paths attack those costs. Each returns something called as
`model(pixel_values=x)` whose `.logits` are the output, so bench and infer use it unchanged.
"""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import lowbit, models
from .errors import SpeedPathError
from .settings import Speed as SpeedSettings  # noqa: F401 (the typed `speed` params, torch-free)

TORCHAO = {
    "fp8": "Float8DynamicActivationFloat8WeightConfig",  # FP8 activations and weights, per-row scales
    "int8dyn": "Int8DynamicActivationInt8WeightConfig",  # int8 activations and weights, int8 tensor cores
    "int4wo": "Int4WeightOnlyConfig",  # int4 weights (group 128), bf16 activations, tinygemm kernel
}


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


def fuse_qkv(model: nn.Module, layers: models.Layers | None = None) -> nn.Module:
    """Every encoder block's attention as a `FusedQKVAttention`, in place."""
    for layer in (layers or models.encoder_layers(model)).blocks:
        layer.attention = FusedQKVAttention(layer.attention)
    return model


class PatchMatmul(nn.Module):
    """The patch embedding's convolution as one matmul. Its kernel equals its stride, so cutting the
    image into patches is a reshape, and the convolution is a GEMM over channels x patch pixels
    (cuDNN's convolution and the layout changes around it cost more than the GEMM: figures/h100_speed_paths.md).
    Returns the convolution's layout."""

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


def torchao_quantize(model: nn.Module, kind: str, layers: models.Layers | None = None) -> nn.Module:
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
        lowbit.check_fp8_gpu(device)
    if kind == "fp8":
        config = tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerRow())
    elif kind == "int8dyn":
        config = tq.Int8DynamicActivationInt8WeightConfig()
    else:
        config = tq.Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    targets = set(models.block_linears(model, layers))
    tq.quantize_(model, config, filter_fn=lambda module, fqn: isinstance(module, nn.Linear) and fqn in targets)
    return model


COMPILE_MODES = {"default": None, "max-autotune": "max-autotune-no-cudagraphs"}  # graphs are CudaGraphed's job


def compiled(model: nn.Module, mode: str = "default", scope: str = "model", layers: models.Layers | None = None) -> nn.Module:
    """torch.compile with a static shape per batch size (each new batch size compiles once).

    mode "max-autotune" lets Inductor time Triton GEMM templates against cuBLAS for every shape and
    fuse the pointwise work around a GEMM (bias, GELU, an FP8 cast, a weight's dequantization) into
    the template that wins; it compiles for minutes rather than seconds.

    scope "model" compiles the whole forward. Traced whole, transformers' ViT hands SDPA a mask,
    which rules out the flash and cuDNN kernels and leaves a float32 math attention (most of the
    forward: figures/h100_speed_paths.md). scope "blocks" compiles each encoder block in place
    (regional compilation): blocks of one structure share one compiled graph, so a 24-layer model,
    or a new model of the same blocks, compiles once per distinct block and batch size; what lies
    between blocks (embeddings, final norm, classifier) stays eager. scope "linears" compiles each
    block's MLP and attention projections and keeps attention eager, on the fused kernel.
    """
    if mode not in COMPILE_MODES:
        raise SpeedPathError(f"unknown compile mode '{mode}'; choose one of {list(COMPILE_MODES)}")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    mode = COMPILE_MODES[mode]
    if scope == "model":
        return torch.compile(model, mode=mode, dynamic=False)
    if scope == "blocks":
        for block in (layers or models.encoder_layers(model)).blocks:
            block.compile(mode=mode, dynamic=False)
        return model
    if scope != "linears":
        raise SpeedPathError(f"unknown compile scope '{scope}'; choose 'model', 'blocks' or 'linears'")
    prefix, blocks = layers or models.encoder_layers(model)
    mlps = [f"{prefix}.{i}.{n}" for i, block in enumerate(blocks) for n, _ in block.named_modules()
            if n and models.component(n) == "mlp" and ("." not in n or models.component(n.rsplit(".", 1)[0]) != "mlp")]
    for name in mlps + models.attention_linears(model, (prefix, blocks)):
        parent, leaf = name.rsplit(".", 1)
        owner = model.get_submodule(parent)
        setattr(owner, leaf, torch.compile(getattr(owner, leaf), mode=mode, dynamic=False))
    return model


def apply(model: nn.Module, speed: SpeedSettings, calibration: Any = None) -> nn.Module:
    """The `speed` settings on a loaded model: fused q/k/v and patch matmul, FP8, int4 or torchao
    linears, then compile, then CUDA graphs. `calibration`: batches of real images, needed by
    `fp8: static` and `int4: w4a8` (their activation scales). The blocks are found once: every transform
    replaces modules inside them, never the list."""
    if speed.calibrates and calibration is None:
        raise SpeedPathError(f"{speed.describe()} calibrates FP8 activation scales on real images: pass calibration batches")
    layers = models.encoder_layers(model)
    if speed.fuse_qkv:
        model = fuse_qkv(model, layers)
    if speed.patch_matmul:
        model = patch_matmul(model)
    if speed.uniform_format or speed.layer_formats:
        model = lowbit.convert(model, lowbit.assignment(model, speed, layers), calibration, speed.calibration_batches,
                               speed.fp8_gemm)
    if speed.fp8_gemm == "triton":
        model = lowbit.fuse_mlp(model, layers)  # the linears were built on vitlab's kernel
    if speed.torchao != "none":
        model = torchao_quantize(model, speed.torchao, layers)
    if speed.compile != "none":
        model = compiled(model, mode=speed.compile_mode, scope=speed.compile, layers=layers)
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
    return torchao_weights(model) or any(isinstance(m, lowbit.Fp8Activations) for m in unwrapped(model).modules())


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
