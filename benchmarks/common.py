"""What the benchmark scripts share: random-init ViT checkpoints of the standard shapes, vitlab's
settings for them (quantization defaults read from params/defaults.yaml), and the metadata every
result JSON carries."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import ViTConfig, ViTForImageClassification

from vitlab import config, models, quant, runs

ARCHS = {
    "vit_l16": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
    "vit_b16": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128},
}
WEIGHTS = "random init (seed 0)"  # latency does not depend on the weights' values


def random_checkpoint(arch: str, root: Path, image_size: int = 224, num_labels: int = 102) -> Path:
    """A bf16 random-init ViT of shape `arch` saved with save_pretrained under root/arch."""
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=image_size, patch_size=16 if arch != "tiny" else 8, num_labels=num_labels, **ARCHS[arch])
    path = root / arch
    ViTForImageClassification(cfg).to(torch.bfloat16).save_pretrained(str(path))
    return path


def settings(dtype: torch.dtype = torch.bfloat16, attention: str = "sdpa") -> models.ModelSettings:
    return models.ModelSettings(id=None, dtype=dtype, attention=attention)


def quant_settings(bits: int, type_: str | None = None) -> quant.QuantSettings:
    """params/defaults.yaml's quantization (double quant, compute dtype, int8 threshold) at `bits`."""
    q = quant.QuantSettings.from_params(config.defaults()["quant"]).replace(bits=bits, keep_16bit=())
    return q.replace(type=type_) if type_ else q


def vitlab_run(params_file: str, variant: str, steps: str, sets: list[str]) -> Path:
    """`python -m vitlab run` of `params_file` as run `variant` (this Python, from the repo root); its folder."""
    cmd = [sys.executable, "-m", "vitlab", "run", params_file, "--steps", steps, "--set", f"variant={variant}",
           *[a for s in sets for a in ("--set", s)]]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=runs.REPO_ROOT)
    return runs.latest(variant, tuple(steps.split(",")))


def write(out: Path, name: str, args: Any, t0: float, weights: str = WEIGHTS, **tables: Any) -> Path:
    """out/name.json with the tables and the metadata (arguments, seconds, weights, git, versions, device).
    Written after every model, so a run cut short still leaves what it measured."""
    meta = {"args": vars(args), "seconds": round(time.time() - t0, 1), "weights": weights,
            "tf32": torch.backends.cuda.matmul.allow_tf32, **runs.environment()}
    path = out / f"{name}.json"
    path.write_text(json.dumps({"meta": meta, **tables}, indent=1, default=str))
    return path
