"""Shared fixtures: a tiny real ViT, small real images (scikit-learn digits), resolved smoke params,
typed model and quantization settings, an ImageFolder tree, and the smoke run made by the real runner."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # vitlab's Triton kernel runs in Triton's CPU interpreter; set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vitlab import config, data, models, quant, runs  # noqa: E402

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
def f32() -> models.ModelSettings:
    """float32 weights, transformers' SDPA attention: the tiny checkpoint as saved."""
    return models.ModelSettings(id=None, dtype=torch.float32, attention="sdpa", config=dict(TINY))


@pytest.fixture(scope="session")
def bf16(f32) -> models.ModelSettings:
    return models.ModelSettings(id=None, dtype=torch.bfloat16, attention="sdpa", config=dict(TINY))


@pytest.fixture(scope="session")
def nf4() -> quant.QuantSettings:
    """NF4 with double quantization computing in bfloat16, nothing kept in 16-bit: params/defaults.yaml's quant."""
    return quant.QuantSettings.from_params(config.defaults()["quant"])


@pytest.fixture(scope="session")
def digits_data(smoke_params, f32) -> data.Data:
    return data.for_model(smoke_params["data"], 0, models.load_processor(f32))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, digits_data, f32) -> str:
    """A tiny ViT saved with save_pretrained: the local-directory path a user would pass as model.id."""
    torch.manual_seed(0)
    model = models.build(f32, digits_data.class_names)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-vit"
    model.save_pretrained(str(path))
    models.load_processor(f32).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def test_batch(digits_data) -> torch.Tensor:
    x, _ = next(iter(digits_data.loader("test", 16)))
    return x


@pytest.fixture(scope="session")
def folder(tmp_path_factory, digits_data) -> Path:
    """A real ImageFolder tree (root/{train,valid,test}/<class>/*.png) written from digit images."""
    root = tmp_path_factory.mktemp("folder")
    for split in data.SPLITS:
        ds = digits_data.splits[split]
        for i in range(len(ds)):
            image, label = ds[i]
            path = root / split / f"c{label}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
    (root / "cat_to_name.json").write_text(json.dumps({f"c{k}": f"digit {k}" for k in range(10)}))
    return root


def vitlab(*args: str) -> subprocess.CompletedProcess:
    """`python -m vitlab ...` from the repository root, as a user types it."""
    return subprocess.run([sys.executable, "-m", "vitlab", *args], cwd=config.REPO_ROOT, capture_output=True,
                          text=True, timeout=1200)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """Every step of params/smoke.yaml, run by the real runner into a runs folder of its own."""
    runs_dir = tmp_path_factory.mktemp("runs")
    proc = vitlab("run", "params/smoke.yaml", "--runs-dir", str(runs_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (runs_dir / "terminal.txt").write_text(proc.stdout + proc.stderr)  # what the user saw, for the tests
    (run_dir,) = runs.list_runs(runs_dir)
    return run_dir


# Tests that run the real runner (notebooks through papermill), `python -m vitlab` subprocesses, several
# processes, or a browser: the whole-suite tier. `make test-fast` (pytest -m "not e2e") leaves them out.
E2E_FIXTURES = {"smoke_run", "page"}
E2E_MODULES = {"test_parallel", "test_demo_browser"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if E2E_FIXTURES & set(item.fixturenames) or item.module.__name__.rsplit(".", 1)[-1] in E2E_MODULES:
            item.add_marker(pytest.mark.e2e)
