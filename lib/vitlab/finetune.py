"""Fine-tuning: LoRA and QLoRA (peft) or full, with a cosine schedule, mixed precision and a seed."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn
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
    """The model to train: the plain model (full), a LoRA model, or LoRA on a 4-bit NF4 base (qlora)."""
    method = ft_cfg["method"]
    if method == "qlora":
        # QLoRA's base: NF4 with double quantization, computing in the model's 16-bit dtype.
        q = quant.bnb_config(quant.QuantSettings(bits=4, type="nf4", double_quant=True, compute_dtype=settings.dtype), [])
        model = models.build(settings, class_names, dtype=torch.float32, quantization_config=q, device=device)
        model = prepare_model_for_kbit_training(models.generic_cpu_4bit(model, every_layer=True),
                                                use_gradient_checkpointing=False)
    else:
        model = models.build(settings, class_names, dtype=torch.float32).to(device)
    if method == "full":
        return model
    lora = ft_cfg["lora"]
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=lora_targets(model, lora["target_modules"]),
                        modules_to_save=["classifier"])
    return get_peft_model(model, config)


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


def _epoch(model: nn.Module, batches: Iterable, device: torch.device, amp: torch.dtype | None,
           optimizer: torch.optim.Optimizer | None = None, scheduler=None, scaler: torch.amp.GradScaler | None = None,
           max_grad_norm: float = 1.0, label_smoothing: float = 0.0, mixer=None, ema=None, desc: str = "") -> dict:
    training = optimizer is not None
    model.train(training)
    # Sums stay on the device: a .item() per step would make the GPU wait for Python every batch.
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    for x, y in tqdm(batches, desc=desc, leave=False):
        x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
        target = y
        if training and mixer is not None:
            x, target = mixer(x, y)
        with torch.set_grad_enabled(training), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(pixel_values=x).logits
            loss = nn.functional.cross_entropy(logits.float(), target, label_smoothing=label_smoothing if training else 0.0)
        if training:
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
        loss_sum += loss.detach() * len(y)
        # Under MixUp/CutMix a prediction counts as right when it names the larger part of the mix.
        truth = target.argmax(-1) if target.ndim == 2 else target
        correct += (logits.argmax(-1) == truth).sum()
        seen += len(y)
    return {"loss": loss_sum.item() / seen, "acc": correct.item() / seen, "images": seen}


def train(model: nn.Module, train_batches: Iterable, valid_batches: Iterable, ft_cfg: dict[str, Any],
          device: torch.device, num_classes: int | None = None,
          checkpoint: Path | None = None) -> list[dict[str, float]]:
    """Train for ft_cfg['epochs']; one row per epoch with train/val loss and accuracy and images/s.

    With `ema_decay`, an exponential moving average of the weights is kept and validated (it is
    the model that is kept); with `select: best_valid`, the weights of the epoch with the best
    validation accuracy are restored at the end (the history says which). With `checkpoint` (a file),
    the state after an epoch is written there at most every `checkpoint_minutes` (0: every epoch), and
    a training that finds one continues after its epoch instead of starting over (random draws after
    that point differ from an uninterrupted run)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=ft_cfg["lr"], weight_decay=ft_cfg["weight_decay"])
    total = ft_cfg["epochs"] * len(train_batches)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(ft_cfg["warmup_ratio"] * total), total)
    amp = _autocast_dtype(ft_cfg["mixed_precision"], device)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    mixer = _mixer(ft_cfg, num_classes) if num_classes else None
    ema = (torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ft_cfg["ema_decay"]),
                                               use_buffers=True) if ft_cfg["ema_decay"] else None)
    scored = ema.module if ema is not None else model
    history, best = [], (-1.0, 0, None)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "ema": ema, "scaler": scaler}
    last_save = time.monotonic()
    if checkpoint is not None and Path(checkpoint).is_file():
        history, best = _restore(Path(checkpoint), state, device)
        print(f"resuming after epoch {len(history)} of {ft_cfg['epochs']} from {checkpoint}", flush=True)
    for epoch in tqdm(range(len(history) + 1, ft_cfg["epochs"] + 1), desc="epochs", initial=len(history),
                      total=ft_cfg["epochs"]):
        t0 = time.perf_counter()
        tr = _epoch(model, train_batches, device, amp, optimizer, scheduler, scaler, ft_cfg["max_grad_norm"],
                    ft_cfg["label_smoothing"], mixer, ema, desc=f"train {epoch}")
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            va = _epoch(scored, valid_batches, device, amp, desc=f"valid {epoch}")
        history.append({"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": va["loss"],
                        "val_acc": va["acc"], "lr": scheduler.get_last_lr()[0], "seconds": seconds,
                        "train_img_s": tr["images"] / seconds})
        # One line per epoch: the terminal of `vitlab run` shows it while the step runs.
        print(f"epoch {epoch}/{ft_cfg['epochs']}: train loss {tr['loss']:.3f} acc {tr['acc']:.3f} · valid loss "
              f"{va['loss']:.3f} acc {va['acc']:.3f} · {history[-1]['train_img_s']:.0f} img/s", flush=True)
        if ft_cfg["select"] == "best_valid" and va["acc"] > best[0]:
            best = (va["acc"], epoch, {k: v.detach().clone() for k, v in scored.state_dict().items()})
        if checkpoint is not None and (time.monotonic() - last_save >= 60 * ft_cfg["checkpoint_minutes"]
                                       or epoch == ft_cfg["epochs"]):
            _save(Path(checkpoint), state, history, best)
            last_save = time.monotonic()
    if ft_cfg["select"] == "best_valid":
        scored.load_state_dict(best[2])
    for row in history:
        row["selected"] = row["epoch"] == (best[1] if ft_cfg["select"] == "best_valid" else ft_cfg["epochs"])
    if ema is not None:
        model.load_state_dict(ema.module.state_dict())
    return history


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    # Only what training changes: a LoRA model's frozen (maybe 4-bit) base is rebuilt from its checkpoint.
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


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
    if method == "full":
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
    if method != "full":
        adapter_dir = out_dir / "adapter"
        model.save_pretrained(str(adapter_dir))
    merged_model = merged(model, settings, class_names, method, adapter_dir)
    merged_model.save_pretrained(str(out_dir / "model"), safe_serialization=True)
    processor.save_pretrained(str(out_dir / "model"))
    return merged_model
