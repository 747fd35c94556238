import copy

import bitsandbytes as bnb
import pytest
import torch
import transformers
from peft import PeftModel

from vitlab import finetune, models

CPU = torch.device("cpu")


def _cfg(params, checkpoint, method):
    p = copy.deepcopy(params)
    p["model"].update(id=checkpoint, dtype="float32")
    p["finetune"].update(method=method, epochs=4, lr=5e-3, warmup_ratio=0.0, batch_size=16)
    p["finetune"]["lora"]["target_modules"] = "auto"
    return p, models.ModelSettings.from_params(p["model"])


def _few_images(digits_data, n=32):
    x, y = next(iter(digits_data.loader("test", n)))
    return [(x, y)]


def test_lora_targets_come_from_the_model(checkpoint, f32):
    model = models.load_checkpoint(checkpoint, f32, CPU)
    assert finetune.lora_targets(model, "auto") == ["fc1", "fc2", "k_proj", "o_proj", "q_proj", "v_proj"]
    assert finetune.lora_targets(model, "attention") == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert finetune.lora_targets(model, ["v_proj", "q_proj"]) == ["q_proj", "v_proj"]
    assert finetune.lora_targets(model, "fc1") == ["fc1"]  # one name, not its characters
    with pytest.raises(ValueError, match="query"):
        finetune.lora_targets(model, ["query", "value"])


def test_lora_lowers_the_loss_and_merges_exactly(params, checkpoint, digits_data, tmp_path):
    transformers.set_seed(0)
    p, settings = _cfg(params, checkpoint, "lora")
    model = finetune.build(settings, p["finetune"], digits_data.class_names, CPU)
    trainable, total = finetune.trainable_parameters(model)
    assert 0 < trainable < total
    batches = _few_images(digits_data)
    history = finetune.train(model, batches, batches, p["finetune"], CPU)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]

    x = batches[0][0]
    model.eval()
    with torch.no_grad():
        adapter_out = model(pixel_values=x).logits
    merged = finetune.save(model, models.load_processor(settings), settings, digits_data.class_names, "lora", tmp_path)
    assert not isinstance(merged, PeftModel)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert (tmp_path / "model" / "preprocessor_config.json").is_file()
    reloaded = models.load_checkpoint(tmp_path / "model", settings, CPU)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, adapter_out, atol=1e-4, rtol=1e-4)


def test_qlora_trains_adapters_on_a_4bit_base(params, checkpoint, digits_data, tmp_path):
    transformers.set_seed(0)
    p, settings = _cfg(params, checkpoint, "qlora")
    p["finetune"]["epochs"] = 3
    model = finetune.build(settings, p["finetune"], digits_data.class_names, CPU)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    batches = _few_images(digits_data)
    history = finetune.train(model, batches, batches, p["finetune"], CPU)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    merged = finetune.save(model, models.load_processor(settings), settings, digits_data.class_names, "qlora", tmp_path)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    # The merged 16-bit model predicts like the adapter on the 4-bit base, up to NF4 rounding.
    x = batches[0][0]
    model.eval()
    with torch.no_grad():
        a, b = model(pixel_values=x).logits.float(), merged(pixel_values=x).logits.float()
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.8
