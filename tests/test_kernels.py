"""vitlab's FP8 GEMM (kernels.fp8_linear), its int4 weights and the fused speed paths, against float32
references on small real shapes. On a CPU the kernel runs in Triton's interpreter (conftest sets
TRITON_INTERPRET=1); on a GPU the same tests run the compiled kernel (checked on the H100)."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from vitlab import config, kernels, lowbit, models, speed

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="vitlab's kernel needs Triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP8 = torch.float8_e4m3fn


def operands(m, n, k, seed):
    """Fresh FP8 rows and a linear's weights in both formats, with the float32 matrices they stand for."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    x_scale = (x.abs().amax() / 448).float()
    linear = torch.nn.Linear(k, n).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        linear.bias.copy_(torch.randn(n, generator=g))
    fp8 = lowbit.Fp8Linear(linear, 1.0)
    packed, exponent, row_scale = lowbit.int4_quantize(linear.weight)
    to = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    return {"xq": to((x / x_scale).to(FP8)), "x_scale": to(x_scale), "bias": to(linear.bias.detach()),
            "fp8": (to(fp8.weight), None, to(fp8.weight_scale), fp8.weight.float() * fp8.weight_scale.t()),
            "int4": (to(packed), to(exponent), to(row_scale[None]), lowbit.int4_dequantize(packed, exponent) * row_scale[:, None])}


def reference(ops, weights, gelu=False):
    y = (ops["xq"].cpu().float() * ops["x_scale"].cpu()) @ ops[weights][3].t() + ops["bias"].cpu().float()
    return F.gelu(y) if gelu else y


@pytest.mark.parametrize("weights", ["fp8", "int4"])
@pytest.mark.parametrize("m", [5, 197])  # rows that fill no tile, and one image's tokens (not a multiple of 64)
def test_kernel_matches_a_float32_reference(weights, m):
    for seed in range(2):  # fresh inputs each time
        ops = operands(m, 96, 256, seed)
        weight, exponent, w_scale, _ = ops[weights]
        got = kernels.fp8_linear(ops["xq"], weight, exponent, ops["x_scale"], w_scale, ops["bias"], None, False, torch.bfloat16)
        ref = reference(ops, weights)
        assert got.shape == (m, 96) and got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        assert (got.cpu().float() - ref).norm() / ref.norm() < 5e-3  # bf16 output rounding
        no_bias = kernels.fp8_linear(ops["xq"], weight, exponent, ops["x_scale"], w_scale, None, None, False, torch.float32)
        torch.testing.assert_close(no_bias.cpu(), ref - ops["bias"].cpu().float(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("weights", ["fp8", "int4"])
@pytest.mark.parametrize("tile", [(64, 32, 128, 4, 2, True, 1), (32, 64, 128, 4, 3, False, 1), (128, 128, 128, 8, 3, True, 1),
                                  (64, 64, 128, 4, 3, False, 2), (32, 32, 128, 4, 3, True, 4)])
def test_tiles_the_persistent_loop_and_split_k_cover_every_output(weights, tile):
    # Shapes with a ragged edge for every tile size, and more tiles than the persistent loop has programs
    # (2 in the interpreter, one per multiprocessor on a GPU), so each program walks several tiles; K of
    # 512 is four int4 exponent groups, so every split starts at its own group.
    m, n = (300, 320) if DEVICE.type == "cpu" else (4100, 1056)
    ops = operands(m, n, 512, 5)
    weight, exponent, w_scale, _ = ops[weights]
    out = kernels.launch(ops["xq"], weight, exponent, ops["x_scale"], w_scale.reshape(-1), ops["bias"], None, False,
                         torch.bfloat16, tile)
    ref = reference(ops, weights)
    splits = tile[-1]
    assert out.shape == ((splits, m, n) if splits > 1 else (m, n))
    out = out.sum(0) + ops["bias"].float() if splits > 1 else out  # partial sums come without the bias
    assert torch.isfinite(out).all()
    assert (out.cpu().float() - ref).norm() / ref.norm() < 5e-3


@pytest.mark.parametrize("weights", ["fp8", "int4"])
def test_a_split_k_configuration_adds_its_partials_and_the_bias_once(weights, monkeypatch):
    ops = operands(197, 96, 512, 7)
    weight, exponent, w_scale, _ = ops[weights]
    monkeypatch.setitem(kernels.TUNED, (True, 96, 512, weights == "int4"), (64, 32, 128, 4, 3, False, 4))
    got = kernels.fp8_linear(ops["xq"], weight, exponent, ops["x_scale"], w_scale, ops["bias"], None, False, torch.bfloat16)
    ref = reference(ops, weights)
    assert got.shape == (197, 96) and got.dtype == torch.bfloat16
    assert (got.cpu().float() - ref).norm() / ref.norm() < 5e-3
    # GELU or an FP8 output needs the whole sum in the epilogue: the same tiles then run unsplit.
    out_scale = torch.tensor(0.05, device=DEVICE)
    fused = kernels.fp8_linear(ops["xq"], weight, exponent, ops["x_scale"], w_scale, ops["bias"], out_scale, True,
                               torch.bfloat16)
    unsplit = kernels.launch(ops["xq"], weight, exponent, ops["x_scale"], w_scale.reshape(-1), ops["bias"], out_scale, True,
                             torch.bfloat16, (64, 32, 128, 4, 3, False, 1))
    assert fused.shape == (197, 96) and fused.dtype == FP8 and torch.equal(fused.view(torch.uint8), unsplit.view(torch.uint8))


def test_the_epilogue_gelu_is_erf_gelu_to_float32_precision():
    # float32 output, no FP8 cast: what is left is the GEMM's own rounding and the GELU's approximation
    # of erf (Abramowitz-Stegun 7.1.26, on a GPU with the special-function unit's reciprocal and exp2).
    ops = operands(197, 128, 256, 11)
    weight, _, w_scale, _ = ops["fp8"]
    got = kernels.fp8_linear(ops["xq"], weight, None, ops["x_scale"], w_scale, ops["bias"], None, True, torch.float32).cpu()
    pre = kernels.fp8_linear(ops["xq"], weight, None, ops["x_scale"], w_scale, ops["bias"], None, False, torch.float32).cpu()
    assert pre.abs().max() > 4 and (pre < -3).any()  # both tails of the GELU are exercised
    torch.testing.assert_close(got, F.gelu(pre.double()).float(), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("weights", ["fp8", "int4"])
def test_gelu_and_fp8_cast_in_the_epilogue(weights):
    ops = operands(70, 128, 256, 3)
    weight, exponent, w_scale, _ = ops[weights]
    out_scale = torch.tensor(0.01, device=DEVICE)
    got = kernels.fp8_linear(ops["xq"], weight, exponent, ops["x_scale"], w_scale, ops["bias"], out_scale, True, torch.bfloat16)
    assert got.dtype == FP8
    want = (reference(ops, weights, gelu=True) / 0.01).clamp(-448, 448).to(FP8).float()
    got = got.cpu().float()
    differ = got != want
    one_step = (got - want).abs() <= torch.maximum(want.abs() / 8, torch.tensor(2.0**-9))  # e4m3's step, or a subnormal's
    if DEVICE.type == "cuda":
        # Hopper's FP8 MMA accumulates with fewer bits than float32 (cuBLAS's "fast accumulation" too), so
        # ~1% of the outputs land one FP8 step (1 in ~2,500 further, H100) from the float32 reference's rounding.
        assert differ.float().mean() < 2e-2 and one_step.float().mean() > 0.999
        assert (got - want).norm() / want.norm() < 0.02
    else:
        # Triton's CPU interpreter casts a value that rounds up into the next power of two one binade low
        # (31.6 -> 16 instead of 32) and truncates subnormals; its GPU cast does neither. Every other
        # element matches, up to the reference's float32 ties.
        carried = (got * 2 == want) & (torch.log2(want.abs()).frac() == 0)
        assert differ.float().mean() < 0.05 and torch.all(one_step | carried)


def test_bad_operands_are_refused_before_launch():
    ops = operands(8, 64, 128, 0)
    weight, exponent, w_scale, _ = ops["int4"]
    with pytest.raises(ValueError, match="row-major 2-D e4m3"):
        kernels.fp8_linear(ops["xq"].float(), weight, exponent, ops["x_scale"], w_scale, None, None, False, torch.bfloat16)
    with pytest.raises(ValueError, match="packed codes"):
        kernels.fp8_linear(ops["xq"], weight, None, ops["x_scale"], w_scale, None, None, False, torch.bfloat16)
    with pytest.raises(ValueError, match="multiples of 128"):
        kernels.fp8_linear(ops["xq"][:, :96], ops["fp8"][0][:, :96], None, ops["x_scale"], w_scale, None, None, False,
                           torch.bfloat16)


def test_int4_codes_are_exact_in_fp8_and_bf16_and_close_to_the_weight():
    torch.manual_seed(0)
    weight = torch.randn(64, 512) * torch.logspace(-3, 0, 512)  # groups whose ranges differ by powers of ten
    packed, exponent, row_scale = lowbit.int4_quantize(weight)
    assert packed.dtype == torch.uint8 and packed.shape == (64, 256) and exponent.shape == (64, 4)
    assert exponent.max() > 0  # small groups took finer steps
    units = lowbit.int4_dequantize(packed, exponent)
    assert torch.equal(units.to(FP8).float(), units) and torch.equal(units.to(torch.bfloat16).float(), units)
    restored = units * row_scale[:, None]
    # Per group, the error is at most half a step, and a step is at most twice the group's ideal max/7.
    groups = (restored - weight).abs().view(64, 4, 128).amax(2)
    assert torch.all(groups <= weight.abs().view(64, 4, 128).amax(2) / 7 + 1e-6)


def test_w4a16_linear_is_the_dequantized_weight_in_bf16():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 48).to(torch.bfloat16)
    layer = lowbit.Int4Linear(linear, "bf16")
    x = torch.randn(3, 7, 256, dtype=torch.bfloat16)
    ref = x.float() @ (lowbit.int4_dequantize(layer.packed, layer.exponent) * layer.weight_scale.t()).t() + linear.bias.float()
    torch.testing.assert_close(layer(x).float(), ref, atol=3e-2, rtol=2e-2)
    assert (layer(x).float() - linear(x).float()).norm() / linear(x).float().norm() < 0.1  # int4 against 16-bit


@pytest.fixture(scope="module")
def wide(tmp_path_factory, digits_data) -> tuple[str, models.ModelSettings]:
    """A ViT whose linears take multiples of 128 inputs, as the kernel and int4's groups need."""
    settings = models.ModelSettings(id=None, dtype=torch.bfloat16, attention="sdpa",
                                    config={"image_size": 16, "patch_size": 4, "hidden_size": 128, "num_hidden_layers": 2,
                                            "num_attention_heads": 2, "intermediate_size": 256})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wide") / "vit"
    models.build(settings, digits_data.class_names).save_pretrained(str(path))
    return str(path), settings


def test_patch_matmul_is_the_convolution(checkpoint, f32, test_batch):
    model = models.load_checkpoint(checkpoint, f32, torch.device("cpu"))
    with torch.no_grad():
        ref = model(pixel_values=test_batch).logits
        speed.patch_matmul(model)
        got = model(pixel_values=test_batch).logits
    assert sum(isinstance(m, speed.PatchMatmul) for m in model.modules()) == 1
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("low_bit", [{"fp8": "static"}, {"int4": "w4a8"}])
@pytest.mark.parametrize("images", [16, 96])  # 272 rows: every linear on vitlab's kernel; 1,632: only fc1
def test_fused_paths_keep_the_predictions_on_real_images(wide, digits_data, low_bit, images):
    """Real digit images through a random-init ViT: vitlab's kernel with GELU and the cast fused into
    fc1 gives cuBLAS's path's logits, and both stay near the 16-bit model's (int4 weights further)."""
    x, _ = next(iter(digits_data.loader("test", images)))
    x = x.to(DEVICE, torch.bfloat16)
    logits = {}
    for gemm in ("cublas", "triton"):
        model = models.load_checkpoint(wide[0], wide[1], DEVICE)
        if gemm == "cublas":
            with torch.no_grad():
                logits["bf16"] = model(pixel_values=x).logits.float()
        settings = speed.SpeedSettings(fuse_qkv=True, patch_matmul=True, fp8_gemm=gemm, calibration_batches=2, **low_bit)
        sped = speed.apply(model, settings, digits_data.loader("valid", 32))
        with torch.no_grad():
            logits[gemm] = sped(pixel_values=x).logits.float()
    assert sum(isinstance(m, lowbit.FusedMLP) for m in sped.modules()) == len(models.encoder_layers(sped)[1])
    error = {k: ((logits[k] - logits["bf16"]).norm() / logits["bf16"].norm()).item() for k in ("cublas", "triton")}
    between = ((logits["triton"] - logits["cublas"]).norm() / logits["cublas"].norm()).item()
    # The same FP8 operands: they differ by float32 sums in another order and GELU on float32 rather than
    # bf16 sums, plus on a CPU the interpreter's casts (test_gelu_and_fp8_cast_in_the_epilogue).
    assert between < (0.03 if DEVICE.type == "cuda" else 0.12)
    assert error["triton"] < error["cublas"] + between and error["cublas"] < (0.1 if "fp8" in low_bit else 0.3)


def test_int4_model_is_sized_as_it_runs(wide):
    from vitlab import evaluate
    sped = speed.apply(models.load_checkpoint(wide[0], wide[1], torch.device("cpu")), speed.SpeedSettings(int4="w4a16"))
    int4 = evaluate.sizes(sped, wide[0])
    full = evaluate.sizes(models.load_checkpoint(wide[0], wide[1], torch.device("cpu")), wide[0])
    linears = sum(m.packed.numel() * 2 for m in sped.modules() if isinstance(m, lowbit.Int4Linear))
    assert linears > 0 and int4["disk_mb"] < full["disk_mb"] - 0.7 * linears * 2 / 2**20  # ~1.5 of 2 bytes per weight saved


def test_new_speed_params_are_checked():
    smoke = config.PARAMS_DIR / "smoke.yaml"
    for change, message in ((["speed.fp8_gemm=triton"], "set speed.fp8: static, speed.int4: w4a8"),
                            (["quant.bits=16", "speed.fp8=static", "speed.int4=w4a8"], "pick one"),
                            (["speed.int4=w4a8", "quant.bits=4"], "set quant.bits: 16"),
                            (["speed.int4=w5a8"], "speed.int4"),
                            (["speed.compile_mode=fast"], "speed.compile_mode")):
        with pytest.raises(config.ParamsError, match=message):
            config.resolve(smoke, change)
    ok = config.resolve(smoke, ["quant.bits=16", "speed.int4=w4a8", "speed.fp8_gemm=triton", "speed.patch_matmul=true"])
    settings = speed.SpeedSettings.from_params(ok["speed"])
    assert settings.calibrates and settings.describe() == "patch matmul + int4 w4a8 + triton gemm"
