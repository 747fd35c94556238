"""Load a ViT for image classification and find its parts from the model itself.

transformers renames modules between releases (4.x `query/key/value/dense`, 5.x `q_proj/.../fc2`
under `vit.layers`), so encoder layers, linear layers and components are discovered, not hard-coded.
"""
from __future__ import annotations

import functools
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import (AutoConfig, AutoImageProcessor, BitsAndBytesConfig, ViTConfig, ViTForImageClassification,
                          ViTImageProcessor)

from . import attention
from .errors import ModelError
from .machine import check_checkpoint
from .settings import local_model

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class ModelSettings:
    """The `model` params with their strings resolved once: what to load, in which dtype, with which attention."""
    id: str | None
    dtype: torch.dtype
    attention: str
    config: dict[str, Any] = field(default_factory=dict)
    init: str = "default"
    grow_from: str | None = None  # a trained checkpoint the model to train starts as (finetune.build grows it)
    grow_depth: str = "copies"

    @classmethod
    def from_params(cls, model_params: dict[str, Any]) -> "ModelSettings":
        attention.hf_implementation(model_params["attention"])  # an unknown name fails here, not at load
        local, grown = local_model(model_params["id"]), local_model(model_params["grow_from"])
        return cls(id=str(local) if local else model_params["id"], dtype=DTYPES[model_params["dtype"]], attention=model_params["attention"],
                   config=dict(model_params["config"] or {}), init=model_params["init"],
                   grow_from=str(grown) if grown else model_params["grow_from"], grow_depth=model_params["grow_depth"])

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def _offline_hint(model_id: str, error: Exception) -> ModelError:
    return ModelError(
        f"cannot load model '{model_id}' ({type(error).__name__}: {error}). It is not a local directory, so it "
        "must come from the Hugging Face hub, which needs a network (or a copy in the HF cache). Offline, use "
        "`model.id: /path/to/checkpoint_dir` (a save_pretrained directory) or `model.id: null` with a "
        "`model.config` to train a small ViT from scratch (see params/offline.yaml).")


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """One short connection attempt to the hub. Offline, transformers retries for minutes before it
    fails; with this answer it looks in the local cache only and fails (or loads) at once."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def _hub_kwargs(model_id: str | Path) -> dict[str, Any]:
    return {} if Path(model_id).is_dir() or hub_reachable() else {"local_files_only": True}


def load_processor(settings: ModelSettings) -> ViTImageProcessor:
    """The checkpoint's image processor (resize size, normalisation), or a plain one for a config model."""
    if settings.id is None:
        size = settings.config.get("image_size", 224)
        return ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    try:
        return AutoImageProcessor.from_pretrained(settings.id, **_hub_kwargs(settings.id))
    except OSError as e:
        raise _offline_hint(settings.id, e) from e


def _from_pretrained(path: str | Path, **kwargs: Any) -> ViTForImageClassification:
    check_checkpoint(path)
    try:
        # safetensors only: a pickled pytorch_model.bin in a folder someone handed over could run code on load.
        return ViTForImageClassification.from_pretrained(str(path), use_safetensors=True, **kwargs, **_hub_kwargs(path))
    except OSError as e:
        if Path(path).is_dir():
            raise ModelError(f"{path} is not a loadable ViT checkpoint ({e}); it needs config.json and "
                             "model.safetensors as written by save_pretrained") from e
        raise _offline_hint(str(path), e) from e
    except Exception as e:  # safetensors' "incomplete metadata" and the like: the file, and what to do
        if Path(path).is_dir():
            raise ModelError(f"{Path(path) / 'model.safetensors'} cannot be read ({type(e).__name__}: {str(e)[:200]}): "
                             "the file is damaged or truncated; write it again (re-run the step that made it)") from e
        raise


def checkpoint_labels(settings: ModelSettings) -> list[str] | None:
    """The class names of the checkpoint's classifier, in output order (None for a random-init model)."""
    if settings.id is None:
        return None
    try:
        config = AutoConfig.from_pretrained(settings.id, **_hub_kwargs(settings.id))
    except OSError as e:
        raise _offline_hint(settings.id, e) from e
    return [config.id2label[i] for i in range(config.num_labels)]


def build(settings: ModelSettings, class_names: list[str], dtype: torch.dtype = torch.float32,
          quantization_config: BitsAndBytesConfig | None = None,
          device: torch.device | None = None) -> ViTForImageClassification:
    """A classifier to train, with len(class_names) outputs: from `settings.id` (hub or local dir) or random
    init, in `dtype` (float32 for training; `settings.dtype` is what the trained model is saved in), on the
    CPU; `device` is where a quantized checkpoint loads and where mimetic init computes.

    The checkpoint's classifier is kept only when its labels are `class_names` in the same order; any
    other head starts fresh (as ignore_mismatched_sizes does for another class count): a head of as
    many classes trained on other classes would only be a misleading start."""
    labels = {"num_labels": len(class_names), "id2label": dict(enumerate(class_names)),
              "label2id": {c: i for i, c in enumerate(class_names)}}
    impl = attention.hf_implementation(settings.attention)
    if settings.id is None:
        config = ViTConfig(**settings.config, **labels)
        config._attn_implementation = impl
        model = ViTForImageClassification(config)
        if settings.init in ("mimetic", "mimetic_sincos"):
            mimetic_attention(model, device=device)
        if settings.init in ("sincos", "mimetic_sincos"):
            sincos_positions(model)
        model = model.to(dtype)
    else:
        kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": impl, "ignore_mismatched_sizes": True, **labels}
        if quantization_config is not None:
            kwargs.update(quantization_config=quantization_config, device_map={"": str(device or "cpu")})
        same_head = checkpoint_labels(settings) == list(class_names)
        model = generic_cpu_4bit(_from_pretrained(settings.id, **kwargs))
        if not same_head:
            head = model.classifier
            nn.init.trunc_normal_(head.weight, std=model.config.initializer_range)
            nn.init.zeros_(head.bias)
    return attention.apply(model, settings.attention)


def _attention_projections(layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    """A block's query, key, value and output linears (5.x q_proj..o_proj, 4.x query/key/value/dense)."""
    named = {n.rsplit(".", 1)[-1]: m for n, m in layer.attention.named_modules() if isinstance(m, nn.Linear)}
    pick = lambda *names: next(named[n] for n in names if n in named)  # noqa: E731
    return pick("q_proj", "query"), pick("k_proj", "key"), pick("v_proj", "value"), pick("o_proj", "dense")


def _factor(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n x d x rank) and (n x rank x d) factors whose products are the best rank-`rank` approximations of
    the n matrices m."""
    u, s, vh = torch.linalg.svd(m)
    root = s[:, :rank].sqrt()
    return u[:, :, :rank] * root[:, None], root[:, :, None] * vh[:, :rank]


@torch.no_grad()
def mimetic_attention(model: nn.Module, qk: tuple[float, float] = (0.7, 0.7), vo: tuple[float, float] = (0.4, 0.4),
                      seed: int = 0, device: torch.device | None = None) -> None:
    """Mimetic initialisation (Trockman & Kolter, ICML 2023): every head starts with the structure the
    attention of pretrained ViTs has, W_q^T W_k ~ a Z + b I (tokens attend to similar tokens) and
    W_o W_v ~ a Z - b I, Z Gaussian with variance 1/d; each head gets the best factors of its rank.
    A data-free start that helps small-data training; the model is a plain ViT afterwards. The SVDs run
    on `device` (a GPU's take seconds where ViT-L's 768 on two CPU cores take minutes); Z is drawn on the CPU."""
    d, heads = model.config.hidden_size, model.config.num_attention_heads
    k, g = d // heads, torch.Generator().manual_seed(seed)
    eye = torch.eye(d)
    for layer in encoder_layers(model)[1]:
        q, key, v, o = _attention_projections(layer)
        z = torch.randn(heads, 2, d, d, generator=g) / d ** 0.5  # per head: Z for q/k, then for v/o
        qk_left, qk_right = (t.cpu() for t in _factor((qk[0] * z[:, 0] + qk[1] * eye).to(device or "cpu"), k))
        vo_left, vo_right = (t.cpu() for t in _factor((vo[0] * z[:, 1] - vo[1] * eye).to(device or "cpu"), k))
        for h in range(heads):
            rows = slice(h * k, (h + 1) * k)
            q.weight[rows], key.weight[rows] = qk_left[h].T, qk_right[h]  # q_i . k_j = x_i^T (q_w^T k_w) x_j
            o.weight[:, rows], v.weight[rows] = vo_left[h], vo_right[h]


@torch.no_grad()
def sincos_positions(model: nn.Module) -> None:
    """Position embeddings started at 2-D sine-cosine values (as MAE fixes them; here they stay trained):
    neighbouring patches start alike, so similarity-seeking heads start local. The class token's is 0."""
    table = next(p for n, p in model.named_parameters() if n.endswith("position_embeddings"))
    d, side = table.shape[-1], round((table.shape[1] - 1) ** 0.5)
    if d % 4:
        raise ModelError(f"sin-cos position embeddings split the width in 4 (sin, cos of rows and columns); {d} is not a multiple of 4")
    freq = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij")
    parts = [f(c.flatten()[:, None] * freq) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    table[0, 1:] = torch.cat(parts, 1).to(table.dtype)
    table[0, 0] = 0


def load_checkpoint(path: str | Path, settings: ModelSettings, device: torch.device,
                    quantization_config: BitsAndBytesConfig | None = None) -> ViTForImageClassification:
    """A checkpoint written by vitlab (16-bit or already quantized) on `device`, in eval mode, computing in
    `settings.dtype` with `settings.attention` (checked against the device first)."""
    attention.check_supported(settings.attention, device, settings.dtype)
    kwargs: dict[str, Any] = {"dtype": settings.dtype, "attn_implementation": attention.hf_implementation(settings.attention)}
    if quantization_config is not None or _is_quantized(path):
        kwargs.update(device_map={"": str(device)})
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        model = generic_cpu_4bit(_from_pretrained(path, **kwargs))
    else:
        model = _from_pretrained(path, **kwargs).to(device)
    return attention.apply(model, settings.attention).eval()


def generic_cpu_4bit(model: nn.Module, every_layer: bool = False) -> nn.Module:
    """Keep bitsandbytes' generic CPU kernel where its AVX512-BF16 one breaks (bitsandbytes 0.50.2, on CPUs
    that have the instructions): it repacks 4-bit weights in blocks of 64 input and 32 output features and
    fails on narrower layers (reshape to [N, 0]); and once an eval pass has repacked them, training on
    them fails (in-place bias add on a tensor that needs grad). So: narrow layers always, `every_layer`
    for models that train (QLoRA). Layers of real ViTs (multiples of 64) keep the fast path at inference."""
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if getattr(module, "support_avx512bf16_for_cpu", False) and state is not None and (
                every_layer or module.in_features % state.blocksize or module.out_features % 32):
            module.support_avx512bf16_for_cpu = False
    return model


def _is_quantized(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and '"quantization_config"' in config.read_text()


class Layers(NamedTuple):
    """A ViT's transformer blocks: the ModuleList's qualified name and the list. Found once per model change
    by `encoder_layers`; the functions below that take one scan only the blocks."""
    prefix: str
    blocks: nn.ModuleList


def encoder_layers(model: nn.Module) -> Layers:
    """The qualified name and the ModuleList of the transformer blocks (the longest list of like modules)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ModelError(f"{type(model).__name__} has no list of encoder layers")
    return Layers(*best)


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear8bitLt / Linear4bit subclass nn.Linear.
    return isinstance(module, nn.Linear)


def block_linears(model: nn.Module, layers: Layers | None = None) -> list[str]:
    """Qualified names of every linear layer inside the encoder blocks (where quantization applies)."""
    prefix, blocks = layers or encoder_layers(model)
    return [f"{prefix}.{i}.{n}" for i, block in enumerate(blocks) for n, m in block.named_modules() if _is_linear(m)]


def layer_index(model: nn.Module, module_name: str) -> int | None:
    prefix, _ = encoder_layers(model)
    match = re.match(re.escape(prefix) + r"\.(\d+)\.", module_name)
    return int(match.group(1)) if match else None


def component(module_name: str) -> str:
    """Which part of a ViT a module belongs to, for breakdowns: patch_embed, attention, mlp, norm, classifier."""
    leaf = module_name.rsplit(".", 1)[-1]
    if "embed" in module_name:
        return "patch_embed"
    if "norm" in leaf:
        return "norm"
    if re.search(r"attention|attn|\b(q|k|v|o)_proj|query|key|value", module_name):
        return "attention"
    if re.search(r"mlp|intermediate|fc\d|output\.dense", module_name):
        return "mlp"
    if "classifier" in module_name or "head" in leaf:
        return "classifier"
    return "other"


def attention_linears(model: nn.Module, layers: Layers | None = None) -> list[str]:
    return [n for n in block_linears(model, layers) if component(n) == "attention"]


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers as stored (packed 4-bit weights count as their uint8 storage)."""
    tensors = list(model.parameters()) + list(model.buffers())
    total = sum(t.numel() * t.element_size() for t in tensors)
    # bitsandbytes keeps 4-bit scales (and the double-quant state) beside the weight, not as parameters.
    # LLM.int8 keeps one float scale per output row (SCB) on the weight.
    for m in model.modules():
        weight = getattr(m, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            total += sum(v.numel() * v.element_size() for v in state.as_dict(packed=True).values()
                         if isinstance(v, torch.Tensor))
        scb = getattr(weight, "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total


def disk_bytes(path: str | Path) -> int:
    """Bytes of a saved model folder (or file) on disk."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
