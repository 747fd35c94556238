"""Data parallelism through accelerate: launching N processes, one per GPU (or gloo processes on a CPU),
and sharding batches over them. Each step's worker lives beside its step: `finetune.train_in_processes`
(DDP), `evaluate.predict_in_processes` (the sharded accuracy pass), `ablation.sweep_in_processes`.

`launch` starts the processes from anywhere, a notebook kernel included. It spawns rather than forks:
a kernel that has already touched CUDA or imported bitsandbytes cannot fork safely, which is why
accelerate's `notebook_launcher` refuses it.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from .gpu_data import GpuBatches


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
    """An Accelerator for this process: its GPU, or the CPU (gloo) where there is none. A DataLoader it
    prepares hands each process its share of every batch (split_batches): the batch size is global."""
    from accelerate import Accelerator, DataLoaderConfiguration
    return Accelerator(cpu=not torch.cuda.is_available(), dataloader_config=DataLoaderConfiguration(split_batches=True))


def shard(batches, acc):
    """This process's share of every batch: GpuBatches shard themselves, a DataLoader through accelerate."""
    return batches.shard(acc.process_index, acc.num_processes) if isinstance(batches, GpuBatches) else acc.prepare_data_loader(batches)
