"""What this machine can do, asked without importing torch where the answer does not need it: whether a
run's params fit it (a GPU for CUDA-only settings, one GPU per process, the flash-attn package), and how
many CPU threads a step should use while other work shares the cores."""
from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DataError, ModelError, ParamsError
from .settings import GPU_ONLY_ATTENTION, Params, local_model

if TYPE_CHECKING:
    import torch


def _no_gpu_here() -> bool:
    """True when this machine certainly has no NVIDIA GPU (no driver): then nothing needs torch to say so."""
    return not os.path.exists("/proc/driver/nvidia/gpus") and not any(Path("/dev").glob("nvidia[0-9]*"))


def check_imagefolder(root: Path) -> None:
    """An ImageFolder tree checked from its listing: the three splits, the same class folders in each, two
    or more, none empty. Before any run folder (`check_data`), and by `data` before it reads an image."""
    missing = [s for s in ("train", "valid", "test") if not (root / s).is_dir()]
    if missing:
        raise DataError(f"data.root {root} has no {'/'.join(missing)} folder(s); an imagefolder data set needs "
                        "root/train/<class>/*.jpg, root/valid/<class>/*.jpg and root/test/<class>/*.jpg")
    classes = {s: sorted(d.name for d in (root / s).iterdir() if d.is_dir()) for s in ("train", "valid", "test")}
    if len(classes["train"]) < 2:
        raise DataError(f"{root}/train holds {len(classes['train'])} class folder(s): a classifier needs two or more")
    for s in ("valid", "test"):
        if classes[s] != classes["train"]:
            diff = sorted(set(classes["train"]) ^ set(classes[s]))
            raise DataError(f"{root}/{s} and {root}/train hold different class folders: {diff[:10]}")
    listing = {(s, c): list((root / s / c).iterdir()) for s in classes for c in classes[s]}
    empty = [f"{s}/{c}" for (s, c), entries in listing.items() if not entries]
    if empty:
        raise DataError(f"class folder(s) {empty[:5]} under {root} hold no images")
    # A link to a folder above it makes a loop: the images under it are read again and again, relabelled.
    loops = [p for (s, c), entries in listing.items() for p in entries if p.is_symlink() and p.is_dir()
             and (root / s / c).resolve().is_relative_to(p.resolve())]
    if loops:
        raise DataError(f"{loops[0]} is a link to a folder above it (a loop: its images would be read again and "
                        f"again under other labels); remove it")


def check_checkpoint(path: str | Path, key: str = "model.id") -> None:
    """A local checkpoint folder's problems named before transformers meets them (its words for these are
    "Repo id must be in the form ...", "Unrecognized model", or a pickle loaded where safetensors were meant).
    A name that is not a path (a hub id like org/name) passes: the hub answers for it. A relative path is
    the repo root's, as model.id's is, wherever vitlab runs from."""
    path = local_model(str(path)) or Path(path)
    if not path.is_dir():
        if path.is_absolute() or len(path.parts) > 2 or path.suffix:
            raise ModelError(f"checkpoint folder {path} does not exist (a step that made it did not finish, or it "
                             f"was moved): re-run the step that writes it, or give {key} an existing folder")
        return
    missing = [f for f in ("config.json", "model.safetensors") if not (path / f).is_file()]
    if missing:
        pickled = " (it holds a pickled pytorch_model.bin, which vitlab does not load: it can run code)" if (
            path / "pytorch_model.bin").is_file() else ""
        raise ModelError(f"{path} has no {' or '.join(missing)}{pickled}: a checkpoint folder is what "
                         "save_pretrained writes (config.json and model.safetensors)")


def check_growth(path: str, config: dict) -> None:
    """model.grow_from's checkpoint and whether it fits inside model.config (vitlab.grow's rules), from its
    config.json, before any work."""
    check_checkpoint(path, "model.grow_from")
    folder = local_model(path)
    if folder is None:
        raise ModelError(f"model.grow_from {path} is not a checkpoint folder: give the folder a trained run wrote "
                         "(e.g. runs/<run>/finetune/model)")
    small = json.loads((folder / "config.json").read_text())
    fields = {"image_size": 224, "patch_size": 16, "hidden_size": 768, "num_hidden_layers": 12,
              "num_attention_heads": 12, "intermediate_size": 3072}
    s = {k: small.get(k, v) for k, v in fields.items()}  # absent: ViTConfig's default
    b = {k: config.get(k, v) for k, v in fields.items()}
    same = [k for k in ("image_size", "patch_size") if s[k] != b[k]]
    if s["hidden_size"] // s["num_attention_heads"] != b["hidden_size"] // b["num_attention_heads"]:
        same.append("head width (hidden_size / num_attention_heads)")
    smaller = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size") if b[k] < s[k]]
    if same or smaller:
        raise ModelError(f"model.grow_from {path} does not fit inside model.config: "
                         + "; ".join([f"{k} must be the same" for k in same]
                                     + [f"{k} {b[k]} is smaller than its {s[k]}" for k in smaller]))


def check_data(p: Params) -> None:
    """The run's ImageFolder data, from its listing, before any run folder (the images are read by the steps)."""
    if p.data.source == "imagefolder" and {"finetune", "quantize", "evaluate", "ablation"} & set(p.steps):
        root = Path(p.data.root).expanduser()
        check_imagefolder(root if root.is_absolute() else Path(__file__).resolve().parents[2] / root)


def check(p: Params) -> None:
    """What would fail only inside a step, checked before any: the device, its attention kernel, CUDA graphs,
    one GPU per process. Fast on a machine without a GPU; with one, torch answers."""
    # evaluate runs the speed path, and so does the ablation's mixed choice (ablation.formats)
    sped = "evaluate" in p.steps or ("ablation" in p.steps and bool(p.ablation.formats))
    wants_gpu = [reason for needed, reason in (
        (p.model.attention in GPU_ONLY_ATTENTION, f"attention '{p.model.attention}'"),
        (p.finetune.cuda_graph and "finetune" in p.steps, "finetune.cuda_graph (the training step as a CUDA graph)"),
        (p.speed.cuda_graph and sped, "speed.cuda_graph (the forward replayed as a CUDA graph)"),
        (p.speed.fp8_gemm == "triton" and sped, "speed.fp8_gemm: triton (vitlab's GPU kernel)"),
        (p.device.startswith("cuda"), f"device '{p.device}'")) if needed]
    if p.model.attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ParamsError("attention 'flash_attention_2' needs the flash-attn package, which is not installed: "
                          "`pip install flash-attn --no-build-isolation` (or `pip install -e '.[flash]'`), "
                          "or use 'sdpa_flash' (PyTorch's built-in FlashAttention-2 kernel)")
    if (p.finetune.method == "qlora" and p.finetune.qlora_base == "torchao" and "finetune" in p.steps
            and importlib.util.find_spec("torchao") is None):
        raise ParamsError("finetune.qlora_base: torchao needs the torchao package, which is not installed: "
                          "`pip install torchao` (or `pip install -e '.[fast]'`), or use qlora_base: bitsandbytes")
    if p.device == "cpu" or _no_gpu_here():
        gpus = 0
    else:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if wants_gpu and gpus == 0:
        where = "device: cpu" if p.device == "cpu" else "no CUDA GPU is visible here"
        raise ParamsError(f"{wants_gpu[0]} needs a CUDA GPU ({where}); use attention 'sdpa' or 'eager', "
                          "finetune.cuda_graph / speed.cuda_graph: false, speed.fp8_gemm: cublas, device: auto or cpu")
    for key, processes in (("eval.processes", p.eval.processes), ("finetune.processes", p.finetune.processes),
                           ("ablation.processes", p.ablation.processes)):
        if processes > 1 and gpus and gpus < processes:
            raise ParamsError(f"{key} is {processes}, but this machine has {gpus} GPU(s): one process per GPU")
    check_data(p)
    if p.model.id is not None:
        check_checkpoint(p.model.id)
    if p.model.grow_from is not None and "finetune" in p.steps:
        check_growth(p.model.grow_from, p.model.config)
    if p.finetune.teacher is not None and "finetune" in p.steps:
        check_checkpoint(p.finetune.teacher, "finetune.teacher")
    if gpus and p.model.attention in ("sdpa_flash", "sdpa_cudnn", "flash_attention_2"):
        import torch

        from .attention import check_supported  # capability and dtype: torch's answer (attention sits below)

        check_supported(p.model.attention, torch.device("cuda" if p.device == "auto" else p.device))


def _busy_cores(seconds: float = 0.3) -> float:
    """How many of this machine's cores other processes keep busy right now (Linux' /proc/stat, sampled
    over `seconds`; 0 where it cannot be read)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(t) for t in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait

    try:
        (total0, idle0), _ = sample(), time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def cpu_threads() -> int:
    """torch's CPU threads for a step: the cores this process may use that no other process keeps busy.
    On small models each op ends in a barrier of every thread; one thread descheduled by other work
    stalls the rest (measured: 2 threads 3.6x slower than 1 on a 2-core box with one core busy)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, round(cores - _busy_cores())))


def use_cpu_threads() -> int:
    """Set torch's intra-op threads to `cpu_threads()`, saying so when other work takes cores."""
    import torch

    threads, cores = cpu_threads(), torch.get_num_threads()
    if threads < cores:
        print(f"other processes keep {cores - threads} of {cores} cores busy: torch uses {threads} thread(s)",
              flush=True)
    torch.set_num_threads(threads)
    return threads


def resolve_device(name: str) -> "torch.device":
    """The torch device `device` names: auto (a CUDA GPU when there is one), cpu, cuda or cuda:N."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device '{name}' asked for, but no CUDA GPU is visible; use device: cpu or auto")
    return device
