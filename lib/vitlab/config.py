"""Load, merge and validate the YAML parameters of a run, without importing torch.

`params/defaults.yaml` holds every key a run may set, with its default; `settings.Params` types and
checks them. A variant file and `--set key=value` overrides are merged on top; anything else is an
error that names the key and the closest valid one.
"""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ParamsError
from .settings import REPO_ROOT, Params

PARAMS_DIR = REPO_ROOT / "params"
DEFAULTS_FILE = PARAMS_DIR / "defaults.yaml"
# Dicts whose keys are not ours to fix: model.config is handed to transformers' ViTConfig.
FREE_FORM = {"model.config"}


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter and kinder: a key given twice is refused (a second `finetune:` block
    would silently replace the first), and `1e-3` is a float as a person means it (YAML 1.1 wants `1.0e-3`)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(None, None, f"the key '{key}' is given twice", mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        known = sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))
        raise ParamsError(f"params file {path} does not exist; known variants: {', '.join(known)}")
    try:
        data = parse_yaml(path.read_text())
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
            node[parts[-1]] = parse_yaml(raw)
        except yaml.YAMLError as e:
            raise ParamsError(f"--set {item}: the value is not valid YAML ({getattr(e, 'problem', None) or e}); "
                              "quote it or write a list as [a, b]") from None
    return out


def validate(params: dict[str, Any]) -> Params:
    """The typed params, every value and every combination checked (settings.Params); ParamsError otherwise."""
    return Params.of(params)


def load_recorded(recorded: dict[str, Any], source: str | Path) -> dict[str, Any]:
    """A run's recorded params.yaml merged over today's defaults, so keys added since it was made read
    as their defaults, and checked as a new run's are: a hand-edited value is refused, not obeyed."""
    try:
        params = merge(defaults(), recorded)
        validate(params)
    except ParamsError as e:
        raise ParamsError(f"{source}: {e}") from None
    return params


def resolve(params_file: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """defaults <- variant file <- --set overrides, validated, with `variant` filled in."""
    params_file = Path(params_file)
    merged = merge(defaults(), load_yaml(params_file))
    merged = merge(merged, parse_set(overrides or []))
    if merged["variant"] is None:
        merged["variant"] = params_file.stem
    validate(merged)
    return merged
