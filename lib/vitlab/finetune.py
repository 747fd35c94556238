"""Fine-tuning: LoRA and QLoRA (peft), full, a linear probe, or none (the checkpoint as it is), with a
cosine schedule, mixed precision and a seed."""
from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from . import models, quant
from .models import ModelSettings


def lora_targets(model: nn.Module, which: str | list[str]) -> list[str]:
    """Leaf names of the linear layers LoRA adapts, found in the model (q_proj..fc2 or query..dense):
    `auto` (every block linear), `attention` (q/k/v/o), one leaf name, or a list of them."""
    if which == "auto":
        names = models.block_linears(model)
    elif which == "attention":
        names = models.attention_linears(model)
    else:
        which = [which] if isinstance(which, str) else list(which)
        available = {n.rsplit(".", 1)[-1] for n in models.block_linears(model)}
        unknown = sorted(set(which) - available)
        if unknown:
            raise ValueError(f"finetune.lora.target_modules {unknown} are not linear layers of this model; "
                             f"it has {sorted(available)}")
        return sorted(which)
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def build(settings: ModelSettings, ft_cfg: dict[str, Any], class_names: list[str],
          device: torch.device) -> nn.Module:
    """The model to train: the plain model (full), a LoRA model, LoRA on a 4-bit NF4 base (qlora), the
    model with only its classifier trainable (probe), or the checkpoint unchanged (none)."""
    method = ft_cfg["method"]
    if method == "none":
        labels = models.checkpoint_labels(settings)
        if labels != list(class_names):
            raise ValueError(f"finetune.method none keeps {settings.id} as it is, but its classifier's labels "
                             f"({len(labels or [])}: {(labels or [])[:3]}...) are not the data's ({len(class_names)}: "
                             f"{list(class_names)[:3]}...); fine-tune it (probe, lora, full) or use the data it was trained on")
    if method == "qlora":
        # QLoRA's base: NF4 with double quantization, computing in the model's 16-bit dtype.
        q = quant.bnb_config(quant.QuantSettings(bits=4, type="nf4", double_quant=True, compute_dtype=settings.dtype), [])
        model = models.build(settings, class_names, dtype=torch.float32, quantization_config=q, device=device)
        model = prepare_model_for_kbit_training(models.generic_cpu_4bit(model, every_layer=True),
                                                use_gradient_checkpointing=False)
    else:
        model = models.build(settings, class_names, dtype=torch.float32).to(device)
    if method in ("full", "none"):
        return model.requires_grad_(method == "full")
    if method == "probe":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("classifier.")
        return model
    lora = ft_cfg["lora"]
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=lora_targets(model, lora["target_modules"]),
                        modules_to_save=["classifier"])
    return get_peft_model(model, config)


class Ema:
    """An exponential moving average of a model's weights, updated after every step by one fused lerp.
    (torch's AveragedModel copies its step counter to the GPU on every update, a copy that waits for
    the GPU to finish the step: the CPU could not queue the next one meanwhile.)"""

    def __init__(self, model: nn.Module, decay: float):
        self.module, self.decay = copy.deepcopy(model), decay
        self._pairs = [(e, m) for e, m in zip(self._tensors(self.module), self._tensors(model))]

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        return [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        averaged, current = zip(*self._pairs)
        torch._foreach_lerp_(list(averaged), [c.detach() for c in current], 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


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


def _mixer(ft_cfg: dict[str, Any], num_classes: int):
    """MixUp and/or CutMix (torchvision v2, one of them per batch) turning labels into soft targets, or None."""
    from torchvision.transforms import v2

    mixes = [v2.MixUp(alpha=ft_cfg["mixup_alpha"], num_classes=num_classes)] if ft_cfg["mixup_alpha"] else []
    mixes += [v2.CutMix(alpha=ft_cfg["cutmix_alpha"], num_classes=num_classes)] if ft_cfg["cutmix_alpha"] else []
    return v2.RandomChoice(mixes) if mixes else None


def _logits(model: nn.Module, x: torch.Tensor, other_size: bool) -> torch.Tensor:
    # Batches smaller than the model's image size see its position embeddings interpolated.
    return (model(pixel_values=x, interpolate_pos_encoding=True) if other_size else model(pixel_values=x)).logits


class TrainStep:
    """One optimizer step on a batch: forward, loss, backward, clipping, optimizer, LR schedule, EMA.
    Returns the (detached) loss and logits."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, ft_cfg: dict[str, Any],
                 amp: torch.dtype | None, scaler: torch.amp.GradScaler | None, ema: Ema | None, device: torch.device):
        self.model, self.optimizer, self.scheduler, self.amp, self.scaler, self.ema = model, optimizer, scheduler, amp, scaler, ema
        self.device, self.max_grad_norm, self.label_smoothing = device, ft_cfg["max_grad_norm"], ft_cfg["label_smoothing"]
        self.accumulate = ft_cfg.get("accumulate", 1)
        self.params = [p for p in model.parameters() if p.requires_grad]

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
                    loss = nn.functional.cross_entropy(out.float(), ti, label_smoothing=self.label_smoothing)
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
    for x, y in tqdm(batches, desc=desc, leave=False):
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


def train(model: nn.Module, train_batches: Iterable, valid_batches: Iterable, ft_cfg: dict[str, Any],
          device: torch.device, num_classes: int | None = None, checkpoint: Path | None = None,
          small_batches: Iterable | None = None, accelerator=None) -> list[dict[str, float]]:
    """Train for ft_cfg['epochs']; one row per epoch with train/val loss and accuracy and images/s.

    With `ema_decay`, an exponential moving average of the weights is kept and validated (it is
    the model that is kept); with `select: best_valid`, the weights of the epoch with the best
    validation accuracy are restored at the end (the history says which). Validation runs every
    `valid_every` epochs and after the last (rows of the others have no validation numbers). With `checkpoint` (a file),
    the state after an epoch is written there at most every `checkpoint_minutes` (0: every epoch), and
    a training that finds one continues after its epoch instead of starting over (random draws after
    that point differ from an uninterrupted run). With `small_batches` (training batches at
    data.train_image_size), every epoch but the last `full_size_epochs` trains on them: progressive
    resizing, fewer tokens per image for most of the schedule. `compile` trains through torch.compile;
    `cuda_graph` replays each step as one CUDA graph (CudaGraphStep); `drop_path` is stochastic depth.

    With an `accelerator` (one of several data-parallel processes, see parallel.finetune), the model
    trains wrapped in DDP on this process's share of every batch (`train_batches` already sharded);
    the main process alone validates, selects and keeps the resumable state (the others' weights are
    the same after every step, and only the main process's model is saved)."""
    if ft_cfg["method"] == "none":
        return []
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel does the update of every tensor in a few launches (CUDA only).
    graphed = ft_cfg.get("cuda_graph", False)
    optimizer = torch.optim.AdamW(params, lr=ft_cfg["lr"], weight_decay=ft_cfg["weight_decay"],
                                  fused=device.type == "cuda", capturable=graphed)
    total = ft_cfg["epochs"] * len(train_batches)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(ft_cfg["warmup_ratio"] * total), total)
    amp = _autocast_dtype(ft_cfg["mixed_precision"], device)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    mixer = _mixer(ft_cfg, num_classes) if num_classes else None
    ema = Ema(model, ft_cfg["ema_decay"]) if ft_cfg["ema_decay"] else None
    scored = ema.module if ema is not None else model
    # Validation runs the plain module: one compiled graph per training shape is enough.
    # .get: a run made before these settings existed can still be resumed.
    main = accelerator is None or accelerator.is_main_process
    stepped = accelerator.prepare_model(model) if accelerator is not None else model  # DDP: gradients averaged
    stepped = torch.compile(stepped) if ft_cfg.get("compile") else stepped
    step = (CudaGraphStep if graphed else TrainStep)(stepped, optimizer, scheduler, ft_cfg, amp, scaler, ema, device)
    skips = stochastic_depth(model, ft_cfg.get("drop_path", 0.0))
    small_until = ft_cfg["epochs"] - ft_cfg.get("full_size_epochs", 0) if small_batches is not None else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history, best = [], (-1.0, 0, None)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "ema": ema, "scaler": scaler}
    last_save = time.monotonic()
    if checkpoint is not None and Path(checkpoint).is_file():
        history, best = _restore(Path(checkpoint), state, device)
        print(f"resuming after epoch {len(history)} of {ft_cfg['epochs']} from {checkpoint}", flush=True)
    for epoch in tqdm(range(len(history) + 1, ft_cfg["epochs"] + 1), desc="epochs", initial=len(history),
                      total=ft_cfg["epochs"]):
        small = epoch <= small_until
        batches = small_batches if small else train_batches
        t0 = time.perf_counter()
        tr = _epoch(stepped, batches, device, amp, step, mixer, desc=f"train {epoch}", other_size=small,
                    accelerator=accelerator)
        seconds = time.perf_counter() - t0
        validated = main and (epoch % ft_cfg.get("valid_every", 1) == 0 or epoch == ft_cfg["epochs"])
        va = (_epoch(scored, valid_batches, device, amp, desc=f"valid {epoch}") if validated
              else {"loss": None, "acc": None})
        history.append({"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": va["loss"],
                        "val_acc": va["acc"], "lr": float(scheduler.get_last_lr()[0]), "seconds": seconds,
                        "train_img_s": tr["images"] / seconds,
                        "image_size": getattr(batches, "image_size", None),
                        "peak_vram_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None})
        # One line per epoch: the terminal of `vitlab run` shows it while the step runs.
        valid = f"valid loss {va['loss']:.3f} acc {va['acc']:.3f}" if validated else "not validated"
        if main:
            print(f"epoch {epoch}/{ft_cfg['epochs']}: train loss {tr['loss']:.3f} acc {tr['acc']:.3f} · {valid} · "
                  f"{history[-1]['train_img_s']:.0f} img/s", flush=True)
        if ft_cfg["select"] == "best_valid" and validated and va["acc"] > best[0]:
            best = (va["acc"], epoch, {k: v.clone() for k, v in _trainable(scored, buffers=True).items()})
        if main and checkpoint is not None and (time.monotonic() - last_save >= 60 * ft_cfg["checkpoint_minutes"]
                                                or epoch == ft_cfg["epochs"]):
            _save(Path(checkpoint), state, history, best)
            last_save = time.monotonic()
    for handle in skips:
        handle.remove()
    if ft_cfg["select"] == "best_valid" and main:
        scored.load_state_dict(best[2], strict=False)  # what training changed; a frozen (4-bit) base stays
    for row in history:
        row["selected"] = row["epoch"] == (best[1] if ft_cfg["select"] == "best_valid" else ft_cfg["epochs"])
    if ema is not None:
        model.load_state_dict(ema.module.state_dict())
    return history


def fit(model: nn.Module, ds, params: dict[str, Any], device: torch.device, checkpoint: Path | None = None,
        accelerator=None) -> list[dict[str, float]]:
    """`train` on a data set's splits as params say: the training batches (and the smaller ones of
    progressive resizing) and the validation batches; with an `accelerator`, this process's share."""
    from . import parallel

    ft, small = params["finetune"], params["data"].get("train_image_size")  # absent in runs made before resizing
    share = (lambda b: b) if accelerator is None else (lambda b: parallel.shard(b, accelerator))
    return train(model, share(ds.batches("train", ft["batch_size"], device)), ds.batches("valid", ft["batch_size"], device),
                 ft, device, num_classes=len(ds.class_names), checkpoint=checkpoint,
                 small_batches=share(ds.batches("train", ft["batch_size"], device, small)) if small else None,
                 accelerator=accelerator)


def _trainable(model: nn.Module, buffers: bool = False) -> dict[str, torch.Tensor]:
    # Only what training changes: a LoRA model's frozen (maybe 4-bit) base is rebuilt from its checkpoint.
    out = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return out | ({n: b.detach() for n, b in model.named_buffers()} if buffers else {})


def _save(path: Path, state: dict[str, Any], history: list[dict], best: tuple) -> None:
    """The training state after an epoch, written atomically (a kill mid-write leaves the previous one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"model": _trainable(state["model"]), "history": history, "best": best,
            **{k: v.state_dict() for k, v in state.items() if k != "model" and v is not None}}
    torch.save(blob, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def _restore(path: Path, state: dict[str, Any], device: torch.device) -> tuple[list[dict], tuple]:
    blob = torch.load(path, map_location=device, weights_only=False)
    missing = set(_trainable(state["model"])) - set(blob["model"])
    if missing:
        raise RuntimeError(f"{path} was written for another model ({sorted(missing)[:3]} missing); delete it to start over")
    state["model"].load_state_dict(blob["model"], strict=False)
    for key, obj in state.items():
        if key != "model" and obj is not None:
            obj.load_state_dict(blob[key])
    return blob["history"], tuple(blob["best"])


def merged(model: nn.Module, settings: ModelSettings, class_names: list[str], method: str,
           adapter_dir: Path | None) -> nn.Module:
    """A plain ViT with the adapter folded into 16-bit weights (in model.dtype), on the CPU."""
    if method in ("full", "probe", "none"):
        out = model
    elif method == "lora":
        out = model.merge_and_unload()
    else:
        # A 4-bit base cannot take merged weights: merge the saved adapter into the 16-bit base instead.
        base = models.build(settings, class_names, dtype=torch.float32)
        out = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return out.to("cpu", settings.dtype).eval()


def save(model: nn.Module, processor, settings: ModelSettings, class_names: list[str], method: str,
         out_dir: Path) -> nn.Module:
    """Write adapter/ (LoRA methods) and model/ (merged 16-bit safetensors + processor); return the merged model."""
    adapter_dir = None
    if method in ("lora", "qlora"):
        adapter_dir = out_dir / "adapter"
        model.save_pretrained(str(adapter_dir))
    merged_model = merged(model, settings, class_names, method, adapter_dir)
    merged_model.save_pretrained(str(out_dir / "model"), safe_serialization=True)
    processor.save_pretrained(str(out_dir / "model"))
    return merged_model
