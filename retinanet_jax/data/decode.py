"""Image files -> RGB uint8 [H, W, 3], decoded with PIL.

Pixel conversion (grayscale, palette, alpha, 16-bit, float) follows
``retinanet_jax.imageprep.convert``, the one rule set that ``predict`` uses too, so training,
evaluation, the CLI and ``rj.predict`` see the same pixels for the same file. In short:
grayscale is replicated, alpha dropped (not composited), 16-bit grayscale scaled by
``round(v / 257)``, float images ("F") refused; EXIF orientation is ignored.

Missing, undecodable or unsupported files raise ``DataError`` naming the file.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image

from retinanet_jax.data.errors import DataError
from retinanet_jax.imageprep import convert


def _open(path: str) -> Image.Image:
    if not os.path.exists(path):
        raise DataError(f"{path}: image file not found")
    try:
        return Image.open(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def to_rgb_uint8(image: Image.Image, name: str = "<image>") -> np.ndarray:
    """Converts a PIL image of any supported mode to uint8 [H, W, 3] (``imageprep.convert``'s
    rules); ``DataError`` naming ``name`` for a mode without RGB meaning or a failed conversion."""
    try:
        return convert.pil_to_rgb(image)
    except convert.UnsupportedModeError as e:
        raise DataError(f"{name}: float image, {e}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{name}: cannot convert PIL mode {image.mode!r} to RGB ({e})") from e


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
