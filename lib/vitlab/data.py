"""Image classification data: Flowers-102, any ImageFolder tree, or scikit-learn's digits (offline).

Every source yields train/valid/test datasets of (PIL image, label) plus class names; transforms
(torchvision v2) are applied on top, with the normalisation of the model's image processor.
"""
from __future__ import annotations

import functools
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from .config import REPO_ROOT
from . import gpu_data
from .errors import DataError
from .machine import check_imagefolder
from .images import open_image

SPLITS = ("train", "valid", "test")


@dataclass
class Splits:
    train: Dataset
    valid: Dataset
    test: Dataset
    class_names: list[str]

    def __getitem__(self, split: str) -> Dataset:
        if split not in SPLITS:
            raise KeyError(f"unknown split '{split}'; choose one of {SPLITS}")
        return getattr(self, split)


@dataclass
class Data:
    """The splits of a run with the transforms of its model: what every step notebook needs."""
    splits: Splits
    image_size: int
    train_transform: Callable
    eval_transform: Callable
    num_workers: int
    seed: int
    cfg: dict[str, Any] = field(default_factory=dict)
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    _on_device: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def class_names(self) -> list[str]:
        return self.splits.class_names

    def loader(self, split: str, batch_size: int) -> DataLoader:
        """Batches of (pixel_values, labels) through PIL and torchvision v2 on the CPU; the train split is
        shuffled and augmented. The reference path: evaluation always uses it."""
        train = split == "train"
        ds = Transformed(self.splits[split], self.train_transform if train else self.eval_transform)
        return loader(ds, batch_size, shuffle=train, num_workers=self.num_workers, seed=self.seed)

    def batches(self, split: str, batch_size: int, device: "torch.device", image_size: int | None = None):
        """Training and validation batches by `data.pipeline`: `loader`, or the split decoded once onto
        `device` and augmented there (`gpu_data.GpuBatches`; `image_size`: training crops of another
        size than the model's, from the same decoded images)."""
        if self.cfg["pipeline"] == "pil":
            return self.loader(split, batch_size)
        if split not in self._on_device:
            sources, labels = images_and_labels(self.splits[split])
            short_side = round(self.image_size / 0.875)  # as the eval transform resizes
            crop = short_side if split == "train" else self.image_size  # room for random crops in training
            self._on_device[split] = (gpu_data.decode(sources, short_side, crop, device,
                                                      max_pixels=self.cfg["max_image_pixels"]), torch.as_tensor(labels))
        images, labels = self._on_device[split]
        augment = gpu_data.Augment(crop_scale=tuple(self.cfg["crop_scale"]), hflip=self.cfg["hflip"],
                                   trivial_augment=self.cfg["trivial_augment"], random_erasing=self.cfg["random_erasing"])
        return gpu_data.GpuBatches(images, labels, image_size or self.image_size, self.mean, self.std, batch_size,
                                   split == "train", augment, self.seed)


class LabeledImages(Dataset):
    """In-memory images with integer labels."""

    def __init__(self, images: Sequence[Image.Image], labels: Sequence[int]):
        self.images, self.targets = list(images), [int(t) for t in labels]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self.images[i], self.targets[i]


class Selected(Dataset):
    """The images of `base` whose class is in `classes`, relabelled 0..len(classes)-1 in that order."""

    def __init__(self, base: Dataset, classes: Sequence[int]):
        new = {c: i for i, c in enumerate(classes)}
        self.base = base
        self.indices = [i for i, t in enumerate(base.targets) if t in new]
        self.targets = [new[base.targets[i]] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self.base[self.indices[i]][0], self.targets[i]


class Transformed(Dataset):
    def __init__(self, base: Dataset, transform: Callable):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[i]
        return self.transform(image), label


def images_and_labels(ds: Dataset) -> tuple[list, list[int]]:
    """The files (or, for in-memory data sets, PIL images) of a split and their labels, without decoding."""
    if isinstance(ds, Subset):
        sources, labels = images_and_labels(ds.dataset)
        return [sources[i] for i in ds.indices], [labels[i] for i in ds.indices]
    if isinstance(ds, Selected):
        sources, _ = images_and_labels(ds.base)
        return [sources[i] for i in ds.indices], list(ds.targets)
    if isinstance(ds, LabeledImages):
        return ds.images, ds.targets
    if hasattr(ds, "samples"):  # ImageFolder
        return [p for p, _ in ds.samples], [t for _, t in ds.samples]
    if hasattr(ds, "_image_files"):  # torchvision Flowers102
        return [str(p) for p in ds._image_files], list(ds._labels)
    raise DataError(f"data.pipeline gpu cannot read the images of a {type(ds).__name__}; use data.pipeline: pil")


# --- sources ---------------------------------------------------------------------------------------

def _digits(cfg: dict[str, Any], seed: int, size: int) -> Splits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # 8x8 grey values in 0..16 -> RGB at the model's input size, as a camera image would arrive.
    images = [Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((size, size), Image.BICUBIC).convert("RGB")
              for img in digits.images]
    idx = np.arange(len(images))
    held = cfg["valid_fraction"] + cfg["test_fraction"]
    train_idx, rest = train_test_split(idx, test_size=held, stratify=digits.target, random_state=seed)
    valid_idx, test_idx = train_test_split(rest, test_size=cfg["test_fraction"] / held,
                                           stratify=digits.target[rest], random_state=seed)
    make = lambda ids: LabeledImages([images[i] for i in ids], digits.target[ids])
    return Splits(make(train_idx), make(valid_idx), make(test_idx), [str(c) for c in range(10)])


def _checked_loader(cfg: dict[str, Any]) -> Callable[[str], Image.Image]:
    """open_image with the params' pixel limit, as an ImageFolder loader (torchvision's own would raise
    without naming the file). Runs made before the limit existed get the default."""
    return functools.partial(open_image, max_pixels=cfg["max_image_pixels"])


def _imagefolder(cfg: dict[str, Any]) -> Splits:
    from torchvision.datasets import ImageFolder

    root = resolve_path(cfg["root"])
    check_imagefolder(root)
    sets = {s: ImageFolder(str(root / s), loader=_checked_loader(cfg)) for s in SPLITS}
    classes = sets["train"].classes
    names = classes
    if (root / "cat_to_name.json").is_file():
        mapping = json.loads((root / "cat_to_name.json").read_text())
        names = [mapping.get(c, c) for c in classes]
    return Splits(sets["train"], sets["valid"], sets["test"], names)


FLOWERS102_FILES = ("imagelabels.mat", "setid.mat")


def _flowers102(cfg: dict[str, Any]) -> Splits:
    """torchvision's Flowers102 with the official split (train 1,020 / val 1,020 / test 6,149). A data.root
    that already holds its layout (flowers-102/jpg/ + the two .mat files) loads without a download."""
    from torchvision.datasets import Flowers102

    root = resolve_path(cfg["root"])
    present = (root / "flowers-102" / "jpg").is_dir() and all((root / "flowers-102" / f).is_file() for f in FLOWERS102_FILES)
    try:
        sets = {s: Flowers102(str(root), split=("val" if s == "valid" else s), download=not present,
                                loader=_checked_loader(cfg))
                for s in SPLITS}
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise DataError(
            f"could not download Oxford Flowers-102 into {root} ({e}). Without a network, put torchvision's layout "
            "there (flowers-102/jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat; `python -m vitlab flowers102-layout "
            "SRC DST` builds it with links from a train/valid/test copy), or use `data.source: imagefolder` with "
            "data.root holding train/ valid/ test/ class folders, or `data.source: digits` (offline).") from e
    for ds in sets.values():
        ds.targets = list(ds._labels)
    return Splits(sets["train"], sets["valid"], sets["test"], list(sets["train"].classes))


def flowers102_layout(source: str | Path, target: str | Path) -> Path:
    """torchvision's Flowers102 layout under `target` (flowers-102/jpg/image_NNNNN.jpg and the two .mat
    files), as symbolic links into `source`: a copy laid out as train/valid/test/<class>/image_NNNNN.jpg
    with official_split/{imagelabels,setid}.mat beside it (the seeds' layout). Nothing is copied."""
    source, base = Path(source).resolve(), Path(target) / "flowers-102"
    missing = [f for f in FLOWERS102_FILES if not (source / "official_split" / f).is_file()]
    if missing or not all((source / s).is_dir() for s in SPLITS):
        raise DataError(f"{source} is not a Flowers-102 copy in the seeds' layout: it needs train/ valid/ test/ "
                        f"class folders and official_split/{{{','.join(FLOWERS102_FILES)}}}")
    (base / "jpg").mkdir(parents=True, exist_ok=True)
    for f in FLOWERS102_FILES:
        link = base / f
        if not link.exists():
            link.symlink_to(source / "official_split" / f)
    for image in source.glob("*/*/image_*.jpg"):
        link = base / "jpg" / image.name
        if not link.exists():
            link.symlink_to(image)
    return Path(target)


def resolve_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def _subsample(ds: Dataset, max_per_class: int | None, max_samples: int | None, seed: int) -> Dataset:
    if max_per_class is None and max_samples is None:
        return ds
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ds))
    targets = np.asarray(ds.targets)
    seen: dict[int, int] = defaultdict(int)
    keep = []
    for i in order:
        if max_per_class is not None and seen[targets[i]] >= max_per_class:
            continue
        seen[targets[i]] += 1
        keep.append(int(i))
    keep = sorted(keep[:max_samples] if max_samples is not None else keep)
    sub = Subset(ds, keep)
    sub.targets = [int(targets[i]) for i in keep]
    return sub


def class_subset(n_classes: int, which: str, split_seed: int) -> list[int]:
    """The classes `data.classes` keeps: all, or one half of a seeded permutation (half_a: the first
    n // 2, half_b: the rest), so a model pretrained on one half can be fine-tuned on the other."""
    if which == "all":
        return list(range(n_classes))
    order = np.random.default_rng(split_seed).permutation(n_classes)
    return sorted(int(c) for c in (order[:n_classes // 2] if which == "half_a" else order[n_classes // 2:]))


def for_model(data_cfg: dict[str, Any], seed: int, processor) -> Data:
    """The data of `data_cfg`, sized and normalised for the model whose image processor is given."""
    size = processor.size.get("height") or processor.size.get("shortest_edge")
    splits = load_splits(data_cfg, seed, size)
    mean, std = processor.image_mean, processor.image_std
    train = transforms(size, mean, std, train=True, hflip=data_cfg["hflip"], crop_scale=data_cfg["crop_scale"],
                       trivial_augment=data_cfg["trivial_augment"], random_erasing=data_cfg["random_erasing"])
    return Data(splits, size, train, transforms(size, mean, std, train=False), data_cfg["num_workers"], seed,
                data_cfg, mean, std)


def for_checkpoint(data_cfg: dict[str, Any], seed: int, checkpoint: str | Path) -> Data:
    """The data of `data_cfg` for a saved checkpoint, with the image processor saved beside it."""
    from transformers import AutoImageProcessor

    return for_model(data_cfg, seed, AutoImageProcessor.from_pretrained(str(checkpoint)))


def load_splits(data_cfg: dict[str, Any], seed: int, image_size: int) -> Splits:
    """The raw (untransformed) splits of `data.source`, subsampled as the params ask."""
    source = data_cfg["source"]
    if source == "digits":
        splits = _digits(data_cfg, seed, image_size)
    elif source == "imagefolder":
        splits = _imagefolder(data_cfg)
    elif source == "flowers102":
        splits = _flowers102(data_cfg)
    else:
        raise DataError(f"unknown data.source '{source}'")
    _check_not_degenerate(splits, data_cfg)
    which = data_cfg["classes"]
    if which != "all":
        keep = class_subset(len(splits.class_names), which, data_cfg["class_split_seed"])
        splits = Splits(*(Selected(splits[s], keep) for s in SPLITS), [splits.class_names[c] for c in keep])
    for s in SPLITS:
        setattr(splits, s, _subsample(splits[s], data_cfg["max_per_class"], data_cfg["max_samples"], seed))
    return splits


def _check_not_degenerate(splits: Splits, data_cfg: dict[str, Any]) -> None:
    """Data a classifier cannot learn from, or that says something other than it seems, refused before
    training: fewer than two classes (a one-class set "trains" to accuracy 1.0), a split without images,
    one image file reached twice (a symlink loop in data.root copies and relabels images)."""
    if len(splits.class_names) < 2:
        raise DataError(f"data.root {data_cfg['root']} has {len(splits.class_names)} class: a classifier needs two "
                        "or more class folders")
    for s in SPLITS:
        if len(splits[s]) == 0:
            raise DataError(f"the {s} split of data.source {data_cfg['source']} holds no images")
        samples = getattr(splits[s], "samples", None)
        if samples:
            real = [str(Path(p).resolve()) for p, _ in samples]
            if len(set(real)) < len(real):
                twice = next(p for p in real if real.count(p) > 1)
                raise DataError(f"{twice} is reached more than once under data.root's {s}/ (a symbolic link that "
                                "loops back?): each image must appear once")


# --- transforms ------------------------------------------------------------------------------------

def transforms(image_size: int, mean: Sequence[float], std: Sequence[float], train: bool,
               hflip: bool = True, crop_scale: Sequence[float] = (0.5, 1.0), trivial_augment: bool = False,
               random_erasing: float = 0.0) -> v2.Compose:
    """torchvision v2 pipeline: random resized crop (+ flip, TrivialAugmentWide, random erasing) for
    training, resize + centre crop for eval."""
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    if train:
        head = [v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True)]
        head += [v2.RandomHorizontalFlip()] if hflip else []
        head += [v2.TrivialAugmentWide()] if trivial_augment else []
        tail += [v2.RandomErasing(p=random_erasing, value=0)] if random_erasing else []
    else:
        # The usual 0.875 crop ratio (224 from 256).
        head = [v2.Resize(round(image_size / 0.875), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose(head + tail)


def loader(ds: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), generator=generator,
                      persistent_workers=num_workers > 0)
