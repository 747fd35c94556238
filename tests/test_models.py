import pytest
import torch

from vitlab import attention, models
from vitlab.attention import AttentionError
from vitlab.models import ModelError


CPU = torch.device("cpu")


def test_local_checkpoint_loads_as_model_id(checkpoint):
    settings = models.ModelSettings.from_params({"id": checkpoint, "config": {}, "attention": "eager", "dtype": "float32"})
    model = models.build(settings, ["a", "b", "c"])  # a new head for 3 classes on the saved backbone
    assert model.config.num_labels == 3 and model.config.id2label[2] == "c"
    assert model.config._attn_implementation == "eager" and attention.of(model) == "eager"
    assert models.load_processor(settings).size["height"] == 16


def test_settings_resolve_strings_once():
    s = models.ModelSettings.from_params({"id": None, "config": {"hidden_size": 8}, "attention": "sdpa_flash",
                                          "dtype": "bfloat16"})
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
