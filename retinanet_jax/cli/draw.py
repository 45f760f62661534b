"""Pictures with Pillow only: detections drawn on images, and precision-recall plots.

``draw_detections`` outlines each box (xyxy, original pixels) in a colour per label and writes
``"name 0.87"`` on a filled tag above it. ``pr_plot`` draws recall (x) against precision (y)
curves on labelled axes with a legend; the curves come from pycocotools'
``COCOeval.eval["precision"]`` (101 recall points), see ``cli_evaluate``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# 20 well-separated colours (Tableau 20 order): label i gets PALETTE[i % 20].
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
    (158, 218, 229),
)


def font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` px (the fixed bitmap font on builds without FreeType)."""
    try:
        return ImageFont.load_default(size=max(int(size), 6))
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    # Black text on light tags, white on dark ones (ITU-R 601 luma).
    return (0, 0, 0) if 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2] > 150 else (255, 255, 255)


def downscale(image: np.ndarray, max_size: int) -> tuple[np.ndarray, float]:
    """(uint8 ``image`` with its long side reduced to ``max_size``, the scale applied); strided
    decimation to at most twice the target first (no full-size copy of a huge image), then
    Pillow's antialiased bilinear resize. Images already small enough are returned as is."""
    h, w = image.shape[:2]
    if max_size is None or max(h, w) <= max_size:
        return image, 1.0
    scale = max_size / max(h, w)
    oh, ow = max(1, round(h * scale)), max(1, round(w * scale))
    step = max(1, min(h // (2 * oh), w // (2 * ow)))
    small = Image.fromarray(np.ascontiguousarray(np.asarray(image, np.uint8)[::step, ::step]))
    return np.asarray(small.convert("RGB").resize((ow, oh), Image.BILINEAR)), scale


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    label_name: Callable[[int], str],
    *,
    threshold: float = 0.5,
    max_size: int | None = None,
) -> Image.Image:
    """RGB PIL image of uint8 ``image`` [H, W, 3] with detections above ``threshold`` drawn.

    ``boxes`` float [N, 4] xyxy in ``image``'s pixels, ``scores`` [N], ``labels`` [N]. Lower
    scores are drawn first, so the most confident box and tag end up on top. ``max_size``: a
    larger image is drawn downscaled to that long side (large tiled images); line width and
    tag font follow the drawn size, and boxes smaller than their outline are drawn enlarged
    around their centre so that every box stays visible.
    """
    image, scale = downscale(image, max_size)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4) * np.float32(scale)
    out = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    h, w = image.shape[:2]
    draw = ImageDraw.Draw(out)
    width = max(1, round(max(h, w) / 250))
    tag_font = font(max(10, round(max(h, w) / 60)))
    keep = [i for i in np.argsort(scores, kind="stable") if scores[i] > threshold]
    for i in keep:
        colour = PALETTE[int(labels[i]) % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        if scale < 1:  # at least a ring of 2 * width + 2 px, centred on the box
            grow_x = max(0.0, (2 * width + 2 - (x2 - x1)) / 2)
            grow_y = max(0.0, (2 * width + 2 - (y2 - y1)) / 2)
            x1, x2, y1, y2 = x1 - grow_x, x2 + grow_x, y1 - grow_y, y2 + grow_y
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=width)
        text = f"{label_name(int(labels[i]))} {float(scores[i]):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=tag_font)
        tw, th = right - left + 4, bottom - top + 4
        ty = y1 - th if y1 - th >= 0 else y1  # above the box, or inside when at the top edge
        tx = min(max(x1, 0), max(w - tw, 0))
        draw.rectangle([tx, ty, tx + tw, ty + th], fill=colour)
        draw.text((tx + 2 - left, ty + 2 - top), text, fill=_text_colour(colour), font=tag_font)
    return out


# ------------------------------------------------------------------------------ PR plot

_SIZE = (640, 480)
_MARGIN = {"left": 70, "right": 20, "top": 66, "bottom": 56}


def pr_plot(
    curves: Sequence[tuple[str, np.ndarray, np.ndarray]], title: str, subtitle: str = ""
) -> Image.Image:
    """Precision-recall chart: ``curves`` = ``[(legend text, recall [R], precision [R]), ...]``.

    Axes run 0..1 with ticks every 0.2; precision values < 0 (pycocotools' "no data") are
    not drawn.
    """
    img = Image.new("RGB", _SIZE, "white")
    draw = ImageDraw.Draw(img)
    x0, y0 = _MARGIN["left"], _MARGIN["top"]
    x1, y1 = _SIZE[0] - _MARGIN["right"], _SIZE[1] - _MARGIN["bottom"]

    def to_px(r: float, p: float) -> tuple[float, float]:
        return x0 + r * (x1 - x0), y1 - p * (y1 - y0)

    small, normal = font(12), font(14)
    for k in range(6):  # grid, ticks and tick labels at 0, 0.2, ..., 1
        v = k / 5
        gx, _ = to_px(v, 0)
        _, gy = to_px(0, v)
        draw.line([(gx, y0), (gx, y1)], fill=(225, 225, 225))
        draw.line([(x0, gy), (x1, gy)], fill=(225, 225, 225))
        draw.line([(gx, y1), (gx, y1 + 5)], fill="black")
        draw.line([(x0 - 5, gy), (x0, gy)], fill="black")
        draw.text((gx, y1 + 8), f"{v:.1f}", fill="black", font=small, anchor="mt")
        draw.text((x0 - 8, gy), f"{v:.1f}", fill="black", font=small, anchor="rm")
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text(((x0 + x1) / 2, _SIZE[1] - 8), "recall", fill="black", font=normal, anchor="mb")
    _vertical_text(img, "precision", (14, (y0 + y1) / 2), normal)
    draw.text((_SIZE[0] / 2, 6), title, fill="black", font=normal, anchor="mt")
    if subtitle:
        draw.text((_SIZE[0] / 2, 24), subtitle, fill=(90, 90, 90), font=small, anchor="mt")

    for n, (_, recall, precision) in enumerate(curves):
        ok = np.asarray(precision) >= 0
        pts = [to_px(float(r), float(p)) for r, p in zip(np.asarray(recall)[ok], np.asarray(precision)[ok])]
        if len(pts) > 1:
            draw.line(pts, fill=PALETTE[n % len(PALETTE)], width=2)
    # Legend in one row between the title and the plot: inside it would hide some curve.
    lx = x0
    for n, (text, _, _) in enumerate(curves):
        draw.line([(lx, 50), (lx + 24, 50)], fill=PALETTE[n % len(PALETTE)], width=3)
        draw.text((lx + 30, 50), text, fill="black", font=small, anchor="lm")
        lx += 30 + draw.textbbox((0, 0), text, font=small)[2] + 24
    return img


def _vertical_text(
    img: Image.Image, text: str, centre: tuple[float, float], text_font: ImageFont.ImageFont
) -> None:
    """Paste ``text`` rotated by 90 degrees (reading upwards) centred at ``centre``."""
    left, top, right, bottom = ImageDraw.Draw(img).textbbox((0, 0), text, font=text_font)
    label = Image.new("RGB", (right - left + 2, bottom - top + 2), "white")
    ImageDraw.Draw(label).text((1 - left, 1 - top), text, fill="black", font=text_font)
    label = label.rotate(90, expand=True)
    img.paste(label, (int(centre[0] - label.width / 2), int(centre[1] - label.height / 2)))
