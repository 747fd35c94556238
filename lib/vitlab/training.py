"""The training loop: an optimizer step (plain, or replayed as a CUDA graph), epochs with validation,
selection, a moving average of the weights, stochastic depth and a resumable state, driven by the typed
`finetune` settings (`settings.Finetune`). What model trains, and how it is saved, is `finetune`'s."""
from __future__ import annotations

import contextlib
import copy
import math
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from . import models, runs, speed
from .errors import RunError, TimeLimitReached
from .settings import Finetune, local_model

PROGRESS_EVERY_S = 10.0


class Ema:
    """An exponential moving average of a model's weights, updated after every step by one fused lerp.
    (torch's AveragedModel copies its step counter to the GPU on every update, a copy that waits for
    the GPU to finish the step: the CPU could not queue the next one meanwhile.)"""

    def __init__(self, model: nn.Module, decay: float):
        self.module, self.decay = copy.deepcopy(model), decay
        self._pairs = [(e, m) for e, m in zip(self._tensors(self.module), self._tensors(model))]

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        # A frozen weight's average is itself (and a 4-bit base's packed weights cannot be averaged).
        return [t for t in [*(p for p in model.parameters() if p.requires_grad), *model.buffers()] if t.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        averaged, current = zip(*self._pairs)
        torch._foreach_lerp_(list(averaged), [c.detach() for c in current], 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


def _autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "no":
        return None
    if setting == "fp16":
        return torch.float16
    if setting == "bf16":
        return torch.bfloat16
    # auto: bf16 on GPUs that have it; CPU autocast is slower than float32 on most CPUs.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _mixer(ft: Finetune, num_classes: int):
    """MixUp and/or CutMix (torchvision v2, one of them per batch) turning labels into soft targets, or None."""
    from torchvision.transforms import v2

    mixes = [v2.MixUp(alpha=ft.mixup_alpha, num_classes=num_classes)] if ft.mixup_alpha else []
    mixes += [v2.CutMix(alpha=ft.cutmix_alpha, num_classes=num_classes)] if ft.cutmix_alpha else []
    return v2.RandomChoice(mixes) if mixes else None


def _logits(model: nn.Module, x: torch.Tensor, other_size: bool) -> torch.Tensor:
    # Batches smaller than the model's image size see its position embeddings interpolated.
    return (model(pixel_values=x, interpolate_pos_encoding=True) if other_size else model(pixel_values=x)).logits


class TrainStep:
    """One optimizer step on a batch: forward, loss, backward, clipping, optimizer, LR schedule, EMA.
    Returns the (detached) loss and logits."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, ft: Finetune,
                 amp: torch.dtype | None, scaler: torch.amp.GradScaler | None, ema: Ema | None, device: torch.device):
        self.model, self.optimizer, self.scheduler, self.amp, self.scaler, self.ema = model, optimizer, scheduler, amp, scaler, ema
        self.device, self.max_grad_norm, self.label_smoothing = device, ft.max_grad_norm, ft.label_smoothing
        self.accumulate = ft.accumulate
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.teacher, self.alpha = None, ft.distill_alpha  # `teacher` set by _setup when ft.teacher names one

    def loss(self, out: torch.Tensor, x: torch.Tensor, target: torch.Tensor, other_size: bool) -> torch.Tensor:
        """Cross-entropy on the (smoothed, mixed) labels; with a teacher, DeiT's hard distillation: the
        teacher's top class on the same augmented images is a second target, weighted `alpha`."""
        loss = nn.functional.cross_entropy(out.float(), target, label_smoothing=self.label_smoothing)
        if self.teacher is None:
            return loss
        with torch.no_grad():
            taught = _logits(self.teacher, x, other_size).argmax(1)
        return (1 - self.alpha) * loss + self.alpha * nn.functional.cross_entropy(out.float(), taught)

    def compute(self, x: torch.Tensor, target: torch.Tensor, other_size: bool, graphed: bool = False):
        """With `accumulate` k the batch is k micro-batches, each backpropagated at its share of the batch
        times its mean loss, so the step's gradient is the whole batch's; under DDP only the last all-reduces."""
        self.optimizer.zero_grad(set_to_none=True)
        losses, logits = [], []
        parts = list(zip(x.chunk(self.accumulate), target.chunk(self.accumulate)))  # fewer for a ragged last batch
        for i, (xi, ti) in enumerate(parts):
            last, share = i == len(parts) - 1, len(xi) / len(x)
            quiet = self.model.no_sync() if not last and hasattr(self.model, "no_sync") else contextlib.nullcontext()
            with quiet:
                # A CUDA graph must not keep autocast's casts of the weights from its capture.
                with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None,
                                    cache_enabled=not graphed):
                    out = _logits(self.model, xi, other_size)
                    loss = self.loss(out, xi, ti, other_size)
                (self.scaler.scale(loss * share) if self.scaler is not None else loss * share).backward()
            losses.append(loss.detach() * share)
            logits.append(out.detach())
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        return torch.stack(losses).sum(), torch.cat(logits)

    def __call__(self, x: torch.Tensor, target: torch.Tensor, other_size: bool = False):
        out = self.compute(x, target, other_size)
        self.scheduler.step()
        return out


class CudaGraphStep(TrainStep):
    """The same step replayed as one CUDA graph per input shape: a small ViT's step is hundreds of short
    kernels, and launching them one by one from Python leaves the GPU idle between them. The first
    `warmup` steps of a shape run eagerly on a side stream (real steps, as CUDA graphs' capture asks),
    the next one is captured; then each step copies the batch into the graph's inputs and replays it.
    The learning rate lives in a device tensor the graph reads, which the schedule refills each step
    (AdamW must be fused and capturable); dropout and stochastic depth draw fresh randomness per replay."""

    def __init__(self, *args, warmup: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        if self.scaler is not None:
            raise ValueError("finetune.cuda_graph cannot capture fp16's loss scaling (it syncs with the host): use bf16")
        # Swapped in after the schedule recorded its float base rates, so its updates stay host-side numbers.
        self.lrs = []
        for group in self.optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=self.device)
            self.lrs.append(group["lr"])
        self.warmup, self.shape, self.graph, self.warm = warmup, None, None, 0

    def __call__(self, x: torch.Tensor, target: torch.Tensor, other_size: bool = False):
        shape = (tuple(x.shape), tuple(target.shape), other_size)
        if shape != self.shape:  # progressive resizing: a new graph for the new shape, the old one freed
            self.shape, self.graph, self.warm = shape, None, 0
        if self.graph is None and self.warm < self.warmup:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = self.compute(x, target, other_size)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.warm += 1
        else:
            if self.graph is None:
                self.x, self.target, self.graph = x.clone(), target.clone(), torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.out = self.compute(self.x, self.target, other_size, graphed=True)
            self.x.copy_(x)
            self.target.copy_(target)
            self.graph.replay()
            out = self.out
        self.scheduler.step()
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            if group["lr"] is not lr:  # a torch whose schedulers assign a float rather than fill the tensor
                lr.fill_(float(group["lr"]))
                group["lr"] = lr
        return out


def stochastic_depth(model: nn.Module, rate: float) -> list:
    """Stochastic depth: in training, each sample skips encoder layer i with probability rate * i / (L - 1)
    (the residual stream passes it unchanged; kept samples are scaled by 1 / (1 - p)). Forward hooks,
    so the model stays a plain ViT that saves and loads as one; returns the hooks' handles."""
    _, layers = models.encoder_layers(model)
    handles = []
    for i, layer in enumerate(layers):
        p = rate * i / max(len(layers) - 1, 1)
        if p > 0:
            handles.append(layer.register_forward_hook(_skipper(p), with_kwargs=True))
    return handles


def _skipper(p: float):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output):
        if not module.training:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        keep = torch.empty((len(hidden),) + (1,) * (hidden.ndim - 1), device=hidden.device,
                           dtype=out.dtype).bernoulli_(1 - p).div_(1 - p)
        mixed = hidden + keep * (out - hidden)
        return (mixed, *output[1:]) if isinstance(output, tuple) else mixed
    return hook


def _epoch(model: nn.Module, batches: Iterable, device: torch.device, amp: torch.dtype | None,
           step: TrainStep | None = None, mixer=None, desc: str = "", other_size: bool = False,
           accelerator=None) -> dict:
    training = step is not None
    model.train(training)
    # Sums stay on the device: a .item() per step would make the GPU wait for Python every batch.
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    started = shown = time.monotonic()
    for i, (x, y) in enumerate(batches, 1):
        if i > 1 and time.monotonic() - shown > PROGRESS_EVERY_S:  # a long epoch says where it is, in plain lines
            elapsed = time.monotonic() - started
            print(f"{desc}: {i - 1}/{len(batches)} batches · {_clock(elapsed)} elapsed, "
                  f"~{_clock(elapsed / (i - 1) * (len(batches) - i + 1))} left in this epoch", flush=True)
            shown = time.monotonic()
        x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
        target = y
        if training:
            if mixer is not None:
                x, target = mixer(x, y)
            loss, logits = step(x, target, other_size)
        else:
            with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = _logits(model, x, other_size)
                loss = nn.functional.cross_entropy(logits.float(), target)
        loss_sum += loss * len(y)
        # Under MixUp/CutMix a prediction counts as right when it names the larger part of the mix.
        truth = target.argmax(-1) if target.ndim == 2 else target
        correct += (logits.argmax(-1) == truth).sum()
        seen += len(y)
    if accelerator is not None:  # every process's share of the epoch
        loss_sum, correct, seen = accelerator.reduce(torch.stack([loss_sum, correct, torch.tensor(float(seen), device=device)]), "sum")
        seen = int(seen.item())
    return {"loss": loss_sum.item() / seen, "acc": correct.item() / seen, "images": seen}


@dataclass
class _Setup:
    """What one training keeps across epochs."""
    step: TrainStep
    stepped: nn.Module  # what trains: the model, under DDP and/or compile
    scored: nn.Module  # what is validated and kept: the model, or its moving average
    state: dict[str, Any]  # what a resumable checkpoint holds
    amp: torch.dtype | None
    mixer: Any


def _setup(model: nn.Module, ft: Finetune, steps: int, device: torch.device, num_classes: int | None,
           accelerator) -> _Setup:
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel does the update of every tensor in a few launches (CUDA only).
    optimizer = torch.optim.AdamW(params, lr=ft.lr, weight_decay=ft.weight_decay, fused=device.type == "cuda",
                                  capturable=ft.cuda_graph)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(ft.warmup_ratio * steps), steps)
    amp = _autocast_dtype(ft.mixed_precision, device)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    ema = Ema(model, ft.ema_decay) if ft.ema_decay else None
    if ft.compile == "blocks":
        # In place, so validation and the saved weights see the same module: blocks of one structure share one
        # compile, and attention inside a block gets no mask (a whole-model trace hands SDPA one: no flash kernel).
        speed.compiled(model, scope="blocks")
    stepped = accelerator.prepare_model(model) if accelerator is not None else model  # DDP: gradients averaged
    # Validation runs the plain module: one compiled graph per training shape is enough.
    stepped = torch.compile(stepped) if ft.compile is True else stepped
    step = (CudaGraphStep if ft.cuda_graph else TrainStep)(stepped, optimizer, scheduler, ft, amp, scaler, ema, device)
    step.teacher = teacher(ft, num_classes, device) if ft.teacher else None
    return _Setup(step, stepped, ema.module if ema is not None else model,
                  {"model": model, "optimizer": optimizer, "scheduler": scheduler, "ema": ema, "scaler": scaler},
                  amp, _mixer(ft, num_classes) if num_classes else None)


def teacher(ft: Finetune, num_classes: int | None, device: torch.device) -> nn.Module:
    """ft.teacher, frozen, in bf16 on a GPU (float32 on the CPU), refused unless it has this data's classes."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = str(local_model(ft.teacher) or ft.teacher)  # relative to the repo root (a notebook runs in notebooks/)
    model = models.load_checkpoint(path, models.ModelSettings(id=path, dtype=dtype, attention="sdpa"), device)
    if num_classes is not None and model.config.num_labels != num_classes:
        raise RunError(f"finetune.teacher {ft.teacher} has {model.config.num_labels} classes, this data {num_classes}: "
                       "a teacher must be trained on the same classes")
    return model.requires_grad_(False).eval()


def _row(epoch: int, tr: dict, va: dict, seconds: float, batches, setup: _Setup, device: torch.device) -> dict:
    return {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": va["loss"],
            "val_acc": va["acc"], "lr": float(setup.state["scheduler"].get_last_lr()[0]), "seconds": seconds,
            "train_img_s": tr["images"] / seconds, "image_size": getattr(batches, "image_size", None),
            "peak_vram_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}


def _say(row: dict, epochs: int, started: float, done_before: int) -> None:
    """One line per epoch with elapsed time and an estimate of what is left: the terminal of `vitlab run`
    shows it while the step runs."""
    elapsed = time.monotonic() - started
    left = elapsed / (row["epoch"] - done_before) * (epochs - row["epoch"])
    valid = f"valid loss {row['val_loss']:.3f} acc {row['val_acc']:.3f}" if row["val_acc"] is not None else "not validated"
    print(f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.3f} acc {row['train_acc']:.3f} · {valid} · "
          f"{row['train_img_s']:.0f} img/s · {_clock(elapsed)} elapsed, ~{_clock(left)} left", flush=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def train(model: nn.Module, train_batches: Iterable, valid_batches: Iterable, ft: Finetune | dict[str, Any],
          device: torch.device, num_classes: int | None = None, checkpoint: Path | None = None,
          small_batches: Iterable | None = None, accelerator=None) -> list[dict[str, float]]:
    """Train for `ft.epochs`; one row per epoch with train/val loss and accuracy and images/s.

    With `ema_decay`, a moving average of the weights is validated and kept; with `select: best_valid`,
    the weights of the best-validated epoch are restored at the end (the history says which).
    Validation runs every `valid_every` epochs and after the last. With `checkpoint` (a file), the state
    after an epoch is kept there at most every `checkpoint_minutes`, and a training that finds one
    continues after its epoch. With `small_batches` (at data.train_image_size), every epoch but the last
    `full_size_epochs` trains on them (progressive resizing). With an `accelerator` (one of several
    data-parallel processes, finetune.train_in_processes), the model trains in DDP on this process's
    share of every batch; the main process alone validates, selects and keeps the resumable state.
    A loss that is not finite stops the training with an error naming the epoch. Under `vitlab run
    --time-limit` (runs.DEADLINE_ENV), a training with a `checkpoint` keeps its state and stops
    with TimeLimitReached after the last epoch that ends, by the last epoch's pace, before the limit."""
    ft = ft if isinstance(ft, Finetune) else Finetune.of(ft)
    if ft.method == "none":
        return []
    setup = _setup(model, ft, ft.epochs * len(train_batches), device, num_classes, accelerator)
    skips = stochastic_depth(model, ft.drop_path)
    small_until = ft.epochs - ft.full_size_epochs if small_batches is not None else 0
    main = accelerator is None or accelerator.is_main_process
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history, best = [], (-1.0, 0, None)
    if checkpoint is not None and Path(checkpoint).is_file():
        history, best = _restore(Path(checkpoint), setup.state, device)
        print(f"resuming after epoch {len(history)} of {ft.epochs} from {checkpoint}", flush=True)
    started, done_before, last_save, save_s = time.monotonic(), len(history), time.monotonic(), 0.0
    # One live bar over the epochs in JupyterLab (a widget per epoch left dozens of frozen bars); the terminal
    # of `vitlab run` gets the epoch lines and, in a long epoch, a line every PROGRESS_EVERY_S.
    for epoch in tqdm(range(len(history) + 1, ft.epochs + 1), desc="epochs", initial=len(history), total=ft.epochs,
                      disable=not main):
        batches = small_batches if epoch <= small_until else train_batches
        t0 = time.perf_counter()
        tr = _epoch(setup.stepped, batches, device, setup.amp, setup.step, setup.mixer, desc=f"train {epoch}",
                    other_size=epoch <= small_until, accelerator=accelerator)
        seconds = time.perf_counter() - t0
        if not math.isfinite(tr["loss"]):
            raise FloatingPointError(f"epoch {epoch}: the training loss is {tr['loss']}; lower finetune.lr "
                                     f"(it is {ft.lr}) or turn on finetune.max_grad_norm clipping")
        validated = main and (epoch % ft.valid_every == 0 or epoch == ft.epochs)
        va = (_epoch(setup.scored, valid_batches, device, setup.amp, desc=f"valid {epoch}") if validated
              else {"loss": None, "acc": None})
        history.append(_row(epoch, tr, va, seconds, batches, setup, device))
        if main:
            _say(history[-1], ft.epochs, started, done_before)
        if ft.select == "best_valid" and validated and va["acc"] > best[0]:
            best = (va["acc"], epoch, {k: v.clone() for k, v in _trainable(setup.scored, buffers=True).items()})
        stop = checkpoint is not None and epoch < ft.epochs and _out_of_time(history, small_until, save_s, accelerator)
        if main and checkpoint is not None and (time.monotonic() - last_save >= 60 * ft.checkpoint_minutes
                                                or epoch == ft.epochs or stop):
            save_s, last_save = _save(Path(checkpoint), setup.state, history, best), time.monotonic()
        if stop:
            raise TimeLimitReached(f"stopped at the time limit after epoch {epoch} of {ft.epochs}; the training "
                                   "state is kept: --resume continues from there")
    for handle in skips:
        handle.remove()
    return _finish(model, setup, ft, history, best, main)


def _out_of_time(history: list[dict], small_until: int, save_s: float, accelerator=None) -> bool:
    """Whether the next epoch, at the last one's pace (twice it when the next is the first at full size)
    with room to spare, plus a state save, would end after the deadline. Every process takes the main
    process's answer."""
    deadline = float(os.environ.get(runs.DEADLINE_ENV) or "inf")
    last = history[-1]
    pace = last["seconds"] * (2 if last["epoch"] == small_until else 1)
    answer = [time.time() + 1.5 * pace + 2 * save_s + 2 > deadline]
    if accelerator is not None and accelerator.num_processes > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(answer, src=0)
    return answer[0]


def _finish(model: nn.Module, setup: _Setup, ft: Finetune, history: list[dict], best: tuple, main: bool) -> list[dict]:
    if ft.select == "best_valid" and main:
        setup.scored.load_state_dict(best[2], strict=False)  # what training changed; a frozen (4-bit) base stays
    for row in history:
        row["selected"] = row["epoch"] == (best[1] if ft.select == "best_valid" else ft.epochs)
    if setup.state["ema"] is not None:
        model.load_state_dict(setup.state["ema"].module.state_dict())
    return history


def _trainable(model: nn.Module, buffers: bool = False) -> dict[str, torch.Tensor]:
    # Only what training changes: a LoRA model's frozen (maybe 4-bit) base is rebuilt from its checkpoint.
    out = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return out | ({n: b.detach() for n, b in model.named_buffers()} if buffers else {})


def _save(path: Path, state: dict[str, Any], history: list[dict], best: tuple) -> float:
    """The training state after an epoch, written atomically (a kill mid-write leaves the previous one);
    the seconds it took."""
    t0 = time.monotonic()
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"model": _trainable(state["model"]), "history": history, "best": best,
            **{k: v.state_dict() for k, v in state.items() if k != "model" and v is not None}}
    torch.save(blob, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    return time.monotonic() - t0


def _restore(path: Path, state: dict[str, Any], device: torch.device) -> tuple[list[dict], tuple]:
    # Tensors and plain containers only: a planted pickle in a run folder someone handed over cannot run code.
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:  # torch's own message suggests weights_only=False, which would run it
        raise RunError(f"{path} holds more than tensors (a pickle that could run code): vitlab does not load it; "
                       "delete it to start the training over") from None
    missing = set(_trainable(state["model"])) - set(blob["model"])
    if missing:
        raise RuntimeError(f"{path} was written for another model ({sorted(missing)[:3]} missing); delete it to start over")
    state["model"].load_state_dict(blob["model"], strict=False)
    for key, obj in state.items():
        if key != "model" and obj is not None:
            obj.load_state_dict(blob[key])
    return blob["history"], tuple(blob["best"])
