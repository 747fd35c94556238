import pytest
import torch

from vitlab import attention, models
from vitlab.attention import AttentionError
from vitlab.models import ModelError


def test_local_checkpoint_loads_as_model_id(checkpoint, digits_data):
    cfg = {"id": checkpoint, "config": {}, "attention": "eager", "dtype": "float32"}
    model = models.build(cfg, ["a", "b", "c"])  # a new head for 3 classes on the saved backbone
    assert model.config.num_labels == 3 and model.config.id2label[2] == "c"
    assert model.config._attn_implementation == "eager"
    assert models.load_processor(cfg).size["height"] == 16


def test_hub_id_offline_names_the_local_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = {"id": "google/vit-base-patch16-224", "config": {}, "attention": "sdpa", "dtype": "float32"}
    with pytest.raises(ModelError, match=r"model.id: /path/to/checkpoint_dir"):
        models.load_processor(cfg)
    with pytest.raises(ModelError, match="network"):
        models.build(cfg, ["a"])


def test_parts_are_found_from_the_model(checkpoint):
    model = models.load_checkpoint(checkpoint, torch.float32, "sdpa", torch.device("cpu"))
    prefix, layers = models.encoder_layers(model)
    assert len(layers) == 3
    linears = models.block_linears(model)
    assert len(linears) == 3 * 6 and all(n.startswith(prefix) for n in linears)
    assert models.layer_index(model, linears[-1]) == 2
    assert {models.component(n) for n in linears} == {"attention", "mlp"}
    assert models.component("vit.embeddings.patch_embeddings.projection") == "patch_embed"
    assert models.component("vit.layernorm") == "norm" and models.component("classifier") == "classifier"


def test_attention_kernels_agree(checkpoint, test_batch):
    outs = {}
    for name in ("eager", "sdpa", "sdpa_flash"):
        model = models.load_checkpoint(checkpoint, torch.float32, name, torch.device("cpu"))
        with torch.no_grad(), attention.kernel(name):
            outs[name] = model(pixel_values=test_batch).logits
    torch.testing.assert_close(outs["sdpa"], outs["eager"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs["sdpa_flash"], outs["eager"], atol=1e-4, rtol=1e-4)


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


def test_parameter_bytes_counts_storage(checkpoint):
    model = models.load_checkpoint(checkpoint, torch.float32, "sdpa", torch.device("cpu"))
    n = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert models.parameter_bytes(model) == 4 * n
    assert models.parameter_bytes(model.to(torch.bfloat16)) == 2 * n
