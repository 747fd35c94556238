"""The speed paths on CPU where they run there; GPU-only paths are skipped with a reason and were
checked on the H100 (figures/h100_speed_paths.md: logits error and top-1 against bf16)."""
import importlib.util

import pytest
import torch

from vitlab import models, speed

CPU = torch.device("cpu")


def test_compiling_the_linears_keeps_outputs_and_leaves_attention_eager(checkpoint, f32, test_batch):
    model = models.load_checkpoint(checkpoint, f32, CPU)
    expected = set(models.attention_linears(model)) | {f"vit.layers.{i}.mlp" for i in range(3)}
    with torch.no_grad():
        ref = model(pixel_values=test_batch).logits
        speed.compiled(model, scope="linears")
        got = model(pixel_values=test_batch).logits
    compiled = {n for n, m in model.named_modules() if type(m).__name__ == "OptimizedModule"}
    assert compiled == expected
    assert all(type(m).__name__ != "OptimizedModule" for n, m in model.named_modules() if n.endswith(".attention"))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_bad_requests_say_what_is_wrong(checkpoint, f32, test_batch):
    model = models.load_checkpoint(checkpoint, f32, CPU)
    with pytest.raises(speed.SpeedPathError, match="choose 'model' or 'linears'"):
        speed.compiled(model, scope="layers")
    with pytest.raises(speed.SpeedPathError, match="need the model and inputs on a CUDA GPU"):
        speed.CudaGraphed(model)(pixel_values=test_batch)
    with pytest.raises(speed.SpeedPathError, match="unknown torchao quantization"):
        speed.torchao_quantize(model, "int3")


@pytest.mark.skipif(importlib.util.find_spec("torchao") is not None, reason="torchao is installed here")
def test_torchao_missing_names_the_install(checkpoint, f32):
    model = models.load_checkpoint(checkpoint, f32, CPU)
    with pytest.raises(speed.SpeedPathError, match="pip install torchao"):
        speed.torchao_quantize(model, "int8dyn")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph replay needs a CUDA GPU")
def test_cuda_graph_replay_matches_eager(checkpoint, f32, test_batch):
    model = models.load_checkpoint(checkpoint, f32, torch.device("cuda"))
    x = test_batch.cuda()
    with torch.no_grad():
        ref = model(pixel_values=x).logits
    torch.testing.assert_close(speed.CudaGraphed(model)(pixel_values=x).logits, ref)


def test_speed_params_apply_in_order_and_validate(checkpoint, f32, test_batch):
    from vitlab import config
    model = models.load_checkpoint(checkpoint, f32, CPU)
    settings = speed.SpeedSettings.from_params({"torchao": "none", "compile": "linears", "cuda_graph": False})
    assert settings.active and settings.describe() == "compile linears"
    sped = speed.apply(model, settings)
    assert speed.unwrapped(sped) is model and speed.storage_bytes(sped) > 0
    assert not speed.SpeedSettings().active
    with pytest.raises(config.ParamsError, match="set quant.bits: 16"):
        config.resolve(config.PARAMS_DIR / "fp8_graph.yaml", ["quant.bits=4"])
