"""Attention kernels: one `model.attention` param for every step.

`eager` and `sdpa` are transformers' own implementations; `sdpa_flash`, `sdpa_efficient` and
`sdpa_cudnn` run transformers' SDPA path with one PyTorch backend forced (so a kernel that cannot
run raises instead of silently falling back); `flash_attention_2` is the `flash-attn` package.
"""
from __future__ import annotations

import contextlib
import importlib.util
from typing import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import ATTENTION

FORCED_BACKENDS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
}
# PyTorch's flash backend also has a CPU kernel, so sdpa_flash runs on CPU; these do not.
GPU_ONLY = ("sdpa_efficient", "sdpa_cudnn", "flash_attention_2")


class AttentionError(RuntimeError):
    """An attention kernel this machine or this model cannot run."""


def hf_implementation(name: str) -> str:
    """The `attn_implementation` transformers needs for a vitlab attention name."""
    if name not in ATTENTION:
        raise AttentionError(f"unknown attention '{name}'; choose one of {list(ATTENTION)}")
    return {"eager": "eager", "flash_attention_2": "flash_attention_2"}.get(name, "sdpa")


def check_supported(name: str, device: torch.device, dtype: torch.dtype) -> None:
    """Fail early, naming the fix, when `name` cannot run on `device` with `dtype`."""
    hf_implementation(name)
    if name in GPU_ONLY and device.type != "cuda":
        raise AttentionError(f"attention '{name}' needs a CUDA GPU; on {device.type} use 'sdpa' or 'eager'")
    if device.type == "cuda" and name in ("sdpa_flash", "sdpa_cudnn", "flash_attention_2"):
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise AttentionError(f"attention '{name}' needs an Ampere or newer GPU (SM80+); "
                                 f"{torch.cuda.get_device_name(device)} is SM{major}{minor}: use 'sdpa' or 'sdpa_efficient'")
        if name != "sdpa_cudnn" and dtype not in (torch.float16, torch.bfloat16):
            raise AttentionError(f"attention '{name}' runs in float16/bfloat16 only, the model computes in "
                                 f"{dtype}: set model.dtype (or quant.compute_dtype) to bfloat16")
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise AttentionError("attention 'flash_attention_2' needs the flash-attn package, which is not installed: "
                             "`pip install flash-attn --no-build-isolation` (or `pip install -e '.[flash]'`), "
                             "or use 'sdpa_flash' (PyTorch's built-in FlashAttention-2 kernel)")


@contextlib.contextmanager
def kernel(name: str) -> Iterator[None]:
    """Wrap a forward pass so that the chosen SDPA backend, and only it, may run."""
    backend = FORCED_BACKENDS.get(name)
    if backend is None:
        yield
        return
    try:
        with sdpa_kernel([backend]):
            yield
    except RuntimeError as e:
        if "No available kernel" in str(e):
            raise AttentionError(f"PyTorch could not run attention '{name}' on these inputs ({e}); "
                                 "use 'sdpa' to let PyTorch pick a kernel") from e
        raise


def apply(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Switch a loaded transformers model to the attention implementation `name` needs."""
    model.set_attn_implementation(hf_implementation(name))
    return model
