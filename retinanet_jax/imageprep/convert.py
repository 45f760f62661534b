"""Any image -> C-contiguous uint8 RGB ``[H, W, 3]``: one rule per PIL mode and array layout.

Every caller uses these rules (file decoding in ``data.decode``, tfds arrays in
``data.tfds_source``, ``predict`` inputs), so training, evaluation, the CLI and ``rj.predict``
see the same pixels for the same image:

- "RGB": as stored.
- 16-bit grayscale ("I;16", "I;16B", "I;16L", "I;16N", and "I", which PIL uses for 32-bit
  integer images such as integer TIFFs): ``round(v / 257)`` of ``v`` clipped to 0..65535
  (65535 -> 255), replicated to RGB -- always, whatever the values (a rule that depended on
  the image's maximum would give 8-bit-valued and 16-bit-valued files different meanings).
  PIL's own ``convert("RGB")`` would clip at 255 instead. 16-bit RGB PNGs are reduced to 8
  bits by PIL itself when opened.
- "F" (32-bit float) has no defined value range: refused (:class:`UnsupportedModeError`).
- everything else ("1", "L", "P", "CMYK", "YCbCr", ...; with alpha: "RGBA", "LA", "PA",
  palette with transparency): ``PIL.Image.convert("RGB")``. Grayscale is replicated; alpha is
  dropped, not composited, exactly as ``Image.open(p).convert("RGB")`` in torchvision's
  reference scripts and ``torchvision.io.ImageReadMode.RGB``.
- uint8 arrays: ``[H, W]`` and ``[H, W, 1]`` are grayscale (replicated), ``[H, W, 3]`` RGB,
  ``[H, W, 4]`` RGBA (alpha dropped, as for PIL "RGBA").

EXIF orientation is ignored: pixels are used as stored (as torchvision's COCO reference does,
and as COCO / VOC annotations, made on the stored pixels, require).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class UnsupportedModeError(ValueError):
    """A PIL image whose pixels have no defined 0-255 meaning (mode "F")."""

    def __init__(self, mode: str):
        self.mode = mode
        super().__init__(
            f"PIL mode {mode!r} (32-bit float) has no defined 0-255 range; convert "
            "it to 8-bit ('L' or 'RGB') first"
        )


def gray16_to_uint8(values: np.ndarray) -> np.ndarray:
    """16-bit gray values -> uint8: ``round(clip(v, 0, 65535) / 257)`` (65535 -> 255)."""
    values = np.asarray(values).astype(np.float64)
    return np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """A PIL image of any mode -> uint8 ``[H, W, 3]`` (rules in the module doc).

    Raises :class:`UnsupportedModeError` for mode "F"; PIL's ``OSError`` / ``ValueError`` from
    a conversion it cannot do propagate.
    """
    mode = image.mode
    if mode == "RGB":
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    if mode in _SIXTEEN_BIT_MODES:
        gray = gray16_to_uint8(np.asarray(image))
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "F":
        raise UnsupportedModeError(mode)
    if mode == "P" and "transparency" in image.info:
        # Going through RGBA avoids PIL's warning about byte-encoded palette transparency.
        image = image.convert("RGBA")
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def array_to_rgb(array: np.ndarray, name: str = "image") -> np.ndarray:
    """A uint8 ``[H, W]`` / ``[H, W, 1]`` / ``[H, W, 3]`` / ``[H, W, 4]`` array -> uint8 ``[H, W, 3]``.

    Raises ``TypeError`` (dtype) / ``ValueError`` (shape) whose message starts with ``name``.
    """
    arr = array
    if arr.dtype != np.uint8:
        raise TypeError(
            f"{name}: expected a uint8 array with values 0..255, got dtype {arr.dtype} "
            "(convert with np.clip(x * 255, 0, 255).astype(np.uint8) for floats in [0, 1])"
        )
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected shape [H, W, 3], got {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.shape[-1] != 3:
        hint = " (looks like [C, H, W]; use arr.transpose(1, 2, 0))" if arr.shape[0] in (1, 3) else ""
        raise ValueError(f"{name}: expected 3 channels last, shape [H, W, 3], got {arr.shape}{hint}")
    return np.ascontiguousarray(arr)


def to_uint8_rgb(image: Any, index: int = 0) -> np.ndarray:
    """Validate one ``predict`` input and return it as a C-contiguous uint8 ``[H, W, 3]`` array.

    Accepts a PIL image (any mode but "F", see the module doc) or a uint8 numpy array
    (:func:`array_to_rgb`'s layouts). Raises ``TypeError`` / ``ValueError`` naming ``index``
    ("image 2: ...") for anything else or for zero size.
    """
    name = f"image {index}"
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"{name} has zero size ({image.height}x{image.width})")
        try:
            arr = pil_to_rgb(image)
        except UnsupportedModeError as e:
            raise ValueError(f"{name}: {e}") from None
    elif isinstance(image, np.ndarray):
        arr = array_to_rgb(image, name)
    else:
        raise TypeError(
            f"{name}: unsupported type {type(image).__name__}; expected a PIL image or a "
            "uint8 numpy array [H, W, 3]"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} has zero size ({arr.shape[0]}x{arr.shape[1]})")
    return arr
