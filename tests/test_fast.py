"""The speed paths on CPU where they run there; GPU-only paths are skipped with a reason and were
checked on the H100 (figures/h100_speed_paths.md: logits error and top-1 against bf16)."""
import importlib.util

import pytest
import torch

from vitlab import fast, models

CPU = torch.device("cpu")


def test_compiling_the_linears_keeps_outputs_and_leaves_attention_eager(checkpoint, test_batch):
    model = models.load_checkpoint(checkpoint, torch.float32, "sdpa", CPU)
    expected = set(models.attention_linears(model)) | {f"vit.layers.{i}.mlp" for i in range(3)}
    with torch.no_grad():
        ref = model(pixel_values=test_batch).logits
        fast.compiled(model, scope="linears")
        got = model(pixel_values=test_batch).logits
    compiled = {n for n, m in model.named_modules() if type(m).__name__ == "OptimizedModule"}
    assert compiled == expected
    assert all(type(m).__name__ != "OptimizedModule" for n, m in model.named_modules() if n.endswith(".attention"))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_bad_requests_say_what_is_wrong(checkpoint, test_batch):
    model = models.load_checkpoint(checkpoint, torch.float32, "sdpa", CPU)
    with pytest.raises(fast.FastPathError, match="choose 'model' or 'linears'"):
        fast.compiled(model, scope="layers")
    with pytest.raises(fast.FastPathError, match="need the model and inputs on a CUDA GPU"):
        fast.CudaGraphed(model)(pixel_values=test_batch)
    with pytest.raises(fast.FastPathError, match="unknown torchao quantization"):
        fast.torchao_quantize(model, "int3")


@pytest.mark.skipif(importlib.util.find_spec("torchao") is not None, reason="torchao is installed here")
def test_torchao_missing_names_the_install(checkpoint):
    model = models.load_checkpoint(checkpoint, torch.float32, "sdpa", CPU)
    with pytest.raises(fast.FastPathError, match="pip install torchao"):
        fast.torchao_quantize(model, "int8dyn")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph replay needs a CUDA GPU")
def test_cuda_graph_replay_matches_eager(checkpoint, test_batch):
    model = models.load_checkpoint(checkpoint, torch.float32, "sdpa", torch.device("cuda"))
    x = test_batch.cuda()
    with torch.no_grad():
        ref = model(pixel_values=x).logits
    torch.testing.assert_close(fast.CudaGraphed(model)(pixel_values=x).logits, ref)


def test_speed_params_apply_in_order_and_validate(checkpoint, test_batch):
    from vitlab import config
    model = models.load_checkpoint(checkpoint, torch.float32, "sdpa", CPU)
    speed = {"torchao": "none", "compile": "linears", "cuda_graph": False}
    assert fast.is_active(speed) and fast.describe(speed) == "compile linears"
    sped = fast.apply(model, speed)
    assert fast.unwrapped(sped) is model and fast.storage_bytes(sped) > 0
    assert not fast.is_active({"torchao": "none", "compile": "none", "cuda_graph": False})
    with pytest.raises(config.ParamsError, match="set quant.bits: 16"):
        config.resolve(config.PARAMS_DIR / "fp8_graph.yaml", ["quant.bits=4"])
