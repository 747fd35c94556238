"""Attention kernels: one `model.attention` param, set on the model once when it is loaded.

`eager` and `sdpa` are transformers' own implementations; `sdpa_flash`, `sdpa_efficient` and
`sdpa_cudnn` run transformers' SDPA path with one PyTorch backend forced (so a kernel that cannot
run raises instead of silently falling back); `flash_attention_2` is the `flash-attn` package.
`apply` makes the choice part of the model: a forced backend is entered by the model's own forward,
so every caller (training, prediction, timing, CUDA-graph capture, peft wrappers) gets it.
"""
from __future__ import annotations

import importlib.util

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import AttentionError
from .settings import ATTENTION, GPU_ONLY_ATTENTION as GPU_ONLY

FORCED_BACKENDS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
}

def hf_implementation(name: str) -> str:
    """The `attn_implementation` transformers needs for a vitlab attention name."""
    if name not in ATTENTION:
        raise AttentionError(f"unknown attention '{name}'; choose one of {list(ATTENTION)}")
    return {"eager": "eager", "flash_attention_2": "flash_attention_2"}.get(name, "sdpa")


def check_supported(name: str, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Fail early, naming the fix, when `name` cannot run on `device` (with `dtype`, when known)."""
    hf_implementation(name)
    if name in GPU_ONLY and device.type != "cuda":
        raise AttentionError(f"attention '{name}' needs a CUDA GPU; on {device.type} use 'sdpa' or 'eager'")
    if device.type == "cuda" and name in ("sdpa_flash", "sdpa_cudnn", "flash_attention_2"):
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise AttentionError(f"attention '{name}' needs an Ampere or newer GPU (SM80+); "
                                 f"{torch.cuda.get_device_name(device)} is SM{major}{minor}: use 'sdpa' or 'sdpa_efficient'")
        if dtype is not None and name != "sdpa_cudnn" and dtype not in (torch.float16, torch.bfloat16):
            raise AttentionError(f"attention '{name}' runs in float16/bfloat16 only, the model computes in "
                                 f"{dtype}: set model.dtype (or quant.compute_dtype) to bfloat16")
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise AttentionError("attention 'flash_attention_2' needs the flash-attn package, which is not installed: "
                             "`pip install flash-attn --no-build-isolation` (or `pip install -e '.[flash]'`), "
                             "or use 'sdpa_flash' (PyTorch's built-in FlashAttention-2 kernel)")


class _ForcedForward:
    """A model's forward run inside one forced SDPA backend. An object rather than a closure, so that
    `copy.deepcopy` of the model (EMA, peft's modules_to_save) points the copy at the copy."""

    def __init__(self, module: torch.nn.Module, name: str, original=None):
        self.module, self.name, self.original = module, name, original

    def __call__(self, *args, **kwargs):
        forward = self.original or type(self.module).forward.__get__(self.module)
        try:
            with sdpa_kernel([FORCED_BACKENDS[self.name]]):
                return forward(*args, **kwargs)
        except RuntimeError as e:
            # PyTorch's wording: "No viable backend ..." (2.5+), "No available kernel" (earlier).
            if "No viable backend" in str(e) or "No available kernel" in str(e):
                raise AttentionError(f"PyTorch could not run attention '{self.name}' on these inputs ({str(e)[:300]}); "
                                     "use 'sdpa' to let PyTorch pick a kernel") from e
            raise


def apply(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Make `name` the attention of a loaded transformers model: its implementation, and for a forced
    SDPA backend, a forward that enters that backend. Applying again replaces the earlier choice."""
    model.set_attn_implementation(hf_implementation(name))
    # The forward as loaded: None, or an instance-level one (accelerate's device hooks). Kept once, so
    # a second apply replaces the first instead of nesting inside it.
    original = model.__dict__.setdefault("_vitlab_forward", model.__dict__.get("forward"))
    if name in FORCED_BACKENDS:
        model.forward = _ForcedForward(model, name, original)
    elif original is None:
        model.__dict__.pop("forward", None)
    else:
        model.forward = original
    model._vitlab_attention = name
    return model


def of(model: torch.nn.Module) -> str:
    """The vitlab attention name a model was loaded with (under peft, compile and CUDA-graph wrappers)."""
    while not hasattr(model, "_vitlab_attention"):
        inner = getattr(model, "base_model", None) or getattr(model, "model", None) or getattr(model, "_orig_mod", None)
        if inner is None or inner is model:
            return hf_implementation(getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") or "sdpa")
        model = inner
    return model._vitlab_attention
