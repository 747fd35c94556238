"""Oxford Flowers-102, the real photographs in ../shared/data/flowers102: both sources, the layout helper,
and the GPU data path (run on the CPU here) on a few classes x a few images at low resolution.
A fresh clone has no ../shared: then every test here is skipped, saying so."""
import copy
import shutil

import pytest
import torch

from vitlab import config, data, finetune, gpu_data, models, training

FLOWERS = config.REPO_ROOT.parent / "shared" / "data" / "flowers102"
pytestmark = pytest.mark.skipif(not (FLOWERS / "train").is_dir(),
                                reason=f"no Flowers-102 copy at {FLOWERS} (a user's fresh clone has none)")
CFG = {**config.defaults()["data"], "source": "imagefolder", "root": str(FLOWERS), "max_per_class": 2, "num_workers": 0}
CPU = torch.device("cpu")
pytestmark = [pytestmark, pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")]


@pytest.fixture(scope="module")
def mini_copy(tmp_path_factory):
    """Three classes x two images per split of the shared copy, with the official split files."""
    root = tmp_path_factory.mktemp("flowers_mini")
    for split in data.SPLITS:
        for cls in ("1", "2", "3"):
            (root / split / cls).mkdir(parents=True)
            for image in sorted((FLOWERS / split / cls).glob("*.jpg"))[:2]:
                shutil.copy(image, root / split / cls / image.name)
    shutil.copytree(FLOWERS / "official_split", root / "official_split")
    shutil.copy(FLOWERS / "cat_to_name.json", root / "cat_to_name.json")
    return root


def test_the_shared_copy_as_an_imagefolder_has_flower_names():
    s = data.load_splits(CFG, 0, 32)
    expected = [sum(min(2, len(list(c.iterdir()))) for c in (FLOWERS / split).iterdir()) for split in data.SPLITS]
    assert [len(s.train), len(s.valid), len(s.test)] == expected and expected[0] == 204  # at most 2 per class
    assert len(s.class_names) == 102 and "pink primrose" in s.class_names and "1" not in s.class_names
    image, label = s.test[0]
    assert image.mode == "RGB" and min(image.size) == 256


def test_layout_helper_makes_torchvisions_flowers102_load_offline(mini_copy, tmp_path):
    target = data.flowers102_layout(mini_copy, tmp_path / "tv")
    jpgs = sorted((target / "flowers-102" / "jpg").iterdir())
    assert len(jpgs) == 18 and all(p.is_symlink() for p in jpgs)
    s = data.load_splits({**CFG, "source": "flowers102", "root": str(target), "max_per_class": None}, 0, 32)
    assert (len(s.train), len(s.valid), len(s.test)) == (1020, 1020, 6149)  # the official split files
    assert s.class_names[0] == "pink primrose" and len(s.class_names) == 102
    present = [i for i, p in enumerate(s.test._image_files) if p.exists()]
    image, label = s.test[present[0]]
    assert image.mode == "RGB" and label == s.test._labels[present[0]]
    with pytest.raises(data.DataError, match="seeds' layout"):
        data.flowers102_layout(tmp_path, tmp_path / "again")


@pytest.fixture(scope="module")
def flowers():
    processor = models.load_processor(models.ModelSettings(None, torch.float32, "sdpa", {"image_size": 32}))
    return data.for_model({**CFG, "pipeline": "gpu", "trivial_augment": True, "random_erasing": 0.5}, 0, processor)


def test_gpu_pipeline_decodes_once_and_matches_the_eval_transform(flowers):
    valid = flowers.batches("valid", 64, CPU)
    x, y = next(iter(valid))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.tolist() == flowers.splits.valid.targets[:64]
    assert flowers.batches("valid", 64, CPU).images is valid.images  # decoded once per split
    reference = torch.stack([flowers.eval_transform(flowers.splits.valid[i][0]) for i in range(64)])
    # The same geometry as the PIL path; values differ by at most one uint8 level (1/255 / std 0.5).
    assert (x - reference).abs().max() <= 2 / 255 + 1e-6 and (x - reference).abs().mean() < 1e-3


def test_gpu_pipeline_augments_each_image_differently(flowers):
    train = flowers.batches("train", 204, CPU)
    x, y = next(iter(train))
    assert x.shape == (204, 3, 32, 32) and sorted(y.tolist()) == sorted(flowers.splits.train.targets)
    same = train.images[:1].repeat(8, 1, 1, 1)
    boxes = gpu_data._crop_boxes(8, same.shape[-1], (0.35, 1.0), torch.Generator().manual_seed(0))
    assert len({tuple(b.round().tolist()) for b in boxes}) == 8  # one crop per image, not one per batch
    erased = train._erase(torch.ones(64, 3, 32, 32), 0.5, 64)  # one process: its share is the whole batch
    hit = (erased == 0).flatten(1).any(1)
    assert 10 < hit.sum() < 54 and (erased[~hit] == 1).all()


def test_a_vit_learns_flowers_on_the_gpu_pipeline_with_the_recipe(flowers, smoke_params):
    torch.manual_seed(0)
    p = copy.deepcopy(smoke_params)
    settings = models.ModelSettings(None, torch.float32, "sdpa", {"image_size": 32, "patch_size": 8, "hidden_size": 64,
                                                                   "num_hidden_layers": 2, "num_attention_heads": 2,
                                                                   "intermediate_size": 128})
    model = finetune.build(settings, p["finetune"], flowers.class_names, CPU)
    ft = {**p["finetune"], "epochs": 4, "lr": 2e-3, "warmup_ratio": 0.0, "label_smoothing": 0.1, "mixup_alpha": 0.2,
          "cutmix_alpha": 1.0, "ema_decay": 0.5, "select": "best_valid"}
    history = training.train(model, flowers.batches("train", 68, CPU), flowers.batches("valid", 68, CPU), ft, CPU,
                             num_classes=102)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert sum(r["selected"] for r in history) == 1 and all(r["train_img_s"] > 0 for r in history)
    best = max(history, key=lambda r: r["val_acc"])
    assert best["selected"]
