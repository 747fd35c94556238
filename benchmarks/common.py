"""What the benchmark scripts share: the flags every one takes, random-init ViT checkpoints of the
standard shapes, vitlab's settings for them (quantization defaults read from params/defaults.yaml), and
the one shape of every result JSON.

A result is `benchmarks/results/<bench>_<device>[_<part>][_<tag>].json` holding `{meta, rows}`: meta has the
command, arguments, seconds, weights, git commit, versions and device; rows are flat dicts. A file with
more than one table gives every row of the others a `table` field (rows without one are the main table).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
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
RESULTS = Path(__file__).parent / "results"


def parser(doc: str | None, device: str = "cuda") -> argparse.ArgumentParser:
    """The flags every benchmark takes: --out, --device, --tag."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS), help="folder of the result JSON (default benchmarks/results)")
    ap.add_argument("--device", default=device, help=f"where to measure (default {device})")
    ap.add_argument("--tag", default="", help="appended to the result's name: <bench>_<device>_<tag>.json")
    return ap


# Dense tensor-core peaks in TFLOP/s (NVIDIA's data sheets, without sparsity): bf16, FP8, by device name.
PEAKS = {"H100 80GB HBM3": (989.4, 1978.9), "H100 PCIe": (756.0, 1513.0), "H200": (989.4, 1978.9)}


def dense_peaks(device_name: str) -> tuple[float, float] | None:
    """(bf16, FP8) dense TFLOP/s of the GPU called `device_name`, None for one not in PEAKS."""
    return next((v for k, v in PEAKS.items() if k in device_name), None)


def device_tag(device: dict) -> str:
    """h200, h100, ... for a CUDA device (the model number in its name, as runs.environment() records it), cpu otherwise."""
    if device["type"] != "cuda":
        return "cpu"
    return next((w.lower() for w in device["name"].split() if w[:1] in "ABHL" and w[1:].isdigit()), "cuda")


def tables(**named: list[dict]) -> list[dict]:
    """Several tables as one list of rows, each row of a table other than `rows` marked with its name."""
    return [row if name == "rows" else {"table": name, **row} for name, rows in named.items() for row in rows]


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


def vitlab_run(params_file: str, variant: str, steps: str, sets: list[str], device: str = "auto",
               time_limit: float | None = None) -> Path:
    """`python -m vitlab run` of `params_file` as run `variant` on `device` (this Python, from the repo root),
    with --time-limit `time_limit` seconds if given; its folder."""
    cmd = [sys.executable, "-m", "vitlab", "run", params_file, "--steps", steps, "--set", f"variant={variant}",
           "--set", f"device={device}", *(["--time-limit", f"{time_limit:.0f}"] if time_limit else []),
           *[a for s in sets for a in ("--set", s)]]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=runs.REPO_ROOT)
    return runs.latest(variant, tuple(steps.split(",")))


MIN_VARIANT_S = 120  # under --time-limit, no variant starts with less left than this


class NotStarted(Exception):
    """Too little of the time limit is left to start a run (MIN_VARIANT_S)."""


def flat(tree: dict, prefix: str = "", whole: tuple[str, ...] = ()) -> dict[str, Any]:
    """Nested params as {"finetune.lr": 0.001, ...}; the sections named in `whole` stay one value."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in whole:
            out |= flat(value, f"{prefix}{key}.", whole)
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed(run_dir: Path, params_file: str, steps: str, sets: list[str], device: str) -> dict[str, tuple]:
    """What `vitlab run params_file --steps steps --set ...` would run with that the run `run_dir` did not:
    {key: (the run's value, this command's)}."""
    wanted = config.resolve(runs.REPO_ROOT / params_file, [f"variant={runs.load_params(run_dir)['variant']}",
                                                          f"device={device}", *sets])
    wanted["steps"] = steps.split(",")
    had, want = flat(runs.load_params(run_dir)), flat(wanted)
    return {k: (had.get(k), want.get(k)) for k in sorted(set(had) | set(want)) if had.get(k) != want.get(k)}


def continued(variant: str, params_file: str, steps: str, sets: list[str], device: str, left: float | None) -> Path:
    """The run `variant`: an earlier command's if it finished, continued (--resume) if it stopped, else a new
    `vitlab run`; a new one too when the earlier run's params differ from this command's (it says which).
    Raises CalledProcessError when the run fails or stops at the time limit (exit 3), NotStarted when it has
    work to do and less than MIN_VARIANT_S is `left`."""
    earlier = [r for r in runs.list_runs(runs.RUNS_DIR) if runs.load_params(r)["variant"] == variant]
    differs = changed(earlier[-1], params_file, steps, sets, device) if earlier else {}
    if differs:
        print(f"{variant}: {earlier[-1].name} ran with other params ("
              + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differs.items()) + "): a new run", flush=True)
        earlier = []
    if earlier and runs.manifest(earlier[-1])["status"] == "ok":
        print(f"{variant}: done before -> {earlier[-1]}", flush=True)
        return earlier[-1]
    if left is not None and left < MIN_VARIANT_S:
        raise NotStarted(f"{variant}: not started, {left:.0f} s left of the time limit")
    if earlier:  # stopped by an earlier command's time limit: continued where it stopped
        subprocess.run([sys.executable, "-m", "vitlab", "run", "--resume", str(earlier[-1]),
                        *(["--time-limit", f"{left:.0f}"] if left else [])], check=True, cwd=runs.REPO_ROOT)
        return earlier[-1]
    return vitlab_run(params_file, variant, steps, sets, device, left)


def by_table(result: dict) -> dict[str, Any]:
    """A result JSON's tables by name: meta, rows (the main table) and each other table's rows."""
    out: dict[str, Any] = {"meta": result["meta"], "rows": []}
    for row in result["rows"]:
        row = dict(row)
        out.setdefault(row.pop("table", "rows"), []).append(row)
    return out


def result_path(args: Any, bench: str, device: dict, part: str = "") -> Path:
    """Where `write` puts a benchmark's result: <args.out>/<bench>_<device>[_<part>][_<tag>].json."""
    return Path(args.out) / ("_".join(filter(None, [bench, device_tag(device), part, args.tag])) + ".json")


def write(args: Any, bench: str, t0: float, rows: list[dict], weights: str = WEIGHTS,
          measured_on: dict | None = None, part: str = "", **meta: Any) -> Path:
    """<args.out>/<bench>_<device>[_<part>][_<tag>].json as `{meta, rows}`. Written after every model, so a
    run cut short still leaves what it measured. `measured_on`: the device of results collected from run
    folders (their manifest's); otherwise the one --device named. `part`: one of several files a benchmark
    writes. `meta` adds to the metadata (e.g. context)."""
    env = runs.environment()
    if measured_on is None and args.device == "cpu":
        measured_on = {"type": "cpu", "name": "cpu", "count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    env["device"] = measured_on or env["device"]
    meta = {"command": "python " + shlex.join(sys.argv), "args": vars(args), "seconds": round(time.time() - t0, 1),
            "weights": weights, "tf32": torch.backends.cuda.matmul.allow_tf32, **env, **meta}
    path = result_path(args, bench, env["device"], part)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    return path
