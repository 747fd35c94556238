"""Growing a trained ViT wider and deeper (vitlab.grow): the width embedding commutes with LayerNorm, the
grown model computes the small one's logits (exactly for `identity`, approximately for `copies`), and a checkpoint
of other classes or a geometry that does not fit is refused before any work."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from vitlab import config, finetune, grow, machine, models
from vitlab.errors import ModelError
from tests.conftest import TINY

LARGE = {**TINY, "hidden_size": 80, "num_attention_heads": 5, "intermediate_size": 128, "num_hidden_layers": 6}


@pytest.mark.parametrize("small,large", [(32, 80), (384, 1024), (24, 48)])
def test_the_width_embedding_commutes_with_layer_norm(small, large):
    Q = grow.embedding(small, large)
    assert Q.shape == (large, small)
    assert torch.allclose(Q.T @ Q, large / small * torch.eye(small, dtype=Q.dtype), atol=1e-10)
    x = torch.randn(7, small, dtype=torch.float64) * 3 + 1.5  # a mean and a scale to remove
    ln = lambda t: nn.functional.layer_norm(t, t.shape[-1:], eps=1e-6)  # noqa: E731
    assert torch.allclose(ln(x @ Q.T), ln(x) @ Q.T, atol=1e-9)


def _trained_looking(settings, class_names) -> nn.Module:
    """The tiny ViT with every LayerNorm scale and shift and every bias moved off its init, as training does."""
    torch.manual_seed(0)
    model = models.build(settings, class_names)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("depth,tolerance", [("identity", 1e-4), ("copies", None)])
def test_the_grown_model_computes_the_small_ones_logits(f32, digits_data, test_batch, depth, tolerance):
    small = _trained_looking(f32, digits_data.class_names).eval()
    large = models.build(models.ModelSettings(None, torch.float32, "sdpa", dict(LARGE), init="mimetic"),
                         digits_data.class_names).eval()
    before = large(pixel_values=test_batch).logits
    grow.grow(small, large, depth)
    with torch.no_grad():
        want, got = small(pixel_values=test_batch).logits, large(pixel_values=test_batch).logits
    assert not torch.allclose(before, got, atol=1e-2)
    error = ((got - want).norm() / want.norm()).item()
    if tolerance is not None:
        assert error < tolerance
    else:  # the same residual ODE in half steps: near on this random tiny model, not equal
        assert 1e-6 < error < 0.1 and (got.argmax(1) == want.argmax(1)).float().mean() > 0.9
    o = [grow._parts(layer)["o"].weight for layer in models.encoder_layers(large)[1]]
    working = [bool(w.abs().sum() > 0) for w in o]
    assert working == ([True] * 6 if depth == "copies" else [True, False] * 3)


def test_growing_without_depth_is_exact_either_way(f32, digits_data, test_batch):
    small = _trained_looking(f32, digits_data.class_names).eval()
    wide = {**LARGE, "num_hidden_layers": TINY["num_hidden_layers"]}
    large = models.build(models.ModelSettings(None, torch.float32, "sdpa", wide), digits_data.class_names).eval()
    grow.grow(small, large, "copies")
    with torch.no_grad():
        want, got = small(pixel_values=test_batch).logits, large(pixel_values=test_batch).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-4


def test_the_model_to_train_grows_from_a_checkpoint_of_the_same_classes_only(checkpoint, digits_data, test_batch,
                                                                            f32, params):
    settings = models.ModelSettings(None, torch.float32, "sdpa", dict(LARGE), grow_from=checkpoint, grow_depth="identity")
    ft = params["finetune"] | {"method": "full"}
    large = finetune.build(settings, ft, digits_data.class_names, torch.device("cpu")).eval()
    small = models.load_checkpoint(checkpoint, f32, torch.device("cpu"))
    with torch.no_grad():
        assert torch.allclose(large(pixel_values=test_batch).logits, small(pixel_values=test_batch).logits, atol=1e-4)
    with pytest.raises(ModelError, match="other classes"):
        finetune.build(settings, ft, list(reversed(digits_data.class_names)), torch.device("cpu"))


def test_a_checkpoint_that_does_not_fit_is_refused_before_any_work(checkpoint, params, tmp_path):
    with pytest.raises(ModelError, match="hidden_size 16 is smaller than its 32"):
        machine.check_growth(checkpoint, {**LARGE, "hidden_size": 16, "num_attention_heads": 1})
    with pytest.raises(ModelError, match="head width"):
        machine.check_growth(checkpoint, {**LARGE, "num_attention_heads": 4})
    p = copy.deepcopy(params)
    p["model"].update(config={**LARGE, "image_size": 32}, grow_from=checkpoint)
    with pytest.raises(ModelError, match="image_size must be the same"):
        machine.check(config.validate(p))


def test_checkpoints_named_from_the_repo_root_are_checked_from_any_folder(checkpoint, monkeypatch, tmp_path):
    from vitlab.settings import REPO_ROOT

    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(checkpoint, REPO_ROOT)
    machine.check_growth(relative, dict(LARGE))  # fits: no error
    with pytest.raises(ModelError, match="does not exist"):
        machine.check_growth("runs/no_such_run/finetune/model", dict(LARGE))
