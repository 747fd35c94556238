"""Load, merge and validate the YAML parameters of a run.

`params/defaults.yaml` is the schema: every key a run may set, with a default of the right type.
A variant file and `--set key=value` overrides are merged on top; anything else is an error that
names the key and the closest valid one.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
PARAMS_DIR = REPO_ROOT / "params"
DEFAULTS_FILE = PARAMS_DIR / "defaults.yaml"

STEPS = ("finetune", "quantize", "evaluate", "ablation", "demo")  # runs.STEPS declares what each reads and writes
ATTENTION = ("eager", "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flash_attention_2")
CHOICES: dict[str, tuple] = {
    "model.attention": ATTENTION,
    "model.dtype": ("bfloat16", "float16", "float32"),
    "data.source": ("flowers102", "imagefolder", "digits"),
    "finetune.method": ("lora", "qlora", "full"),
    "finetune.mixed_precision": ("auto", "bf16", "fp16", "no"),
    "finetune.select": ("last", "best_valid"),
    "data.pipeline": ("pil", "gpu"),
    "quant.bits": (16, 8, 4),
    "quant.type": ("nf4", "fp4"),
    "quant.compute_dtype": ("bfloat16", "float16", "float32"),
    "speed.torchao": ("none", "fp8", "int8dyn", "int4wo"),
    "speed.compile": ("none", "model", "linears"),
}
# Dicts whose keys are not ours to fix: model.config is handed to transformers' ViTConfig.
FREE_FORM = {"model.config"}
# Keys that take more than one type; _validate_cross checks them.
MIXED_TYPE = {"quant.keep_16bit", "model.id", "finetune.lora.target_modules"}


class ParamsError(ValueError):
    """A params file or override that vitlab cannot run."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        known = sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))
        raise ParamsError(f"params file {path} does not exist; known variants: {', '.join(known)}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path} must hold a mapping of parameters, not {type(data).__name__}")
    return data


def defaults() -> dict[str, Any]:
    return load_yaml(DEFAULTS_FILE)


def merge(base: dict[str, Any], override: dict[str, Any], _prefix: str = "") -> dict[str, Any]:
    """Deep-merge `override` into a copy of `base`, refusing keys `base` does not have."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        dotted = f"{_prefix}{key}"
        if key not in base:
            close = difflib.get_close_matches(key, list(base), n=1)
            hint = f"; did you mean '{_prefix}{close[0]}'?" if close else ""
            raise ParamsError(f"unknown parameter '{dotted}'{hint} (valid keys are in {DEFAULTS_FILE.name})")
        if isinstance(base[key], dict) and isinstance(value, dict):
            out[key] = {**base[key], **copy.deepcopy(value)} if dotted in FREE_FORM else merge(base[key], value, f"{dotted}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_set(assignments: list[str]) -> dict[str, Any]:
    """Turn `["quant.bits=8", "model.id=null"]` into a nested override dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in assignments:
        if "=" not in item:
            raise ParamsError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


def validate(params: dict[str, Any], schema: dict[str, Any] | None = None, _prefix: str = "") -> None:
    """Check types against the defaults and enumerated values against CHOICES."""
    schema = defaults() if schema is None else schema
    for key, default in schema.items():
        dotted = f"{_prefix}{key}"
        value = params.get(key)
        if isinstance(default, dict) and dotted not in FREE_FORM:
            validate(value or {}, default, f"{dotted}.")
            continue
        if dotted not in MIXED_TYPE and not _type_ok(default, value):
            raise ParamsError(
                f"parameter '{dotted}' must be {type(default).__name__}, got {value!r} ({type(value).__name__})")
        if dotted in CHOICES and value not in CHOICES[dotted]:
            raise ParamsError(f"parameter '{dotted}' is {value!r}; choose one of {list(CHOICES[dotted])}")
    if not _prefix:
        _validate_cross(params)


def _validate_cross(params: dict[str, Any]) -> None:
    bad = [s for s in params["steps"] if s not in STEPS]
    if bad:
        raise ParamsError(f"unknown step(s) {bad} in 'steps'; choose from {list(STEPS)}")
    if params["model"]["id"] is None and params["finetune"]["method"] != "full" and "finetune" in params["steps"]:
        raise ParamsError(
            "finetune.method 'lora'/'qlora' adapts a pretrained model, but model.id is null (random init): "
            "set model.id to a hub id or a local checkpoint dir, or use finetune.method: full")
    from transformers import ViTConfig

    known = set(ViTConfig().to_dict())
    for key in params["model"]["config"]:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean 'model.config.{close[0]}'?" if close else ""
            raise ParamsError(f"unknown parameter 'model.config.{key}' (not a ViTConfig field){hint}")
    if not isinstance(params["model"]["id"], (str, type(None))):
        raise ParamsError(f"model.id must be a hub id or a directory (a string) or null, got {params['model']['id']!r}")
    targets = params["finetune"]["lora"]["target_modules"]
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))):
        raise ParamsError(f"finetune.lora.target_modules must be 'auto', 'attention', a module name (fc1) or a list of "
                          f"names ([q_proj, v_proj]), got {targets!r}")
    keep = params["quant"]["keep_16bit"]
    if not isinstance(keep, (list, str)):
        raise ParamsError("quant.keep_16bit must be a list of layer indices / name patterns, or 'first_last'")
    if isinstance(keep, str) and keep != "first_last":
        raise ParamsError(f"quant.keep_16bit is '{keep}'; a string must be 'first_last', otherwise give a list")
    if params["speed"]["torchao"] != "none" and params["quant"]["bits"] != 16:
        raise ParamsError(f"speed.torchao '{params['speed']['torchao']}' quantizes the 16-bit model itself: "
                          f"set quant.bits: 16 (it is {params['quant']['bits']}), or speed.torchao: none")
    ab = params["ablation"]
    if ab["budget_mb"] is not None and ab["budget_mb"] <= 0:
        raise ParamsError(f"ablation.budget_mb must be a positive size in MB or null, got {ab['budget_mb']}")
    if ab["max_top1_drop_pt"] is not None and not 0 <= ab["max_top1_drop_pt"] <= 100:
        raise ParamsError(f"ablation.max_top1_drop_pt is in top-1 points (0 to 100) or null, got {ab['max_top1_drop_pt']}")
    for name in ("valid_fraction", "test_fraction"):
        if not 0 < params["data"][name] < 0.5:
            raise ParamsError(f"data.{name} must lie between 0 and 0.5, got {params['data'][name]}")


def resolve(params_file: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """defaults <- variant file <- --set overrides, validated, with `variant` filled in."""
    params_file = Path(params_file)
    merged = merge(defaults(), load_yaml(params_file))
    merged = merge(merged, parse_set(overrides or []))
    if merged["variant"] is None:
        merged["variant"] = params_file.stem
    validate(merged)
    return merged
