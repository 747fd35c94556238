"""Data parallelism through accelerate: N processes, one per GPU (or gloo processes on a CPU).

`launch` starts the processes from anywhere, a notebook kernel included. It spawns rather than forks:
a kernel that has already touched CUDA or imported bitsandbytes cannot fork safely, which is why
accelerate's `notebook_launcher` refuses it.
`predict` is the sharded accuracy pass: each process runs its share of the split and
`gather_for_metrics` returns every image exactly once, in order, so N processes report what one does.
`finetune` trains with DDP, every process a share of each batch (`finetune.batch_size` stays the
global batch, so a schedule means the same on any number of GPUs); `ablation_sweep` spreads the
ablation's configurations over the processes. `train_main` is the same training as a command for
`accelerate launch` (several nodes; the launcher sets the ranks).
"""
from __future__ import annotations

import json
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
    """An Accelerator for this process: its GPU, or the CPU (gloo) where there is none. A DataLoader it
    prepares hands each process its share of every batch (split_batches): the batch size is global."""
    from accelerate import Accelerator, DataLoaderConfiguration
    return Accelerator(cpu=not torch.cuda.is_available(), dataloader_config=DataLoaderConfiguration(split_batches=True))


def shard(batches, acc):
    """This process's share of every batch: GpuBatches shard themselves, a DataLoader through accelerate."""
    from .gpu_data import GpuBatches
    return batches.shard(acc.process_index, acc.num_processes) if isinstance(batches, GpuBatches) else acc.prepare_data_loader(batches)


def _finetune_worker(params: dict[str, Any], out_dir: str, checkpoint: str | None, history_file: str,
                     initial: str | None = None) -> None:
    import transformers

    from . import data, finetune as ft_module, models
    acc = accelerator()
    transformers.set_seed(params["seed"])  # the same initial weights in every process
    settings, ft = models.ModelSettings.from_params(params["model"]), params["finetune"]
    processor = models.load_processor(settings)
    ds = data.for_model(params["data"], params["seed"], processor)
    model = ft_module.build(settings, ft, ds.class_names, acc.device)
    if initial is not None:  # the caller's model: the run starts from the weights its notebook shows
        model.load_state_dict(torch.load(initial, map_location="cpu"))
    history = ft_module.fit(model, ds, params, acc.device, checkpoint and Path(checkpoint), accelerator=acc)
    if acc.is_main_process:
        ft_module.save(model, processor, settings, ds.class_names, ft["method"], Path(out_dir))
        Path(history_file).write_text(json.dumps(history))
    acc.wait_for_everyone()
    acc.end_training()


def finetune(params: dict[str, Any], model: torch.nn.Module, out_dir: str | Path, checkpoint: str | Path | None,
             processes: int) -> list[dict]:
    """Fine-tune `model` (as finetune.build made it from params) in `processes` data-parallel processes
    (one per GPU; gloo on a CPU), every one starting from its weights; the main process writes adapter/
    and model/ into out_dir as finetune.save does. Returns the history."""
    with tempfile.TemporaryDirectory() as tmp:
        history_file, initial = Path(tmp) / "history.json", Path(tmp) / "initial.pt"
        torch.save(model.state_dict(), initial)
        launch(_finetune_worker, processes, params, str(out_dir), checkpoint and str(checkpoint), str(history_file),
               str(initial))
        return json.loads(history_file.read_text())


def train_main(argv: list[str] | None = None) -> None:
    """`accelerate launch -m vitlab.parallel PARAMS OUT_DIR [--set K=V ...]`: the fine-tuning of PARAMS on
    every process the launcher started (several nodes: see the README's SLURM recipe); the main
    process writes OUT_DIR/model (a checkpoint later steps take as model.id) and OUT_DIR/history.json."""
    import argparse

    from . import config
    ap = argparse.ArgumentParser(prog="accelerate launch -m vitlab.parallel", description=train_main.__doc__)
    ap.add_argument("params")
    ap.add_argument("out_dir")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    params = config.resolve(args.params, args.set)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _finetune_worker(params, str(out), str(out / "last.pt"), str(out / "history.json"))


def _sweep_worker(checkpoint: str, settings, base, quant_types: list[str], data_cfg: dict[str, Any], seed: int,
                  split: str, batch_size: int, out: str) -> None:
    from accelerate.utils import gather_object

    from . import ablation, data
    acc = accelerator()
    ds = data.for_checkpoint(data_cfg, seed, checkpoint)
    batches = list(ds.loader(split, batch_size))  # the same images, in the same order, in every process
    timings: dict = {}
    rows = ablation.sweep(checkpoint, settings, base, quant_types, batches, acc.device, seed, timings,
                          shard=(acc.process_index, acc.num_processes), gather=gather_object)
    if acc.is_main_process:
        Path(out).write_text(json.dumps({"rows": rows, "timings": timings, "processes": acc.num_processes}))
    acc.wait_for_everyone()
    acc.end_training()


def ablation_sweep(checkpoint: str | Path, settings, base, quant_types: list[str], data_cfg: dict[str, Any], seed: int,
                   split: str, batch_size: int, processes: int, timings: dict | None = None) -> list[dict]:
    """ablation.sweep with its configurations spread over `processes` processes (each scores its share
    on the same images; the rows are gathered in the one-process order)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        launch(_sweep_worker, processes, str(checkpoint), settings, base, quant_types, data_cfg, seed, split, batch_size, str(out))
        got = json.loads(out.read_text())
    if got["processes"] != processes:
        raise RuntimeError(f"asked for {processes} processes, the sweep ran in {got['processes']}")
    if timings is not None:
        timings.update(got["timings"])
    return got["rows"]


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


if __name__ == "__main__":
    train_main()
