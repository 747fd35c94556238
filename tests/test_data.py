import numpy as np
import pytest
import torch

from vitlab import config, data, images
from vitlab.data import DataError

CFG = {**config.defaults()["data"], "source": "imagefolder", "root": None, "hflip": False, "num_workers": 0}


def test_digits_splits_are_stratified_and_seeded(smoke_params):
    cfg = {**smoke_params["data"], "max_per_class": None}
    a, b = data.load_splits(cfg, 0, 16), data.load_splits(cfg, 0, 16)
    assert (len(a.train), len(a.valid), len(a.test)) == (1257, 270, 270)
    assert a.class_names == [str(i) for i in range(10)]
    assert a.test.targets == b.test.targets
    assert np.bincount(a.test.targets).min() >= 25  # every digit is in the test split
    image, label = a.test[0]
    assert image.size == (16, 16) and image.mode == "RGB" and 0 <= label < 10


def test_max_per_class_subsamples(smoke_params):
    s = data.load_splits({**smoke_params["data"], "max_per_class": 3}, 0, 16)
    assert len(s.train) == 30 and np.bincount(s.train.targets).tolist() == [3] * 10


def test_imagefolder_reads_classes_and_names(folder):
    s = data.load_splits({**CFG, "root": str(folder)}, 0, 16)
    assert len(s.train) == 200
    assert s.class_names[0] == "digit 0" and len(s.class_names) == 10
    image, label = s.valid[0]
    assert image.mode == "RGB" and s.valid.targets[0] == label


def test_transforms_give_model_sized_normalised_tensors(digits_data):
    x, y = next(iter(digits_data.loader("train", 8)))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and y.shape == (8,)
    x, _ = next(iter(digits_data.loader("test", 8)))
    assert x.shape == (8, 3, 16, 16) and -1.0 - 1e-6 <= x.min() and x.max() <= 1.0 + 1e-6  # mean/std 0.5


def test_missing_imagefolder_says_what_layout_is_expected(tmp_path):
    with pytest.raises(DataError, match="train/<class>"):
        data.load_splits({**CFG, "root": str(tmp_path)}, 0, 16)


def test_corrupt_image_names_the_file(folder, tmp_path):
    import shutil
    root = tmp_path / "broken"
    shutil.copytree(folder, root)
    bad = root / "test" / "c1" / "corrupt.png"
    bad.write_bytes(b"not an image at all")
    ds = data.load_splits({**CFG, "root": str(root)}, 0, 16).test
    idx = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("corrupt.png")][0]
    with pytest.raises(DataError, match="corrupt.png"):
        ds[idx]


def test_flowers102_offline_fails_with_the_local_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "*")
    with pytest.raises(DataError, match="data.source: imagefolder"):
        data.load_splits({**CFG, "source": "flowers102", "root": str(tmp_path)}, 0, 16)


def test_open_image_rejects_non_images():
    with pytest.raises(DataError, match="uploaded bytes"):
        images.open_image(b"%PDF-1.4 not an image")
