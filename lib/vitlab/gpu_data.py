"""A data path that keeps a GPU busy: decode every image once, hold the split as one uint8 tensor on the
device, and augment whole batches there with per-image randomness.

A DataLoader of PIL images decodes and augments each image again every epoch on a few CPU cores,
which starves a GPU that trains a small ViT at thousands of images per second. Here:
- `decode`: the files' bytes are decoded once (nvJPEG through torchvision.io.decode_jpeg on a GPU,
  torchvision's CPU decoder otherwise), resized and centre-cropped to a square, so a split is one
  (N, 3, S, S) uint8 tensor (6,552 flowers at 256 px: 1.3 GB).
- `GpuBatches`: shuffled batches of that tensor, each image with its own random resized crop and
  flip (one roi_align call for the batch), an optional TrivialAugmentWide op drawn per group of
  `augment_group` images, normalisation, and optional per-image random erasing; evaluation batches
  are decoded at the eval transform's geometry (resize, centre crop) and only normalised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from PIL import Image
from torchvision import io
from torchvision.ops import roi_align
from torchvision.transforms import v2

from .images import check_pixels


def decode(sources: Sequence, short_side: int, crop: int, device: torch.device, chunk: int = 512,
           max_pixels: int | None = None) -> torch.Tensor:
    """The images (file paths, or PIL images of an in-memory data set) as one (N, 3, crop, crop) uint8
    tensor on `device`, each decoded once: shorter side to `short_side` (antialiased, the longer one
    rounded as torchvision's Resize rounds it), then the centre crop. With short_side round(s / 0.875)
    and crop s that is exactly the eval transform of the PIL path. Files whose header says they exceed
    `max_pixels` are refused, naming the file, before anything is decoded."""
    out = torch.empty((len(sources), 3, crop, crop), dtype=torch.uint8, device=device)
    for start in range(0, len(sources), chunk):
        part = sources[start:start + chunk]
        if isinstance(part[0], Image.Image):
            images = [v2.functional.pil_to_tensor(image.convert("RGB")).to(device) for image in part]
        else:
            if max_pixels is not None:
                for p in part:
                    check_pixels(p, max_pixels)
            files = [io.read_file(str(p)) for p in part]
            jpeg = device.type == "cuda" and all(str(p).lower().endswith((".jpg", ".jpeg")) for p in part)
            images = (io.decode_jpeg(files, mode=io.ImageReadMode.RGB, device=device) if jpeg else
                      [io.decode_image(f, mode=io.ImageReadMode.RGB).to(device) for f in files])
        for i, image in enumerate(images):
            out[start + i] = v2.functional.center_crop(v2.functional.resize(image, [short_side], antialias=True),
                                                       [crop, crop])
    return out


@dataclass
class Augment:
    """Training augmentation on the GPU. crop_scale: RandomResizedCrop's area range; trivial_augment:
    TrivialAugmentWide; random_erasing: probability per image."""
    crop_scale: tuple[float, float] = (0.35, 1.0)
    hflip: bool = True
    trivial_augment: bool = False
    random_erasing: float = 0.0
    augment_group: int = 16


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (random draws) onto `device` without waiting for the GPU: a copy from
    pageable memory synchronises the stream, which would stall the CPU once per batch until the GPU
    has finished the previous step, so that nothing of the next step is queued meanwhile."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _crop_boxes(n: int, size: int, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop's boxes (x1, y1, x2, y2), one per image, aspect ratio in [3/4, 4/3]."""
    area = torch.empty(n).uniform_(*scale, generator=generator) * size * size
    log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).clamp(8, size)
    h = torch.sqrt(area / ratio).clamp(8, size)
    x1 = torch.rand(n, generator=generator) * (size - w)
    y1 = torch.rand(n, generator=generator) * (size - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], 1)


class GpuBatches:
    """Batches of (pixel_values, labels) from a split held on the device (see the module's docstring)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int, mean: Sequence[float],
                 std: Sequence[float], batch_size: int, train: bool, augment: Augment | None = None, seed: int = 0):
        self.images, self.labels = images, labels.to(images.device)
        self.image_size, self.batch_size, self.train = image_size, batch_size, train
        self.augment = augment or Augment()
        self.mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
        self.generator = torch.Generator().manual_seed(seed)
        self.trivial = v2.TrivialAugmentWide()
        self.part = slice(None)

    def shard(self, rank: int, world: int) -> "GpuBatches":
        """This process's share of every batch under data parallelism: images rank, rank + world, ... of
        it. Every process draws the whole batch's order, crops, flips and erasing boxes from the same
        seed and applies its share, so N processes see the batches one process would."""
        if self.batch_size % world:
            raise ValueError(f"a batch of {self.batch_size} does not split over {world} processes")
        self.part = slice(rank, None, world)
        return self

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self._drop_last else math.ceil(n / self.batch_size)

    @property
    def _drop_last(self) -> bool:
        # Training steps all of one shape (what torch.compile and CUDA graphs want); the ragged rest of
        # a shuffled epoch is left for the next one.
        return self.train and len(self.images) >= self.batch_size

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255 - self.mean) / self.std

    def _train_batch(self, batch: torch.Tensor) -> torch.Tensor:
        a, store, idx = self.augment, self.images.shape[-1], batch[self.part]
        x = self.images[idx]
        boxes = _to(_crop_boxes(len(batch), store, a.crop_scale, self.generator)[self.part], x.device)
        batch_index = torch.arange(len(idx), device=x.device, dtype=torch.float32)[:, None]
        x = roi_align(x.float(), torch.cat([batch_index, boxes], 1), self.image_size, aligned=True)
        if a.hflip:
            flip = _to((torch.rand(len(batch), generator=self.generator) < 0.5)[self.part], x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
        if a.trivial_augment:
            # One op (and strength) per group: per image it would be a launch per image and op.
            x = torch.cat([self.trivial(group) for group in x.split(a.augment_group)])
        x = self._normalise(x)
        return self._erase(x, a.random_erasing, len(batch)) if a.random_erasing else x

    def _erase(self, x: torch.Tensor, p: float, n: int) -> torch.Tensor:
        """RandomErasing's boxes (2-33% of the area, aspect 0.3-3.3) set to 0, per image with probability p
        (drawn for the n images of the whole batch, applied to this process's share x)."""
        s, g = x.shape[-1], self.generator
        hit = torch.rand(n, generator=g) < p
        area = torch.empty(n).uniform_(0.02, 0.33, generator=g) * s * s
        ratio = torch.exp(torch.empty(n).uniform_(math.log(0.3), math.log(3.3), generator=g))
        h, w = torch.sqrt(area * ratio).clamp(1, s), torch.sqrt(area / ratio).clamp(1, s)
        y1, x1 = torch.rand(n, generator=g) * (s - h), torch.rand(n, generator=g) * (s - w)
        # The draws travel (n x 5 numbers); the (n, s, s) mask is built where the images are.
        y1, y2, x1, x2, hit = _to(torch.stack([y1, y1 + h, x1, x1 + w, hit.float()])[:, self.part], x.device)
        ar = torch.arange(s, device=x.device)
        rows = (ar >= y1[:, None]) & (ar < y2[:, None])
        cols = (ar >= x1[:, None]) & (ar < x2[:, None])
        mask = rows[:, :, None] & cols[:, None, :] & hit.bool()[:, None, None]
        return x.masked_fill(mask[:, None], 0.0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.images)
        order = _to(torch.randperm(n, generator=self.generator) if self.train else torch.arange(n), self.images.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = order[start:start + self.batch_size]
            if self.train:
                x = self._train_batch(batch)
            else:  # decoded at the eval geometry already
                x = self._normalise(self.images[batch[self.part]])
            yield x, self.labels[batch[self.part]]
