"""The speed paths on CPU where they run there; GPU-only paths are skipped with a reason and were
checked on the H100 (figures/h100_speed_paths.md: logits error and top-1 against bf16)."""
import importlib.util

import pytest
import torch

from vitlab import lowbit, models, speed

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


def test_compiled_blocks_keep_outputs_and_like_blocks_share_one_graph(checkpoint, f32, test_batch):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = models.load_checkpoint(checkpoint, f32, CPU)
    with torch.no_grad():
        ref = model(pixel_values=test_batch).logits
        speed.compiled(model, scope="blocks")
        got = model(pixel_values=test_batch).logits
        again = speed.compiled(models.load_checkpoint(checkpoint, f32, CPU), scope="blocks")(pixel_values=test_batch).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, ref, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1  # three blocks, two models: one graph


def test_bad_requests_say_what_is_wrong(checkpoint, f32, test_batch):
    model = models.load_checkpoint(checkpoint, f32, CPU)
    with pytest.raises(speed.SpeedPathError, match="choose 'model', 'blocks' or 'linears'"):
        speed.compiled(model, scope="layers")
    with pytest.raises(speed.SpeedPathError, match="need the model and inputs on a CUDA GPU"):
        speed.CudaGraphed(model)(pixel_values=test_batch)
    with pytest.raises(speed.SpeedPathError, match="unknown torchao quantization"):
        speed.torchao_quantize(model, "int3")


def test_torchao_missing_names_the_install_before_any_work(checkpoint, f32, smoke_params, monkeypatch):
    """Where torchao is not installed (the dev extra brings it: this machine is made to lack it), the speed
    path and QLoRA's torchao base name the install, the latter before any run folder."""
    from vitlab import config, machine, quant
    from vitlab.errors import ParamsError, QuantError

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else found(name, *a))
    model = models.load_checkpoint(checkpoint, f32, CPU)
    with pytest.raises(speed.SpeedPathError, match="pip install torchao"):
        speed.torchao_quantize(model, "int8dyn")
    with pytest.raises(QuantError, match="pip install torchao"):
        quant.torchao_nf4_base(model)
    params = config.validate(config.resolve(config.PARAMS_DIR / "smoke.yaml", [
        "finetune.method=qlora", "finetune.qlora_base=torchao", f"model.id={checkpoint}", "device=cpu"]))
    with pytest.raises(ParamsError, match="pip install torchao"):
        machine.check(params)


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
    settings = speed.SpeedSettings.from_params({**config.defaults()["speed"], "compile": "linears"})
    assert settings.active and settings.describe() == "compile linears"
    sped = speed.apply(model, settings)
    assert speed.unwrapped(sped) is model and speed.storage_bytes(sped) > 0
    assert not speed.SpeedSettings().active
    with pytest.raises(config.ParamsError, match="set quant.bits: 16"):
        config.resolve(config.PARAMS_DIR / "fp8_graph.yaml", ["quant.bits=4"])


def test_fused_qkv_attention_gives_the_same_logits(checkpoint, f32, test_batch):
    model = models.load_checkpoint(checkpoint, f32, CPU)
    with torch.no_grad():
        ref = model(pixel_values=test_batch).logits
        speed.fuse_qkv(model)
        got = model(pixel_values=test_batch).logits
    assert all(isinstance(layer.attention, speed.FusedQKVAttention) for layer in models.encoder_layers(model)[1])
    assert {n.rsplit(".", 1)[-1] for n in models.attention_linears(model)} == {"qkv", "o_proj"}
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_fp8_linear_matches_its_reference_and_saturates():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).to(torch.bfloat16)
    x = torch.randn(5, 7, 64, dtype=torch.bfloat16)
    layer = lowbit.Fp8Linear(linear, input_amax=float(x.abs().max()))
    # The reference: the same FP8 operands dequantized, multiplied in float32.
    xq = (x.float() / layer.input_scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * layer.input_scale
    wq = layer.weight.float() * layer.weight_scale.t()
    ref = xq @ wq.t() + linear.bias.float()
    if torch.cuda.is_available():  # torch before 2.14 runs row-wise FP8 scales on CUDA only
        layer, linear, x = layer.cuda(), linear.cuda(), x.cuda()
    got = layer(x).cpu()
    assert got.shape == (5, 7, 48) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)
    # FP8 against the 16-bit layer: a few percent, as e4m3's 3 mantissa bits allow.
    exact = linear(x).float().cpu()
    assert (got.float() - exact).norm() / exact.norm() < 0.08
    big = layer(x * 1000)  # far beyond the calibrated range: clamped at +-448, never inf
    assert torch.isfinite(big).all()


def test_static_fp8_calibrates_on_real_images_and_keeps_predictions(checkpoint, bf16, digits_data):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # torch < 2.14: row-wise FP8 on CUDA only
    model = models.load_checkpoint(checkpoint, bf16, device)
    x, _ = next(iter(digits_data.loader("test", 64)))
    x = x.to(device, torch.bfloat16)
    with torch.no_grad():
        ref = model(pixel_values=x).logits.float()
    settings = speed.SpeedSettings(fuse_qkv=True, fp8="static", calibration_batches=2)
    with pytest.raises(speed.SpeedPathError, match="calibrates FP8 activation scales on real images"):
        speed.apply(models.load_checkpoint(checkpoint, bf16, CPU), settings)
    sped = speed.apply(model, settings, digits_data.loader("valid", 32))
    fp8 = [n for n, m in sped.named_modules() if isinstance(m, lowbit.Fp8Linear)]
    assert len(fp8) == len(models.encoder_layers(sped)[1]) * 4  # qkv, o_proj, fc1, fc2 per block
    assert all(float(sped.get_submodule(n).input_scale) > 0 for n in fp8)
    with torch.no_grad():
        got = sped(pixel_values=x).logits.float()
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    assert (got - ref).norm() / ref.norm() < 0.1
    assert settings.describe() == "fused qkv + fp8 static"
    # Sized as it runs (FP8 buffers saved now), not as the 16-bit checkpoint it was loaded from.
    from vitlab import evaluate
    fp8_size = evaluate.sizes(sped, checkpoint)
    bf16_size = evaluate.sizes(models.load_checkpoint(checkpoint, bf16, device), checkpoint)
    assert fp8_size["disk_mb"] < 0.75 * bf16_size["disk_mb"] and fp8_size["footprint_mb"] < 0.75 * bf16_size["footprint_mb"]


def test_fp8_and_fused_qkv_refuse_what_they_cannot_run(checkpoint, f32):
    from vitlab import config, quant
    for change, message in ((["speed.fp8=static", "quant.bits=4"], "set quant.bits: 16"),
                            (["speed.fuse_qkv=true", "quant.bits=8"], "set quant.bits: 16"),
                            (["speed.fp8=static", "quant.bits=16", "speed.torchao=fp8"], "pick one"),
                            (["speed.fp8=fp16"], "speed.fp8")):
        with pytest.raises(config.ParamsError, match=message):
            config.resolve(config.PARAMS_DIR / "smoke.yaml", change)
    q = quant.QuantSettings.from_params(config.defaults()["quant"])
    nf4 = quant.quantize(checkpoint, q.replace(bits=4), f32, CPU)
    with pytest.raises(speed.SpeedPathError, match="plain 16-bit q/k/v"):
        speed.fuse_qkv(nf4)


def test_apply_finds_the_blocks_once_for_every_transform(checkpoint, bf16, digits_data, monkeypatch):
    found = []
    real = models.encoder_layers
    monkeypatch.setattr(models, "encoder_layers", lambda model: found.append(1) or real(model))
    settings = speed.SpeedSettings(fuse_qkv=True, patch_matmul=True, fp8="static", calibration_batches=1,
                                   compile="linears")
    sped = speed.apply(models.load_checkpoint(checkpoint, bf16, CPU), settings, digits_data.loader("valid", 32))
    assert len(found) == 1
    assert sum(isinstance(m, lowbit.Fp8Linear) for m in sped.modules()) == 4 * len(real(sped).blocks)
    assert sum(hasattr(m, "_orig_mod") for m in sped.modules()) == len(real(sped).blocks)  # each MLP; FP8 linears stay eager


def test_a_compiled_model_is_given_one_batch_shape_and_the_short_last_batch_is_cut_back(checkpoint, f32, digits_data):
    from vitlab import infer

    model = models.load_checkpoint(checkpoint, f32, CPU)
    batches = list(digits_data.loader("test", 64))
    assert len(batches[-1][0]) < 64  # the split does not divide into whole batches
    ref, labels = infer.predict(model, batches, CPU, progress=False)
    compiled = torch.compile(model, backend="eager", dynamic=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    got, got_labels = infer.predict(compiled, batches, CPU, progress=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # no second shape compiled
    assert got.shape == ref.shape and (got_labels == labels).all()
    assert (got.argmax(1) == ref.argmax(1)).all()
