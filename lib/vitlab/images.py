"""Opening an image safely: its size is read from the header and refused before any pixel is decoded
when it would decode (or resize) to gigabytes, and an unreadable file gets a message naming it."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import DataError

MAX_IMAGE_PIXELS = 60_000_000  # params/defaults.yaml's data.max_image_pixels
# Resizing scales the short side to the model's input, so the long one grows with the aspect ratio: a 60,000 x 1
# strip under the pixel limit became 13 M x 224 pixels (~12 GB) in evaluation's Resize.
MAX_ASPECT = 50


def _open_header(source: str | Path | bytes, name: str, max_pixels: int) -> Image.Image:
    """The image's header only (no pixels decoded yet), refused when it declares more than max_pixels."""
    with warnings.catch_warnings():  # PIL warns of a possible bomb at open; the check below decides
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    width, height = image.size
    if max(width, height) > MAX_ASPECT * max(min(width, height), 1):
        image.close()
        raise DataError(f"{name} is {width} x {height}, an aspect ratio over {MAX_ASPECT}:1: resized to the model's "
                        "input its long side would take gigabytes (no photograph is that long); crop it first")
    if width * height > max_pixels:
        image.close()
        raise DataError(f"{name} is {width} x {height} = {width * height:,} pixels, more than the "
                        f"{max_pixels:,} allowed (data.max_image_pixels): it would take "
                        f"{width * height * 3 / 2**30:.1f} GB decoded; downscale it first")
    return image


def check_pixels(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """open_image's size check, for decoders other than PIL (the GPU data path)."""
    _open_header(path, str(path), max_pixels).close()


def open_image(source: str | Path | bytes, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None,
               advice: str = "remove the corrupt file from the data set") -> Image.Image:
    """Open an image file (path or raw bytes) as RGB, with an error that names the input (`name`, else
    the path, else "uploaded bytes") and ends with `advice`. Its size is read from the header and checked
    against `max_pixels` before any pixel is decoded."""
    name = name or ("uploaded bytes" if isinstance(source, (bytes, bytearray)) else str(source))
    try:
        image = _open_header(source, name, max_pixels)
        image.load()
    except Image.DecompressionBombError as e:
        raise DataError(f"{name}: {e}") from e
    except UnidentifiedImageError as e:  # PIL's text names its BytesIO object: say what it means instead
        raise DataError(f"{name} is not an image PIL can read (JPEG, PNG, WebP, ...); {advice}") from e
    except (OSError, SyntaxError) as e:
        raise DataError(f"cannot read {name} as an image ({e}); {advice}") from e
    return image.convert("RGB")
