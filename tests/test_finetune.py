import copy
import importlib.util
import os
import time

import bitsandbytes as bnb
import pytest
import torch
import transformers
from peft import PeftModel

from torch import nn

from vitlab import data, finetune, models, quant, training
from vitlab.errors import QuantError, RunError

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
    history = training.train(model, batches, batches, p["finetune"], CPU)
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
    history = training.train(model, batches, batches, p["finetune"], CPU)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    merged = finetune.save(model, models.load_processor(settings), settings, digits_data.class_names, "qlora", tmp_path)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    # The merged 16-bit model predicts like the adapter on the 4-bit base, up to NF4 rounding.
    x = batches[0][0]
    model.eval()
    with torch.no_grad():
        a, b = model(pixel_values=x).logits.float(), merged(pixel_values=x).logits.float()
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.8


def test_best_valid_restores_the_selected_epoch_of_a_4bit_model(params, checkpoint, digits_data):
    # Only what training changed is kept and restored: a 4-bit base's quantization state is not.
    transformers.set_seed(0)
    p, settings = _cfg(params, checkpoint, "qlora")
    p["finetune"].update(epochs=3, select="best_valid")
    model = finetune.build(settings, p["finetune"], digits_data.class_names, CPU)
    batches = _few_images(digits_data)
    history = training.train(model, batches, batches, p["finetune"], CPU)
    (x, y), = batches
    model.eval()
    with torch.no_grad():
        acc = (model(pixel_values=x).logits.argmax(1) == y).float().mean().item()
    assert acc == next(r["val_acc"] for r in history if r["selected"])


def test_a_checkpoint_keeps_its_head_only_for_its_own_classes(checkpoint, digits_data):
    settings = models.ModelSettings(checkpoint, torch.float32, "sdpa")
    saved = models.load_checkpoint(checkpoint, settings, CPU).classifier.weight
    same = models.build(settings, digits_data.class_names).classifier.weight
    # As many classes, other names (a transfer to other classes): the head starts fresh.
    other = models.build(settings, [f"other {c}" for c in digits_data.class_names]).classifier.weight
    assert torch.equal(same, saved) and other.shape == saved.shape and not torch.allclose(other, saved)
    fewer = models.build(settings, ["a", "b", "c"]).classifier.weight
    assert fewer.shape == (3, saved.shape[1])


def test_probe_trains_the_head_alone_and_none_trains_nothing(params, checkpoint, digits_data, tmp_path):
    p, settings = _cfg(params, checkpoint, "probe")
    names = [f"new {c}" for c in digits_data.class_names]
    model = finetune.build(settings, p["finetune"], names, CPU)
    trainable = [n for n, q in model.named_parameters() if q.requires_grad]
    assert trainable == ["classifier.weight", "classifier.bias"]
    body = {n: q.detach().clone() for n, q in model.named_parameters() if not q.requires_grad}
    batches = _few_images(digits_data)
    history = training.train(model, batches, batches, p["finetune"], CPU)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(torch.equal(q, body[n]) for n, q in model.named_parameters() if n in body)

    p["finetune"]["method"] = "none"
    kept = finetune.build(settings, p["finetune"], digits_data.class_names, CPU)
    assert training.train(kept, batches, batches, p["finetune"], CPU) == []
    assert finetune.trainable_parameters(kept)[0] == 0
    with pytest.raises(ValueError, match="labels"):
        finetune.build(settings, p["finetune"], names, CPU)


def test_half_the_classes_pretrain_the_other_half_transfer(smoke_params, f32):
    cfg = {**smoke_params["data"], "max_per_class": None}
    halves = {w: data.load_splits({**cfg, "classes": w}, 0, 16) for w in ("all", "half_a", "half_b")}
    a, b, every = halves["half_a"].class_names, halves["half_b"].class_names, halves["all"].class_names
    assert len(a) == len(b) == 5 and not set(a) & set(b) and sorted(a + b) == sorted(every)
    assert data.class_subset(10, "half_a", 0) == data.class_subset(10, "half_a", 0) != data.class_subset(10, "half_a", 1)
    for split in data.SPLITS:
        ds = halves["half_b"][split]
        assert sorted(set(ds.targets)) == list(range(5))
        # Relabelled images are the right ones: the image's original class name is its new class name.
        sources, labels = data.images_and_labels(ds)
        full = halves["all"][split]
        originals = {img.tobytes(): t for img, t in zip(*data.images_and_labels(full))}
        assert all(every[originals[img.tobytes()]] == b[t] for img, t in zip(sources, labels))
        image, label = ds[0]
        assert label == labels[0] and image is sources[0]


@pytest.mark.slow  # Inductor compiles two training graphs on the CPU: about a minute
def test_progressive_resizing_trains_small_then_full_size_through_compile(smoke_params, digits_data, f32):
    torch.manual_seed(0)
    ds = data.for_model({**smoke_params["data"], "pipeline": "gpu"}, 0, models.load_processor(f32))
    ft = {**smoke_params["finetune"], "epochs": 3, "full_size_epochs": 1, "compile": True, "lr": 3e-3,
          "warmup_ratio": 0.0}
    model = finetune.build(f32, ft, ds.class_names, CPU)
    history = training.train(model, ds.batches("train", 32, CPU), ds.batches("valid", 64, CPU), ft, CPU,
                             small_batches=ds.batches("train", 32, CPU, image_size=8))
    assert [r["image_size"] for r in history] == [8, 8, 16]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    x, _ = next(iter(ds.batches("train", 32, CPU, image_size=8)))
    assert x.shape == (32, 3, 8, 8)
    assert len(ds.batches("train", 32, CPU)) == len(ds.splits.train) // 32  # every training step one shape


@pytest.mark.slow  # Inductor compiles one block's forward and backward on the CPU: about half a minute
def test_lora_through_compiled_blocks_trains_the_same_adapters_as_eager(smoke_params, digits_data, f32):
    """finetune.compile: blocks compiles each encoder block in place (what may be captured in a CUDA graph
    on a GPU): the same steps from the same weights give the eager loop's adapters, and the blocks run
    Inductor's code."""
    ft = {**smoke_params["finetune"], "method": "lora", "epochs": 1, "lr": 3e-3, "warmup_ratio": 0.0,
          "lora": {**smoke_params["finetune"]["lora"], "dropout": 0.0}}
    batches = list(digits_data.batches("train", 32, CPU))[:3]
    trained = {}
    for how in (False, "blocks"):
        torch.manual_seed(0)
        model = finetune.build(f32, {**ft, "compile": how}, digits_data.class_names, CPU)
        training.train(model, batches, batches[:1], {**ft, "compile": how}, CPU)
        trained[how] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        blocks = models.encoder_layers(model).blocks
        assert all((b._compiled_call_impl is not None) == (how == "blocks") for b in blocks)
    assert trained[False].keys() == trained["blocks"].keys() and any("lora_A" in n for n in trained[False])
    assert all(float(p.abs().sum()) > 0 for n, p in trained["blocks"].items() if "lora_B" in n)  # B starts at 0: it trained
    for name, eager in trained[False].items():
        torch.testing.assert_close(trained["blocks"][name], eager, rtol=1e-4, atol=1e-5, msg=name)


def test_stochastic_depth_skips_whole_layers_per_sample_only_in_training(checkpoint, f32):
    model = models.load_checkpoint(checkpoint, f32, CPU)  # dropout 0: a layer is a deterministic function
    _, layers = models.encoder_layers(model)
    last = layers[-1]
    h = torch.randn(64, 5, model.config.hidden_size)
    with torch.no_grad():
        plain = last(h)
        handles = training.stochastic_depth(model, 0.5)  # the last layer: p = 0.5
        assert len(handles) == len(layers) - 1  # the first layer is never skipped
        last.train()
        out = last(h)
        skipped = torch.isclose(out, h).flatten(1).all(1)
        kept = torch.isclose(out, h + 2 * (plain - h), atol=1e-5).flatten(1).all(1)
        assert bool((skipped ^ kept).all())  # each sample either skips the layer or takes it, scaled by 1 / (1 - p)
        assert 10 < int(skipped.sum()) < 54  # about half of 64
        last.eval()
        torch.testing.assert_close(last(h), plain)
    for handle in handles:
        handle.remove()
    assert not last._forward_hooks


def test_training_validates_every_n_epochs_and_removes_its_stochastic_depth(params, checkpoint, digits_data):
    p, settings = _cfg(params, checkpoint, "full")
    p["finetune"].update(epochs=5, drop_path=0.2, valid_every=2, select="best_valid")
    model = finetune.build(settings, p["finetune"], digits_data.class_names, CPU)
    batches = _few_images(digits_data)
    history = training.train(model, batches, batches, p["finetune"], CPU)
    assert [r["val_acc"] is not None for r in history] == [False, True, False, True, True]  # and the last
    assert next(r for r in history if r["selected"])["val_acc"] is not None
    assert not any(layer._forward_hooks for layer in models.encoder_layers(model)[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph training step needs a CUDA GPU")
@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("compiled", [False, "blocks"])  # the graph captures Inductor's blocks too
def test_cuda_graph_training_steps_match_eager_ones(params, checkpoint, digits_data, method, compiled):
    cuda = torch.device("cuda")
    p, settings = _cfg(params, checkpoint, method)
    p["finetune"].update(epochs=3, ema_decay=0.9, mixed_precision="no", warmup_ratio=0.3)
    p["finetune"]["lora"]["dropout"] = 0.0
    x, y = next(iter(digits_data.loader("test", 64)))
    batches = [(x[:32], y[:32]), (x[32:], y[32:])] * 3  # 6 steps an epoch: 3 warm-up steps, a capture, replays
    trained = {}
    for graphed in (False, True):
        transformers.set_seed(0)
        model = finetune.build(settings, p["finetune"], digits_data.class_names, cuda)
        history = training.train(model, batches, batches[:1],
                                 p["finetune"] | ({"cuda_graph": True, "compile": compiled} if graphed else {}), cuda)
        trained[graphed] = ({n: t.detach().cpu() for n, t in model.state_dict().items()}, history)
    (eager, h_eager), (graph, h_graph) = trained[False], trained[True]
    for name in eager:
        torch.testing.assert_close(graph[name], eager[name], atol=2e-4, rtol=2e-3, msg=name)
    assert [r["lr"] for r in h_graph] == pytest.approx([r["lr"] for r in h_eager])
    assert [r["train_loss"] for r in h_graph] == pytest.approx([r["train_loss"] for r in h_eager], rel=1e-3)


def test_accumulated_micro_batches_make_the_whole_batch_step(params, checkpoint, digits_data):
    p, settings = _cfg(params, checkpoint, "full")
    p["finetune"].update(epochs=2, lr=1e-3)
    x, y = next(iter(digits_data.loader("test", 30)))
    batches = [(x, y)]  # 30 images: 3 micro-batches of 10
    trained = []
    for accumulate in (1, 3):
        transformers.set_seed(0)
        model = finetune.build(settings, p["finetune"], digits_data.class_names, CPU)
        history = training.train(model, batches, batches, p["finetune"] | {"accumulate": accumulate, "batch_size": 30}, CPU)
        trained.append((history, model.state_dict()))
    (h1, w1), (h3, w3) = trained
    assert [r["train_loss"] for r in h3] == pytest.approx([r["train_loss"] for r in h1], rel=1e-5)
    for name in w1:
        torch.testing.assert_close(w3[name], w1[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_training_out_of_time_keeps_its_state_and_resumes_exactly_there(params, checkpoint, digits_data, tmp_path,
                                                                          monkeypatch):
    from vitlab import runs
    from vitlab.errors import TimeLimitReached

    p, settings = _cfg(params, checkpoint, "full")
    state, batches = tmp_path / "last.pt", _few_images(digits_data)
    monkeypatch.setenv(runs.DEADLINE_ENV, str(time.time()))  # already up: the first epoch is the last that fits
    with pytest.raises(TimeLimitReached, match="after epoch 1 of 4"):
        training.train(finetune.build(settings, p["finetune"], digits_data.class_names, CPU), batches, batches,
                       p["finetune"], CPU, checkpoint=state)
    assert [r["epoch"] for r in torch.load(state, weights_only=True)["history"]] == [1]
    monkeypatch.delenv(runs.DEADLINE_ENV)
    history = training.train(finetune.build(settings, p["finetune"], digits_data.class_names, CPU), batches, batches,
                             p["finetune"], CPU, checkpoint=state)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]


class _Planted:
    """What a run folder from someone else could hold in its training state: a pickle that runs a command."""

    def __init__(self, mark):
        self.mark = mark

    def __reduce__(self):
        return (open, (str(self.mark), "w"))


def test_a_planted_pickle_in_a_kept_training_state_is_refused_not_run(params, checkpoint, digits_data, tmp_path):
    from vitlab.errors import RunError

    p, settings = _cfg(params, checkpoint, "full")
    state, mark = tmp_path / "last.pt", tmp_path / "it-ran"
    torch.save({"model": _Planted(mark), "history": [], "best": (0, 0, None)}, state)
    assert not mark.exists()
    with pytest.raises(RunError, match="holds more than tensors"):
        training.train(finetune.build(settings, p["finetune"], digits_data.class_names, CPU), _few_images(digits_data),
                       _few_images(digits_data), p["finetune"], CPU, checkpoint=state)
    assert not mark.exists()


def test_a_teacher_is_followed_as_far_as_distill_alpha_says(params, checkpoint, digits_data, f32):
    """DeiT's hard distillation: with distill_alpha 1 the student learns the teacher's answers (a random-init
    teacher, so they are not the labels); with 0, the labels."""
    p, settings = _cfg(params, checkpoint, "full")
    x, y = next(iter(digits_data.loader("train", 128)))
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]
    teacher = training.teacher(training.Finetune.of(p["finetune"] | {"teacher": checkpoint}), 10, CPU)
    with torch.no_grad():
        taught = teacher(pixel_values=x).logits.argmax(1)
    assert (taught != y).float().mean() > 0.5  # a teacher that disagrees with the labels
    agree = {}
    for alpha in (0.0, 1.0):
        transformers.set_seed(1)  # not the teacher's initial weights
        model = finetune.build(models.ModelSettings(id=None, dtype=torch.float32, attention="sdpa", config=f32.config),
                               p["finetune"] | {"method": "full"}, digits_data.class_names, CPU)
        training.train(model, batches, batches[:1], p["finetune"] | {"method": "full", "epochs": 8, "lr": 2e-3,
                       "teacher": checkpoint, "distill_alpha": alpha, "warmup_ratio": 0.0}, CPU, num_classes=10)
        with torch.no_grad():
            out = model(pixel_values=x).logits.argmax(1)
        agree[alpha] = ((out == taught).float().mean().item(), (out == y).float().mean().item())
    assert agree[1.0][0] > agree[0.0][0] and agree[1.0][0] > 0.6  # follows the teacher
    assert agree[0.0][1] > agree[1.0][1]  # follows the labels


def test_a_teacher_of_other_classes_is_refused(params, checkpoint):
    p, _ = _cfg(params, checkpoint, "full")
    with pytest.raises(RunError, match="same classes"):
        training.teacher(training.Finetune.of(p["finetune"] | {"teacher": checkpoint}), 7, CPU)


def test_a_teacher_named_relative_to_the_repo_root_is_found_from_any_folder(params, checkpoint, monkeypatch, tmp_path):
    """A notebook runs in notebooks/, the params name runs/... from the repo root (as model.id does)."""
    from vitlab.settings import REPO_ROOT

    p, _ = _cfg(params, checkpoint, "full")
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(checkpoint, REPO_ROOT)
    teacher = training.teacher(training.Finetune.of(p["finetune"] | {"teacher": relative}), 10, CPU)
    assert teacher.config.num_labels == 10


# Wide enough that each block linear holds whole NF4 blocks of 64 x 256 weights (torchao's layout).
WIDE = {"image_size": 16, "patch_size": 4, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 512}
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao is not installed (pip install -e '.[fast]')")


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory, digits_data) -> str:
    """QLoRA starts from a trained model: a WIDE one saved as a user's checkpoint."""
    torch.manual_seed(0)
    wide, path = models.ModelSettings(id=None, dtype=torch.float32, attention="sdpa", config=dict(WIDE)), tmp_path_factory.mktemp("wide")
    models.build(wide, digits_data.class_names).save_pretrained(str(path))
    models.load_processor(wide).save_pretrained(str(path))
    return str(path)


@needs_torchao
def test_torchao_nf4_base_is_bitsandbytes_nf4_in_torch_ops(digits_data):
    """finetune.qlora_base: torchao quantizes the same linears bitsandbytes' QLoRA base does, to the same NF4
    codes (double-quantized scales differ in their last bits), and freezes them; the classifier stays."""
    import bitsandbytes.functional as bnbf
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

    torch.manual_seed(0)
    settings = models.ModelSettings(id=None, dtype=torch.float32, attention="sdpa", config=dict(WIDE))
    model = models.build(settings, digits_data.class_names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    quant.torchao_nf4_base(model)
    linears = models.block_linears(model)
    assert len(linears) == 6 * WIDE["num_hidden_layers"]
    for name in linears:
        weight, w = model.get_submodule(name).weight, before[f"{name}.weight"]
        assert isinstance(weight, NF4Tensor) and not weight.requires_grad
        mine = weight.get_original_weight().float()
        codes, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        theirs = bnbf.dequantize_4bit(codes, state).float()
        absmax = w.abs().view(-1, 64).amax(1, keepdim=True).expand(-1, 64).reshape(w.shape)
        flipped = ((mine - theirs).abs() / absmax > 0.03).float().mean().item()  # a code apart is >= 0.08 absmax
        assert flipped < 1e-3, name
        assert (mine - theirs).abs().mean() < 0.05 * (mine - w).abs().mean(), name
    assert torch.equal(model.classifier.weight, before["classifier.weight"]) and type(model.classifier.weight) is nn.Parameter


@needs_torchao
def test_torchao_nf4_base_refuses_weights_that_are_not_whole_blocks(checkpoint, f32):
    model = models.load_checkpoint(checkpoint, f32, CPU)  # hidden 32: 1,024 weights in q_proj
    with pytest.raises(QuantError, match=r"blocks of 64 x 256 = 16384; .*q_proj has 1,024 weights"):
        quant.torchao_nf4_base(model)


@needs_torchao
@pytest.mark.slow  # Inductor compiles a block's forward and backward with the NF4 dequantization on the CPU
def test_qlora_on_torchao_nf4_trains_and_compiled_blocks_give_the_eager_adapters(smoke_params, digits_data,
                                                                                 wide_checkpoint, tmp_path):
    """QLoRA on torchao's NF4 base: LoRA trains (float32 adapters, the loss falls), finetune.compile: blocks
    gives the eager loop's adapters (what a CUDA graph captures on a GPU), and the saved 16-bit model
    predicts like the adapters on the 4-bit base."""
    settings = models.ModelSettings(id=wide_checkpoint, dtype=torch.float32, attention="sdpa")
    ft = {**smoke_params["finetune"], "method": "qlora", "qlora_base": "torchao", "epochs": 3, "lr": 5e-3,
          "warmup_ratio": 0.0, "lora": {**smoke_params["finetune"]["lora"], "dropout": 0.0}}
    batches = list(digits_data.batches("train", 32, CPU))[:2]
    trained, histories = {}, {}
    for how in (False, "blocks"):
        torch.manual_seed(0)
        model = finetune.build(settings, {**ft, "compile": how}, digits_data.class_names, CPU)
        histories[how] = training.train(model, batches, batches, {**ft, "compile": how}, CPU)
        trained[how] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert histories[False][-1]["train_loss"] < histories[False][0]["train_loss"]
    assert any("lora_B" in n for n in trained[False]) and all(p.dtype == torch.float32 for p in trained[False].values())
    # The same steps up to float32 rounding, which Adam's first steps magnify on the adapters that start at zero.
    assert [r["train_loss"] for r in histories["blocks"]] == pytest.approx([r["train_loss"] for r in histories[False]], rel=1e-4)
    for name, eager in trained[False].items():
        apart = (trained["blocks"][name] - eager).abs()
        assert apart.mean() <= 1e-4 * eager.abs().mean() and apart.max() <= 1e-2 * eager.abs().max(), name
    torch.manual_seed(0)
    model = finetune.build(settings, ft, digits_data.class_names, CPU)
    training.train(model, batches, batches, ft, CPU)
    merged = finetune.save(model, models.load_processor(settings), settings, digits_data.class_names, "qlora",
                           tmp_path / "out")
    x = batches[0][0]
    model.eval()
    with torch.no_grad():
        a, b = model(pixel_values=x).logits, merged(pixel_values=x).logits
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.8


@needs_torchao
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph training step needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, "blocks"])
def test_qlora_on_torchao_nf4_in_a_cuda_graph_matches_eager(smoke_params, digits_data, wide_checkpoint, compiled):
    """What bitsandbytes' base cannot do: QLoRA's training step on torchao's NF4 replayed as a CUDA graph
    (with its blocks compiled or not) trains the eager step's adapters."""
    cuda = torch.device("cuda")
    settings = models.ModelSettings(id=wide_checkpoint, dtype=torch.float32, attention="sdpa")
    ft = {**smoke_params["finetune"], "method": "qlora", "qlora_base": "torchao", "epochs": 3, "lr": 5e-3,
          "warmup_ratio": 0.3, "mixed_precision": "no", "lora": {**smoke_params["finetune"]["lora"], "dropout": 0.0}}
    x, y = next(iter(digits_data.loader("test", 64)))
    batches = [(x[:32], y[:32]), (x[32:], y[32:])] * 3  # 6 steps an epoch: 3 warm-up steps, a capture, replays
    trained = {}
    for graphed in (False, True):
        transformers.set_seed(0)
        model = finetune.build(settings, ft, digits_data.class_names, cuda)
        history = training.train(model, batches, batches[:1], ft | ({"cuda_graph": True, "compile": compiled} if graphed else {}), cuda)
        trained[graphed] = ({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}, history)
    (eager, h_eager), (graph, h_graph) = trained[False], trained[True]
    for name in eager:
        torch.testing.assert_close(graph[name], eager[name], atol=2e-4, rtol=2e-3, msg=name)
    assert [r["train_loss"] for r in h_graph] == pytest.approx([r["train_loss"] for r in h_eager], rel=1e-3)
