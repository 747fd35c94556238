"""Shared fixtures: a tiny real ViT, small real images (scikit-learn digits), resolved smoke params."""
from __future__ import annotations

import copy

import pytest
import torch

from vitlab import config, data, models

TINY = {"image_size": 16, "patch_size": 4, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
        "intermediate_size": 64}


@pytest.fixture(scope="session")
def smoke_params() -> dict:
    return config.resolve(config.PARAMS_DIR / "smoke.yaml")


@pytest.fixture
def params(smoke_params) -> dict:
    p = copy.deepcopy(smoke_params)
    p["model"]["config"] = dict(TINY)
    return p


@pytest.fixture(scope="session")
def digits_data(smoke_params) -> data.Data:
    return data.for_model(smoke_params["data"], 0, models.load_processor({"id": None, "config": TINY}))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, digits_data) -> str:
    """A tiny ViT saved with save_pretrained: the local-directory path a user would pass as model.id."""
    torch.manual_seed(0)
    cfg = {"id": None, "config": TINY, "attention": "sdpa", "dtype": "float32"}
    model = models.build(cfg, digits_data.class_names)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-vit"
    model.save_pretrained(str(path))
    models.load_processor(cfg).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def test_batch(digits_data) -> torch.Tensor:
    x, _ = next(iter(digits_data.loader("test", 16)))
    return x
