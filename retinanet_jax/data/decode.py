"""Image decoding with PIL to RGB uint8 [H, W, 3].

Conversions (all sources use these, so training and evaluation see the same pixels):
- grayscale ("1", "L"), palette ("P"), "CMYK", "YCbCr", ...: ``PIL.Image.convert("RGB")``;
  grayscale is replicated into the three channels.
- alpha ("RGBA", "LA", "PA", palette with transparency): the alpha channel is dropped, not
  composited, exactly as ``Image.open(p).convert("RGB")`` in torchvision's reference scripts.
- 16-bit ("I;16", "I;16B", ..., and "I", which PIL uses for 16-bit PNGs): scaled to 8 bits by
  ``round(v / 257)`` (65535 -> 255), then replicated to RGB. 16-bit RGB PNGs are reduced to
  8 bits by PIL itself when opened.
- float images ("F") have no agreed range and are refused.
- EXIF orientation is ignored: pixels are used as stored, as torchvision's COCO reference
  does, and as COCO / VOC annotations (made on the stored pixels) require.

Missing or undecodable files raise ``DataError`` naming the file.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image

from retinanet_jax.data.errors import DataError


def _open(path: str) -> Image.Image:
    if not os.path.exists(path):
        raise DataError(f"{path}: image file not found")
    try:
        return Image.open(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def to_rgb_uint8(image: Image.Image, name: str = "<image>") -> np.ndarray:
    """Converts a PIL image of any supported mode to uint8 [H, W, 3]; ``name`` is for errors."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    if mode == "I" or mode.startswith("I;16"):
        values = np.asarray(image).astype(np.float64)
        gray = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "F":
        raise DataError(f"{name}: float image (PIL mode 'F') has no defined 0-255 range")
    if mode == "P" and "transparency" in image.info:
        # Going through RGBA avoids PIL's warning about byte-encoded palette transparency.
        image = image.convert("RGBA")
    try:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise DataError(f"{name}: cannot convert PIL mode {mode!r} to RGB ({e})") from e


def read_image(path: str) -> np.ndarray:
    """Decodes the image file at ``path`` to uint8 [H, W, 3] (see module doc for modes)."""
    with warnings.catch_warnings():
        # PIL warns on some truncated/odd files; we raise instead of warning.
        warnings.simplefilter("ignore")
        image = _open(path)
        try:
            with image:
                image.load()  # full decode now, so truncated files fail here, naming the file
                return to_rgb_uint8(image, path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def read_image_size(path: str) -> tuple[int, int]:
    """(h, w) of the image at ``path`` from its header only (fast: no pixel decoding)."""
    image = _open(path)
    with image:
        w, h = image.size
    return int(h), int(w)
