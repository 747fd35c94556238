"""Fine-tuning: which model trains (LoRA and QLoRA through peft, full, a linear probe, QAT: full through
fake-quantized linears (`qat`), or none: the checkpoint as it is), in one process or several
data-parallel ones, and how it is saved (the adapter, the merged 16-bit checkpoint, the metrics). The
loop itself is `training`'s."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn

from . import data, grow, models, parallel, qat, quant, training
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
    if method == "qlora" and ft_cfg["qlora_base"] == "torchao":
        model = quant.torchao_nf4_base(models.build(settings, class_names, dtype=torch.float32, device=device))
    elif method == "qlora":
        # QLoRA's base: NF4 with double quantization, computing in the model's 16-bit dtype.
        q = quant.bnb_config(quant.QuantSettings(bits=4, type="nf4", double_quant=True, compute_dtype=settings.dtype), [])
        model = models.build(settings, class_names, dtype=torch.float32, quantization_config=q, device=device)
        model = prepare_model_for_kbit_training(models.generic_cpu_4bit(model, every_layer=True),
                                                use_gradient_checkpointing=False)
    else:
        model = models.build(settings, class_names, dtype=torch.float32, device=device)  # mimetic's SVDs there
        if settings.grow_from is not None:
            grow.from_checkpoint(model, settings.grow_from, settings.grow_depth, class_names)
        model = model.to(device)
    if method in ("full", "none", "qat"):
        return model.requires_grad_(method != "none")
    if method == "probe":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("classifier.")
        return model
    lora = ft_cfg["lora"]
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=lora_targets(model, lora["target_modules"]),
                        modules_to_save=["classifier"])
    return get_peft_model(model, config)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def fit(model: nn.Module, ds, params: dict[str, Any], device: torch.device, checkpoint: Path | None = None,
        accelerator=None) -> list[dict[str, float]]:
    """`training.train` on a data set's splits as params say: the training batches (and the smaller ones
    of progressive resizing) and the validation batches; with an `accelerator`, this process's share."""
    ft, small = params["finetune"], params["data"]["train_image_size"]
    share = (lambda b: b) if accelerator is None else (lambda b: parallel.shard(b, accelerator))
    return training.train(model, share(ds.batches("train", ft["batch_size"], device)),
                          ds.batches("valid", ft["batch_size"], device), ft, device, num_classes=len(ds.class_names),
                          checkpoint=checkpoint, accelerator=accelerator,
                          small_batches=share(ds.batches("train", ft["batch_size"], device, small)) if small else None)


def run(model: nn.Module, ds, processor, params: dict[str, Any], device: torch.device, out: Path,
        checkpoint: Path | None) -> list[dict[str, float]]:
    """The finetune step: train `model` (in `finetune.processes` processes when more than one) and save it
    into `out` (adapter/, model/). Returns the history."""
    settings, ft = ModelSettings.from_params(params["model"]), params["finetune"]
    if ft["processes"] > 1:  # the main process of the data-parallel ones saves the model
        return train_in_processes(params, model, out, checkpoint, ft["processes"])
    if ft["method"] == "qat":  # input scales from validation images, as the speed path calibrates them
        qat.prepare(model, ft["qat_format"], ds.batches("valid", ft["batch_size"], device))
    history = fit(model, ds, params, device, checkpoint)
    save(qat.strip(model), processor, settings, ds.class_names, ft["method"], out)
    return history


def metrics(method: str, model_sizes: tuple[int, int], class_names: list[str], history: list[dict]) -> dict[str, Any]:
    """The run's `train_metrics` product: what trained, its history, the last epoch, peak VRAM, s/epoch."""
    trainable, total = model_sizes
    return {"method": method, "trainable_params": trainable, "total_params": total, "class_names": class_names,
            "history": history,
            "final": {k: history[-1][k] for k in ("train_loss", "train_acc", "val_loss", "val_acc")} if history else None,
            "peak_vram_mb": max((r["peak_vram_mb"] or 0 for r in history), default=None) or None,
            "s_per_epoch": sum(r["seconds"] for r in history) / len(history) if history else None}


def _worker(params: dict[str, Any], out_dir: str, checkpoint: str | None, history_file: str,
            initial: str | None = None) -> None:
    """One of the data-parallel training processes (parallel.launch starts them)."""
    import transformers

    acc = parallel.accelerator()
    transformers.set_seed(params["seed"])  # the same initial weights in every process
    settings, ft = models.ModelSettings.from_params(params["model"]), params["finetune"]
    processor = models.load_processor(settings)
    ds = data.for_model(params["data"], params["seed"], processor)
    model = build(settings, ft, ds.class_names, acc.device)
    if initial is not None:  # the caller's model: the run starts from the weights its notebook shows
        model.load_state_dict(torch.load(initial, map_location="cpu", weights_only=True))
    history = fit(model, ds, params, acc.device, checkpoint and Path(checkpoint), accelerator=acc)
    if acc.is_main_process:
        save(model, processor, settings, ds.class_names, ft["method"], Path(out_dir))
        Path(history_file).write_text(json.dumps(history))
    acc.wait_for_everyone()
    acc.end_training()


def train_in_processes(params: dict[str, Any], model: nn.Module, out_dir: str | Path, checkpoint: str | Path | None,
                       processes: int) -> list[dict]:
    """Fine-tune `model` (as `build` made it from params) in `processes` data-parallel processes (DDP; one
    per GPU, gloo on a CPU), every one starting from its weights; `finetune.batch_size` stays the global
    batch. The main process writes adapter/ and model/ into out_dir as `save` does. Returns the history."""
    with tempfile.TemporaryDirectory() as tmp:
        history_file, initial = Path(tmp) / "history.json", Path(tmp) / "initial.pt"
        torch.save(model.state_dict(), initial)
        parallel.launch(_worker, processes, params, str(out_dir), checkpoint and str(checkpoint), str(history_file),
                        str(initial))
        return json.loads(history_file.read_text())


def main(argv: list[str] | None = None) -> None:
    """`accelerate launch -m vitlab.finetune PARAMS OUT_DIR [--set K=V ...]`: the fine-tuning of PARAMS on
    every process the launcher started (several nodes: see docs/multi-gpu.md); the main process writes
    OUT_DIR/model (a checkpoint later steps take as model.id) and OUT_DIR/history.json."""
    import argparse

    from . import config
    ap = argparse.ArgumentParser(prog="accelerate launch -m vitlab.finetune", description=main.__doc__)
    ap.add_argument("params")
    ap.add_argument("out_dir")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    params = config.resolve(args.params, args.set)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _worker(params, str(out), str(out / "last.pt"), str(out / "history.json"))


def merged(model: nn.Module, settings: ModelSettings, class_names: list[str], method: str,
           adapter_dir: Path | None) -> nn.Module:
    """A plain ViT with the adapter folded into 16-bit weights (in model.dtype), on the CPU."""
    if method in ("full", "probe", "none", "qat"):
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


if __name__ == "__main__":
    main()
