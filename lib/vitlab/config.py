"""Load, merge and validate the YAML parameters of a run.

`params/defaults.yaml` is the schema: every key a run may set, with a default of the right type.
A variant file and `--set key=value` overrides are merged on top; anything else is an error that
names the key and the closest valid one.
"""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Callable

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
    "finetune.method": ("lora", "qlora", "full", "probe", "none"),
    "model.init": ("default", "mimetic", "sincos", "mimetic_sincos"),
    "data.classes": ("all", "half_a", "half_b"),
    "finetune.mixed_precision": ("auto", "bf16", "fp16", "no"),
    "finetune.select": ("last", "best_valid"),
    "data.pipeline": ("pil", "gpu"),
    "quant.bits": (16, 8, 4),
    "quant.type": ("nf4", "fp4"),
    "quant.compute_dtype": ("bfloat16", "float16", "float32"),
    "speed.torchao": ("none", "fp8", "int8dyn", "int4wo"),
    "speed.compile": ("none", "model", "linears"),
    "speed.compile_mode": ("default", "max-autotune"),
    "speed.fp8": ("none", "static"),
    "speed.int4": ("none", "w4a8", "w4a16"),
    "speed.fp8_gemm": ("cublas", "triton"),
}
ABLATION_QUANT_TYPES = ("nf4", "fp4", "int8")  # ablation.QUANT_TYPES says what each is
# Ranges: (test, what a valid value is). Checked for every run before its first step.
_at_least_1 = (lambda v: v >= 1, "at least 1")
_optional_count = (lambda v: v is None or v >= 1, "at least 1, or null for all")
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: v >= 0, "0 or more"),
    "finetune.epochs": _at_least_1, "finetune.batch_size": _at_least_1,
    "finetune.lr": (lambda v: v > 0, "positive (e.g. 0.001)"),
    "finetune.weight_decay": (lambda v: v >= 0, "0 or more"),
    "finetune.warmup_ratio": (lambda v: 0 <= v < 1, "a share of the steps, 0 <= x < 1"),
    "finetune.max_grad_norm": (lambda v: v > 0, "positive"),
    "finetune.label_smoothing": (lambda v: 0 <= v < 1, "0 <= x < 1 (0.1 is usual)"),
    "finetune.mixup_alpha": (lambda v: v >= 0, "0 (off) or more"),
    "finetune.cutmix_alpha": (lambda v: v >= 0, "0 (off) or more"),
    "finetune.ema_decay": (lambda v: 0 <= v < 1, "0 (off) <= x < 1 (0.999 is usual)"),
    "finetune.checkpoint_minutes": (lambda v: v >= 0, "0 (every epoch) or more"),
    "finetune.full_size_epochs": (lambda v: v >= 0, "0 or more"),
    "finetune.valid_every": _at_least_1,
    "finetune.drop_path": (lambda v: 0 <= v < 1, "0 (off) <= x < 1 (0.1 is usual)"),
    "data.train_image_size": (lambda v: v is None or (isinstance(v, int) and v >= 1), "a size in pixels, or null for the model's"),
    "finetune.lora.r": _at_least_1,
    "speed.calibration_batches": _at_least_1,
    "eval.processes": _at_least_1,
    "finetune.processes": _at_least_1,
    "finetune.accumulate": _at_least_1,
    "ablation.processes": _at_least_1,
    "finetune.lora.alpha": (lambda v: v > 0, "positive"),
    "finetune.lora.dropout": (lambda v: 0 <= v < 1, "0 <= x < 1"),
    "data.max_per_class": _optional_count, "data.max_samples": _optional_count,
    "data.num_workers": (lambda v: v >= 0, "0 or more"),
    "data.random_erasing": (lambda v: 0 <= v <= 1, "a probability, 0 <= x <= 1"),
    "data.max_image_pixels": (lambda v: v >= 1, "a pixel count, e.g. 60000000"),
    "data.crop_scale": (lambda v: len(v) == 2 and all(isinstance(x, (int, float)) for x in v) and 0 < v[0] <= v[1] <= 1,
                        "two numbers 0 < low <= high <= 1, e.g. [0.5, 1.0]"),
    "quant.int8_threshold": (lambda v: v > 0, "positive (6.0 is LLM.int8's)"),
    "eval.batch_size": _at_least_1, "eval.iters": _at_least_1, "eval.profile_batch_size": _at_least_1,
    "eval.profile_iters": _at_least_1, "eval.warmup": (lambda v: v >= 0, "0 or more"),
    "eval.latency_batch_sizes": (lambda v: bool(v) and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1
                                                           for b in v), "a non-empty list of batch sizes >= 1"),
    "ablation.quant_types": (lambda v: bool(v) and all(q in ABLATION_QUANT_TYPES for q in v),
                             f"a non-empty list of {list(ABLATION_QUANT_TYPES)}"),
}
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")  # it names the run folder
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
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ParamsError(f"{path} is not a text file; a params file is YAML (see params/defaults.yaml)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ParamsError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        raise ParamsError(f"{path} holds no parameters; a variant file names what it changes from "
                          f"params/defaults.yaml (an empty one would silently mean ViT-L/16 from the hub)")
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
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ParamsError(f"--set {item}: the value is not valid YAML ({getattr(e, 'problem', None) or e}); "
                              "quote it or write a list as [a, b]") from None
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


def _value(params: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        params = params[part]
    return params


def local_model(model_id: str | None) -> Path | None:
    """The directory a model.id names (absolute, or relative to the repo root like data.root), or None
    for a hub id (or null)."""
    if model_id is None:
        return None
    path = Path(model_id).expanduser()
    path = path if path.is_absolute() else REPO_ROOT / path
    return path if path.is_dir() else None


def _model_config(model: dict[str, Any]) -> dict[str, Any]:
    """What is known of the model's config without loading it: model.config, or a local checkpoint's
    config.json (a hub id: nothing)."""
    if model["id"] is None:
        return model["config"]
    local = local_model(model["id"])
    if local is not None and (local / "config.json").is_file():
        import json

        return json.loads((local / "config.json").read_text())
    return {}


def _layers(model: dict[str, Any]) -> int | None:
    """The encoder depth of the model params describe, when it is known without loading it."""
    default = 12 if model["id"] is None else None  # ViTConfig's default; unknown for a hub id
    return _model_config(model).get("num_hidden_layers", default)


def _validate_cross(params: dict[str, Any]) -> None:
    if not params["steps"]:
        raise ParamsError(f"'steps' is empty: name at least one of {list(STEPS)}")
    bad = [s for s in params["steps"] if s not in STEPS]
    if bad:
        raise ParamsError(f"unknown step(s) {bad} in 'steps'; choose from {list(STEPS)}")
    if not isinstance(params["variant"], str) or not VARIANT_NAME.match(params["variant"]):
        raise ParamsError(f"variant {params['variant']!r} names the run folder: use letters, digits, '_', '-' and '.'")
    for dotted, (ok, what) in RANGES.items():
        value = _value(params, dotted)
        try:
            fine = ok(value)
        except TypeError:
            fine = False
        if not fine:
            raise ParamsError(f"parameter '{dotted}' is {value!r}; it must be {what}")
    ft, data = params["finetune"], params["data"]
    if params["model"]["id"] is None and ft["method"] != "full" and "finetune" in params["steps"]:
        raise ParamsError(
            f"finetune.method '{ft['method']}' starts from a trained model, but model.id is null (random init): "
            "set model.id to a hub id or a local checkpoint dir, or use finetune.method: full")
    if params["model"]["init"] != "default" and params["model"]["id"] is not None:
        raise ParamsError(f"model.init '{params['model']['init']}' starts a model built from model.config; model.id "
                          f"({params['model']['id']}) brings its own weights: set model.id null or model.init default")
    if data["train_image_size"] is not None:
        patch = _model_config(params["model"]).get("patch_size", 16)
        if data["pipeline"] != "gpu":
            raise ParamsError("data.train_image_size resizes training crops on the gpu pipeline: set data.pipeline: gpu")
        if data["train_image_size"] % patch:
            raise ParamsError(f"data.train_image_size {data['train_image_size']} must be a multiple of the patch size "
                              f"({patch})")
        if ft["full_size_epochs"] > ft["epochs"]:
            raise ParamsError(f"finetune.full_size_epochs ({ft['full_size_epochs']}) is more than finetune.epochs "
                              f"({ft['epochs']})")
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
    layers = _layers(params["model"])
    for item in keep if isinstance(keep, list) else []:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ParamsError(f"quant.keep_16bit holds {item!r}: give layer indices (0, -1) or name patterns ('attention')")
        if isinstance(item, int) and layers is not None and not -layers <= item < layers:
            raise ParamsError(f"quant.keep_16bit names layer {item}, but the model has {layers} encoder layers "
                              f"(0..{layers - 1}, or -1 for the last)")
    if ft["cuda_graph"] and "finetune" in params["steps"]:
        if ft["compile"] or ft["mixed_precision"] == "fp16" or ft["method"] == "qlora":
            raise ParamsError("finetune.cuda_graph captures the eager bf16 training step: it does not combine with "
                              "finetune.compile, mixed_precision fp16 (loss scaling syncs with the host) or method qlora")
        import torch
        if params["device"] == "cpu" or not torch.cuda.is_available():
            raise ParamsError("finetune.cuda_graph replays the training step as a CUDA graph: it needs a CUDA GPU "
                              "(none here); set it false")
    for key in ("eval.processes", "finetune.processes", "ablation.processes"):
        processes = _value(params, key)
        if processes > 1:
            import torch
            if torch.cuda.is_available() and torch.cuda.device_count() < processes:
                raise ParamsError(f"{key} is {processes}, but this machine has {torch.cuda.device_count()} GPU(s): "
                                  "one process per GPU")
    if ft["batch_size"] % (ft["processes"] * ft["accumulate"]) and "finetune" in params["steps"]:
        raise ParamsError(f"finetune.batch_size {ft['batch_size']} is the whole step's batch: it must split evenly into "
                          f"finetune.processes ({ft['processes']}) x finetune.accumulate ({ft['accumulate']}) micro-batches")
    if ft["processes"] > 1 and "finetune" in params["steps"]:
        if ft["cuda_graph"] or ft["method"] == "qlora":
            raise ParamsError("finetune.processes > 1 trains with DDP, which vitlab does not capture in a CUDA graph "
                              "(finetune.cuda_graph) nor run on a 4-bit base (method qlora): one process for those")
    sp = params["speed"]
    rewriting = ([f"speed.{k} {sp[k]}" for k in ("torchao", "fp8", "int4") if sp[k] != "none"]
                 + [f"speed.{k}" for k in ("fuse_qkv", "patch_matmul") if sp[k]])
    if rewriting and params["quant"]["bits"] != 16:
        raise ParamsError(f"{', '.join(rewriting)} rewrite the 16-bit model's linears themselves: set quant.bits: 16 "
                          f"(it is {params['quant']['bits']}), or turn them off")
    quantizing = [f"speed.{k} '{sp[k]}'" for k in ("fp8", "int4", "torchao") if sp[k] != "none"]
    if len(quantizing) > 1:
        raise ParamsError(f"{' and '.join(quantizing)} all quantize the linears: pick one")
    if sp["fp8_gemm"] == "triton" and sp["fp8"] == "none" and sp["int4"] != "w4a8":
        raise ParamsError("speed.fp8_gemm: triton runs FP8 activations: set speed.fp8: static or speed.int4: w4a8")
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
