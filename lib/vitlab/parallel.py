"""Data parallelism through accelerate: N processes, one per GPU (or gloo processes on a CPU).

`launch` starts the processes from anywhere, a notebook kernel included. It spawns rather than forks:
a kernel that has already touched CUDA or imported bitsandbytes cannot fork safely, which is why
accelerate's `notebook_launcher` refuses it.
`predict` is the sharded accuracy pass: each process runs its share of the split and
`gather_for_metrics` returns every image exactly once, in order, so N processes report what one does.
"""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not torch.cuda.is_available():
        # gloo picks an interface from the hostname, which fails on some CI machines: loopback always works.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    fn(*args)


def launch(fn: Callable, processes: int, *args: Any) -> None:
    """fn(*args) in `processes` processes on this machine (fn must be importable: a module-level
    function), or in this one when processes is 1."""
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    if processes == 1:
        fn(*args)
        return
    if torch.cuda.is_available() and torch.cuda.device_count() < processes:
        raise RuntimeError(f"{processes} processes asked for, but this machine has {torch.cuda.device_count()} GPU(s): "
                           "one process per GPU")
    mp.start_processes(_worker, args=(processes, _free_port(), fn, args), nprocs=processes, start_method="spawn")


def accelerator():
    """An Accelerator for this process: its GPU, or the CPU (gloo) where there is none."""
    from accelerate import Accelerator
    return Accelerator(cpu=not torch.cuda.is_available())


def _predict_worker(entry, settings, data_cfg: dict[str, Any], seed: int, split: str, batch_size: int, out: str) -> None:
    from . import data, evaluate, infer
    acc = accelerator()
    ds = data.for_checkpoint(data_cfg, seed, entry.path)
    model = evaluate.load(entry, settings, acc.device, lambda: ds.loader("valid", batch_size))  # speed paths too
    loader = acc.prepare_data_loader(ds.loader(split, batch_size))
    dtype = infer.input_dtype(model)
    logits, labels = [], []
    with torch.inference_mode():
        for x, y in loader:
            out_logits = model(pixel_values=x.to(acc.device, dtype)).logits.float()
            got_logits, got_labels = acc.gather_for_metrics((out_logits, torch.as_tensor(y, device=acc.device)))
            logits.append(got_logits.cpu())
            labels.append(got_labels.cpu())
    if acc.is_main_process:
        np.savez(out, logits=torch.cat(logits).numpy(), labels=torch.cat(labels).numpy(), processes=acc.num_processes)
    acc.wait_for_everyone()
    acc.end_training()


def predict(entry, settings, data_cfg: dict[str, Any], seed: int, split: str, batch_size: int,
            processes: int) -> tuple[np.ndarray, np.ndarray]:
    """Float32 logits and labels of a run's model (a `runs.RunModel`, loaded as evaluate loads it) on a
    split sharded over `processes` processes (one per GPU): every image once, in the split's order."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "predictions.npz")
        launch(_predict_worker, processes, entry, settings, data_cfg, seed, split, batch_size, out)
        got = np.load(out)
        if int(got["processes"]) != processes:
            raise RuntimeError(f"asked for {processes} processes, the prediction ran in {int(got['processes'])}")
        return got["logits"], got["labels"]
