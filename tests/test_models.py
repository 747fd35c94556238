import re
import shutil

import pytest
import torch

from transformers import ViTForImageClassification

from vitlab import attention, config, models
from vitlab.attention import AttentionError
from vitlab.models import ModelError


CPU = torch.device("cpu")
MODEL = config.defaults()["model"]


def test_local_checkpoint_loads_as_model_id(checkpoint):
    settings = models.ModelSettings.from_params({**MODEL, "id": checkpoint, "config": {}, "attention": "eager", "dtype": "float32"})
    model = models.build(settings, ["a", "b", "c"])  # a new head for 3 classes on the saved backbone
    assert model.config.num_labels == 3 and model.config.id2label[2] == "c"
    assert model.config._attn_implementation == "eager" and attention.of(model) == "eager"
    assert models.load_processor(settings).size["height"] == 16


def test_settings_resolve_strings_once():
    s = models.ModelSettings.from_params({**MODEL, "id": None, "config": {"hidden_size": 8},
                                          "attention": "sdpa_flash", "dtype": "bfloat16"})
    assert s.dtype is torch.bfloat16 and s.dtype_name == "bfloat16" and s.attention == "sdpa_flash"
    with pytest.raises(AttentionError, match="unknown attention 'flash'"):
        models.ModelSettings.from_params({"id": None, "config": {}, "attention": "flash", "dtype": "float32"})


def test_hub_id_offline_names_the_local_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = models.ModelSettings(id="google/vit-base-patch16-224", dtype=torch.float32, attention="sdpa")
    with pytest.raises(ModelError, match=r"model.id: /path/to/checkpoint_dir"):
        models.load_processor(settings)
    with pytest.raises(ModelError, match="network"):
        models.build(settings, ["a"])


def test_parts_are_found_from_the_model(checkpoint, f32):
    model = models.load_checkpoint(checkpoint, f32, CPU)
    prefix, layers = models.encoder_layers(model)
    assert len(layers) == 3
    linears = models.block_linears(model)
    assert len(linears) == 3 * 6 and all(n.startswith(prefix) for n in linears)
    assert models.layer_index(model, linears[-1]) == 2
    assert {models.component(n) for n in linears} == {"attention", "mlp"}
    assert models.component("vit.embeddings.patch_embeddings.projection") == "patch_embed"
    assert models.component("vit.layernorm") == "norm" and models.component("classifier") == "classifier"


def test_attention_kernels_agree(checkpoint, test_batch, f32):
    outs = {}
    for name in ("eager", "sdpa", "sdpa_flash"):
        model = models.load_checkpoint(checkpoint, models.ModelSettings(None, torch.float32, name), CPU)
        assert attention.of(model) == name
        with torch.no_grad():
            outs[name] = model(pixel_values=test_batch).logits
    torch.testing.assert_close(outs["sdpa"], outs["eager"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs["sdpa_flash"], outs["eager"], atol=1e-4, rtol=1e-4)


def test_a_forced_backend_is_entered_by_the_models_own_forward(checkpoint, test_batch, monkeypatch):
    """sdpa_flash is the model's: its forward runs inside sdpa_kernel([FLASH]) without the caller asking."""
    import torch.nn.functional as F

    model = models.load_checkpoint(checkpoint, models.ModelSettings(None, torch.float32, "sdpa_flash"), CPU)
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        from torch.nn.attention import _cur_sdpa_kernel_backends
        seen.append(list(_cur_sdpa_kernel_backends()))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(pixel_values=test_batch)
    assert seen and all(b == [torch.nn.attention.SDPBackend.FLASH_ATTENTION] for b in seen)
    attention.apply(model, "sdpa")  # applying again replaces the choice instead of nesting
    seen.clear()
    with torch.no_grad():
        model(pixel_values=test_batch)
    assert seen and all(len(b) > 1 for b in seen) and attention.of(model) == "sdpa"


@pytest.mark.parametrize("name, message", [
    ("sdpa_cudnn", "needs a CUDA GPU"), ("sdpa_efficient", "needs a CUDA GPU"), ("flash_attention_2", "needs a CUDA GPU"),
    ("flash", "unknown attention"),
])
def test_unsupported_kernels_fail_with_the_fix(name, message):
    with pytest.raises(AttentionError, match=message):
        attention.check_supported(name, torch.device("cpu"), torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn checks need a CUDA device")
def test_flash_attention_2_without_package_names_the_install():
    import importlib.util
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(AttentionError, match="pip install flash-attn"):
        attention.check_supported("flash_attention_2", torch.device("cuda"), torch.bfloat16)


def test_parameter_bytes_counts_storage(checkpoint, f32):
    model = models.load_checkpoint(checkpoint, f32, CPU)
    n = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert models.parameter_bytes(model) == 4 * n
    assert models.parameter_bytes(model.to(torch.bfloat16)) == 2 * n


def test_mimetic_and_sincos_init_give_heads_and_positions_their_structure(tmp_path):
    cfg = {"image_size": 32, "patch_size": 4, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 128}
    plain = models.ModelSettings(id=None, dtype=torch.float32, attention="sdpa", config=cfg)
    settings = models.ModelSettings(id=None, dtype=torch.float32, attention="sdpa", config=cfg, init="mimetic_sincos")
    names = [str(i) for i in range(3)]
    torch.manual_seed(0)
    default, model = models.build(plain, names), models.build(settings, names)
    k = 64 // 4
    for before, after in zip(models.encoder_layers(default)[1], models.encoder_layers(model)[1]):
        for layer, mimetic in ((before, False), (after, True)):
            q, key, v, o = models._attention_projections(layer)
            for h in range(4):
                rows = slice(h * k, (h + 1) * k)
                qk = (q.weight[rows].T @ key.weight[rows]).trace()  # x_i^T W x_j: similar tokens attend
                vo = (o.weight[:, rows] @ v.weight[rows]).trace()
                assert (qk > 5 and vo < -2) if mimetic else (abs(qk) < 1 and abs(vo) < 1)
    table = model.vit.embeddings.position_embeddings[0, 1:]  # 8 x 8 patches
    near = torch.cosine_similarity(table[0], table[1], dim=0)
    far = torch.cosine_similarity(table[0], table[63], dim=0)
    assert near > 0.8 > far
    model.save_pretrained(tmp_path)  # still a plain ViT: it reloads as one, with the same outputs
    x = torch.randn(2, 3, 32, 32)
    reloaded = ViTForImageClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(pixel_values=x).logits, model.eval()(pixel_values=x).logits)


def test_init_is_for_models_built_from_a_config():
    with pytest.raises(config.ParamsError, match="model.init 'mimetic' starts a model built from model.config"):
        config.resolve(config.PARAMS_DIR / "smoke.yaml", ["model.init=mimetic", "model.id=google/vit-base-patch16-224"])


@pytest.mark.parametrize("spoil, message", [
    (lambda p: shutil.rmtree(p), "does not exist (a step that made it did not finish"),
    (lambda p: (p / "config.json").unlink(), "has no config.json"),
    (lambda p: (p / "model.safetensors").rename(p / "pytorch_model.bin"), "pickled pytorch_model.bin"),
    (lambda p: (p / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"), "model.safetensors cannot be read"),
])
def test_a_broken_checkpoint_folder_is_named_with_the_fix(checkpoint, f32, tmp_path, spoil, message):
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    spoil(copy)
    with pytest.raises(models.ModelError, match=re.escape(message)):
        models.load_checkpoint(copy, f32, CPU)
