"""Formats per layer (speed.layer_formats), the choice under a latency or accuracy budget (mixed), and
QAT's fake-quantized linears against the real formats' (qat), on a tiny real ViT on the CPU."""
import pytest
import torch
from torch import nn

from vitlab import ablation, config, lowbit, mixed, models, qat, speed
from vitlab.errors import ParamsError
from vitlab.settings import Speed

CPU = torch.device("cpu")
WIDE = {"image_size": 16, "patch_size": 4, "hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
        "intermediate_size": 256}


@pytest.fixture(scope="module")
def wide(tmp_path_factory, digits_data):
    """A 3-layer ViT whose linears take inputs in whole groups of 128 (the int formats need them)."""
    settings = models.ModelSettings(id=None, dtype=torch.bfloat16, attention="sdpa", config=WIDE)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wide") / "vit"
    models.build(settings, digits_data.class_names).save_pretrained(str(path))
    models.load_processor(settings).save_pretrained(str(path))
    return str(path), settings


@pytest.fixture(scope="module")
def batches(digits_data):
    return list(digits_data.loader("valid", 64))[:2]


def test_layer_formats_put_each_layer_in_its_own_format_in_one_model(wide, batches):
    path, settings = wide
    model = models.load_checkpoint(path, settings, CPU)
    sped = speed.apply(model, Speed(fuse_qkv=True, layer_formats=["w2a16", "16bit", "fp8"]), batches)
    blocks = models.encoder_layers(sped).blocks
    assert all(isinstance(m, lowbit.Int4Linear) and m.activations == "bf16" for m in
               (blocks[0].attention.qkv, blocks[0].mlp.fc1))
    assert type(blocks[1].mlp.fc1) is nn.Linear and type(blocks[1].attention.qkv) is nn.Linear
    assert isinstance(blocks[2].mlp.fc2, lowbit.Fp8Linear) and float(blocks[2].mlp.fc2.input_scale) > 0
    assert sped(pixel_values=batches[0][0].to(torch.bfloat16)).logits.isfinite().all()


def test_a_mixed_model_computes_what_its_layers_compute_alone(wide, batches):
    """Each layer of the mixed model is exactly the twin `make_linear` builds for its format, calibrated
    on the same images: the logits are those of a model assembled by hand."""
    path, settings = wide
    x = batches[0][0].to(torch.bfloat16)
    formats = ["w3a16", "fp8", "16bit"]
    sped = speed.apply(models.load_checkpoint(path, settings, CPU), Speed(layer_formats=formats), batches)
    by_hand = models.load_checkpoint(path, settings, CPU)
    names = models.block_linears(by_hand)
    amax = lowbit.input_amax(by_hand, names, batches, Speed().calibration_batches)
    for name in names:
        fmt = formats[int(name.split(".")[2])]  # vit.layers.<i>.attention.q_proj
        if fmt != "16bit":
            by_hand.set_submodule(name, lowbit.make_linear(fmt, by_hand.get_submodule(name), amax[name]))
    with torch.no_grad():
        assert torch.equal(sped(pixel_values=x).logits, by_hand(pixel_values=x).logits)


def test_a_mixed_model_compiled_by_blocks_compiles_once_per_format_and_keeps_its_outputs(wide, batches):
    """speed.compile: blocks on a mix: blocks of one format share one graph, so a study's candidates pay one
    compile per distinct block, not one per candidate (the whole-model compile's ~45 s each on the H200)."""
    from torch._dynamo.utils import counters
    path, settings = wide
    x = batches[0][0].to(torch.bfloat16)
    formats = Speed(layer_formats=["w3a16", "fp8", "w3a16"])
    eager = speed.apply(models.load_checkpoint(path, settings, CPU), formats, batches)
    torch._dynamo.reset()
    counters.clear()
    compiled = speed.apply(models.load_checkpoint(path, settings, CPU), formats.replace(compile="blocks"), batches)
    with torch.no_grad():
        ref, got = eager(pixel_values=x).logits.float(), compiled(pixel_values=x).logits.float()
    assert counters["stats"]["unique_graphs"] == 2  # w3a16 and fp8: the third block reuses the first one's graph
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled, CUDA-graphed mixed model needs a CUDA GPU")
def test_the_compiled_graphed_mixed_model_matches_its_eager_self(wide, batches):
    path, settings = wide
    gpu = torch.device("cuda")
    on_gpu = [(x.to(gpu), y) for x, y in batches]
    formats = Speed(layer_formats=["w4a8", "16bit", "fp8"], fuse_qkv=True, patch_matmul=True, fp8_gemm="triton")
    eager = speed.apply(models.load_checkpoint(path, settings, gpu), formats, on_gpu)
    fast = speed.apply(models.load_checkpoint(path, settings, gpu), formats.replace(compile="model", cuda_graph=True), on_gpu)
    x = on_gpu[0][0].to(torch.bfloat16)
    with torch.no_grad():
        ref, got = eager(pixel_values=x).logits.float(), fast(pixel_values=x).logits.float()
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


def test_fewer_weight_bits_use_fewer_levels_of_the_same_storage():
    torch.manual_seed(0)
    weight = torch.randn(8, 256)
    for bits, levels in ((4, 7), (3, 3), (2, 1)):
        codes, exponent, row_scale = lowbit.int_codes(weight, bits)
        assert codes.abs().max() == levels and set(codes.unique().tolist()) <= set(range(-levels, levels + 1))
        packed, _, _ = lowbit.int4_quantize(weight, bits)
        nibbles = torch.stack([packed & 15, packed >> 4], -1).view(8, 256).float() - 8
        assert torch.equal(nibbles, codes)
    errors = [(lowbit.int4_dequantize(*lowbit.int4_quantize(weight, b)[:2]) * lowbit.int4_quantize(weight, b)[2][:, None]
               - weight).abs().mean() for b in (4, 3, 2)]
    assert errors[0] < errors[1] < errors[2]  # each bit less loses more


@pytest.mark.parametrize("fmt", ["w4a16", "w3a16", "w2a16", "fp8", "w3a8"])
def test_qat_fake_quant_forward_is_the_real_formats_forward(fmt, batches):
    torch.manual_seed(0)
    linear = nn.Linear(256, 64).to(torch.bfloat16)
    x = torch.randn(32, 256, dtype=torch.bfloat16)
    amax = float(x.abs().max())
    real = lowbit.make_linear(fmt, linear, amax)
    fake = qat.FakeQuantLinear(linear, fmt, amax)
    if fmt != "fp8" and fmt.startswith("w"):  # the weights are the same numbers, not just close ones
        packed_weight = lowbit.int4_dequantize(real.packed, real.exponent) * real.weight_scale.t()
        assert torch.equal(qat.fake_weight(linear.weight.float(), fmt), packed_weight)
    with torch.no_grad():
        ref = real(x).float()
        got = fake(x).float()
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()  # bf16 rounding in a different order only


def test_qat_passes_gradients_through_the_rounding():
    torch.manual_seed(0)
    linear = nn.Linear(128, 16)
    fake = qat.FakeQuantLinear(linear, "w2a8", 4.0)
    fake(torch.randn(8, 128)).square().sum().backward()
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
    fake_model = nn.Sequential(fake)
    assert type(qat.strip(fake_model)[0]) is nn.Linear


def test_qat_params_need_the_format_that_evaluate_runs(tmp_path):
    base = ["model.id=x", "finetune.method=qat"]
    with pytest.raises(ParamsError, match="qat_format"):
        config.resolve("params/offline.yaml", base)
    with pytest.raises(ParamsError, match="speed.int4: w3a8"):
        config.resolve("params/offline.yaml", base + ["finetune.qat_format=w3a8"])
    ok = config.resolve("params/offline.yaml", base + ["finetune.qat_format=w3a8", "speed.int4=w3a8", "quant.bits=16"])
    assert ok["finetune"]["qat_format"] == "w3a8"


def test_the_path_changes_the_layer_that_buys_most_per_millisecond_first():
    share = {"16bit": [0, 0, 0], "fp8": [0.1, 0.0, 0.01], "w2a16": [1.0, 0.2, 0.5]}
    share = {k: torch.tensor(v).numpy() for k, v in share.items()}
    steps = mixed.path(share, {"w2a16": 1.0, "fp8": 1.3, "16bit": 3.0})
    assert steps[0] == ["fp8", "w2a16", "w2a16"]  # layer 0 to fp8 removes 0.9 for 0.1 ms
    assert steps[-1] == ["16bit", "16bit", "16bit"] or all(f != "w2a16" for f in steps[-1])
    assert all(sum(a != b for a, b in zip(x, y)) == 1 for x, y in zip(steps, steps[1:]))
    picked = mixed.candidates(steps, ["16bit", "fp8"], 3, points=3)
    assert [c.name for c in picked][:2] == ["uniform_16bit", "uniform_fp8"] and len(picked) <= 2 + 3
    assert picked[2].formats == steps[0]  # the path's fast end is always among them
    assert len(mixed.candidates(steps, ["16bit"], 3, points=0)) == 1


def test_the_choice_is_measured_under_each_budget_and_runs_as_params(wide, batches, tmp_path, digits_data):
    path, settings = wide
    from vitlab import quant

    nf4 = quant.QuantSettings(bits=4, type="nf4", double_quant=True, compute_dtype=torch.bfloat16)
    rows = ablation.sweep(path, settings, nf4, ["fp8", "w2a16"], batches, CPU)
    params = config.resolve("params/offline.yaml", [f"model.id={path}", "finetune.method=none",
                                                    "ablation.quant_types=[fp8,w2a16]", "ablation.formats=[fp8,w2a16]",
                                                    "ablation.latency_batch_size=8", "eval.latency_batch_sizes=[1,8]",
                                                    "eval.warmup=1", "eval.iters=3", "quant.bits=16"])
    got = mixed.study(path, settings, params, rows, batches, batches, CPU)
    names = {r["choice"] for r in got["candidates"]}
    assert {"uniform_16bit", "uniform_fp8", "uniform_w2a16"} <= names
    assert all(r["batch_size"] == 8 and r["p50_ms"] > 0 for r in got["candidates"])
    ref = next(r for r in got["candidates"] if r["choice"] == "uniform_16bit")
    assert ref["top1_delta_pt"] == 0 and ref["kl"] == pytest.approx(0, abs=1e-9)
    choice = got["choice"]  # max_top1_drop_pt null: the fastest mix that loses nothing on this split
    assert choice["budget"] == "top1_budget" and choice["top1"] >= ref["top1"] - 1e-9
    assert choice["p50_ms"] <= min(r["p50_ms"] for r in got["candidates"] if r["top1"] >= ref["top1"] - 1e-9)
    slowest = max(r["p50_ms"] for r in got["candidates"])
    best = mixed.choose(got["candidates"], 8, latency_budget_ms=slowest)
    assert best["top1"] == max(r["top1"] for r in got["candidates"])
    with pytest.raises(ValueError, match="no measured mix fits"):
        mixed.choose(got["candidates"], 8, latency_budget_ms=1e-6)
    tight = mixed.study(path, settings, {**params, "ablation": {**params["ablation"], "latency_budget_ms": 1e-6}},
                        rows, batches, batches, CPU)
    assert tight["choice"] is None and "no measured mix fits" in tight["no_fit"] and tight["candidates"]
    checks = {(r["choice"], r["batch_size"]) for r in got["checks"]}
    assert {("heuristic_first_last", 1), ("top1_budget", 8), ("uniform_w2a16", 1)} <= checks
    written = mixed.write_params(tmp_path, params, choice, path)
    again = config.load_yaml(written)
    assert again["speed"]["layer_formats"] in ([], choice["formats"]) and again["finetune"]["method"] == "none"
    config.validate(again)
    text = mixed.verdict(got)
    assert text.count("\n- ") == len({r["choice"] for r in got["checks"]}) - 1 and "the choice minus it" in text


@pytest.mark.e2e
def test_a_written_mix_and_a_qat_run_go_through_vitlab_run(wide, tmp_path):
    from tests.conftest import vitlab
    from vitlab import runs

    path, _ = wide
    params = config.resolve("params/offline.yaml", [f"model.id={path}", "finetune.method=none", "quant.bits=16",
                                                    "eval.latency_batch_sizes=[2]", "eval.iters=2"])
    written = mixed.write_params(tmp_path, params, {"formats": ["fp8", "16bit", "w2a16"]}, path)
    proc = vitlab("run", str(written), "--steps", "finetune,quantize,evaluate", "--runs-dir", str(tmp_path / "mix"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = runs.list_runs(tmp_path / "mix")
    results = runs.read_json(runs.path(run_dir, "results"))
    assert "formats fp8,16bit,w2a16" in str(results)  # the speed path it ran says so
    proc = vitlab("run", "params/offline.yaml", "--steps", "finetune,quantize,evaluate", "--runs-dir", str(tmp_path / "qat"),
                  "--set", f"model.id={path}", "--set", "finetune.method=qat", "--set", "finetune.qat_format=w2a16",
                  "--set", "speed.int4=w2a16", "--set", "quant.bits=16", "--set", "finetune.epochs=1", "--set", "eval.latency_batch_sizes=[2]",
                  "--set", "eval.iters=2", "--set", "variant=qat")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = runs.list_runs(tmp_path / "qat")
    trained = runs.read_json(runs.path(run_dir, "train_metrics"))
    assert trained["method"] == "qat" and trained["trainable_params"] == trained["total_params"]
    saved = models.load_checkpoint(runs.path(run_dir, "checkpoint"), models.ModelSettings(
        id=None, dtype=torch.bfloat16, attention="sdpa", config=WIDE), CPU)
    assert all(type(saved.get_submodule(n)) is nn.Linear for n in models.block_linears(saved))  # stripped, 16-bit


def test_a_study_stopped_at_the_time_limit_keeps_its_builds_and_resumes_there(wide, batches, tmp_path, monkeypatch):
    from vitlab import quant, runs
    from vitlab.errors import TimeLimitReached

    path, settings = wide
    nf4 = quant.QuantSettings(bits=4, type="nf4", double_quant=True, compute_dtype=torch.bfloat16)
    rows = ablation.sweep(path, settings, nf4, ["w2a16"], batches, CPU)
    params = config.resolve("params/offline.yaml", [f"model.id={path}", "finetune.method=none", "quant.bits=16",
                                                    "ablation.quant_types=[w2a16]", "ablation.formats=[w2a16]",
                                                    "ablation.latency_batch_size=8", "eval.latency_batch_sizes=[8]",
                                                    "eval.warmup=1", "eval.iters=2"])
    keep = tmp_path / "kept"
    monkeypatch.setenv(runs.DEADLINE_ENV, "0")  # long past: only the first build starts
    with pytest.raises(TimeLimitReached, match="1 builds measured and kept"):
        mixed.study(path, settings, params, rows, batches, batches, CPU, keep=keep)
    (first,) = keep.glob("*.npz")
    kept_p50 = float(__import__("numpy").load(first)["p50"][0])
    monkeypatch.delenv(runs.DEADLINE_ENV)
    got = mixed.study(path, settings, params, rows, batches, batches, CPU, keep=keep)
    ref = next(r for r in got["candidates"] if r["choice"] == "uniform_16bit")
    assert ref["p50_ms"] == kept_p50  # read back, not measured again
    assert len(list(keep.glob("*.npz"))) == got["builds"] >= 2
