"""PNG pictures of masks drawn over their images, shared by evaluation and prediction.

Two kinds, one per kind of mask:

- binary (`overlay`): the predicted contour in red (and, where there is a reference, its
  contour in green) over the image, enlarged by nearest neighbour so that thin contours stay
  visible, with a legend strip;
- labels (`class_overlay`): each class filled in its palette colour over the gray image,
  reference and prediction side by side (the prediction alone where there is no reference),
  with a legend naming the classes.

Model-free (NumPy and Pillow only), so `icmoe.evaluate` and `engines.predict` draw the same way.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

GT_COLOUR = (0, 230, 0)
PRED_COLOUR = (255, 40, 40)
# One colour per foreground class (class k: PALETTE[(k - 1) % len]); background is left as it is.
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195))
FILL_ALPHA = 0.45
TEXT_COLOUR = (230, 230, 230)


def boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` (H, W) bool with a 4-neighbour outside it."""
    m = np.pad(mask, 1, mode="constant")
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def thicken(edge: np.ndarray, k: int) -> np.ndarray:
    """`edge` (H, W) bool grown by `k` 4-neighbour steps."""
    out = edge.copy()
    for _ in range(k):
        p = np.pad(out, 1)
        out = out | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return out


def rgb_uint8(image: np.ndarray) -> np.ndarray:
    """(3, H, W) or (H, W, 3) RGB, or (H, W) gray, 0..255 -> (H, W, 3) uint8."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    elif img.shape[0] == 3 and img.shape[-1] != 3:
        img = img.transpose(1, 2, 0)
    return np.clip(img, 0, 255).astype(np.uint8)


def overlay(image: np.ndarray, truth: Optional[np.ndarray], pred: np.ndarray, *, caption: str = "",
            min_side: int = 384) -> Image.Image:
    """RGB overlay: ground-truth contour green (if given), predicted contour red, with a caption.

    Arguments:
      image: (3, H, W) or (H, W, 3) RGB, or (H, W) gray, 0..255.
      truth: (H, W) reference mask (foreground > 0.5), or None where there is none (prediction only).
      pred: (H, W) predicted mask (foreground > 0.5).
      caption: text drawn on a strip under the image.
      min_side: the overlay is enlarged (nearest) until its height is at least this.

    Returns:
      PIL RGB image of (H * k + 22, W * k), k the enlargement.
    """
    img = rgb_uint8(image)
    scale = max(1, -(-min_side // img.shape[0]))
    big = img.repeat(scale, 0).repeat(scale, 1)
    width = max(1, scale // 2)
    drawn = [(truth, GT_COLOUR), (pred, PRED_COLOUR)] if truth is not None else [(pred, PRED_COLOUR)]
    for mask, colour in drawn:
        m = (np.asarray(mask) > 0.5).repeat(scale, 0).repeat(scale, 1)
        big[thicken(boundary(m), width)] = colour
    canvas = Image.new("RGB", (big.shape[1], big.shape[0] + 22), (0, 0, 0))
    canvas.paste(Image.fromarray(big), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x = 4
    if truth is not None:
        draw.text((x, big.shape[0] + 5), "ground truth", fill=GT_COLOUR)
        x = 90
    draw.text((x, big.shape[0] + 5), "prediction", fill=PRED_COLOUR)
    if caption:
        draw.text((x + 80, big.shape[0] + 5), caption, fill=TEXT_COLOUR)
    return canvas


def paint(image: np.ndarray, labels: np.ndarray, scale: int) -> np.ndarray:
    """(H, W) gray or (H, W, 3) RGB 0..255 with each class filled in its palette colour (alpha FILL_ALPHA),
    enlarged x scale; returns uint8 (H * scale, W * scale, 3)."""
    rgb = rgb_uint8(image).astype(np.float32)
    for k in np.unique(labels[labels > 0]):
        m = labels == k
        rgb[m] = (1 - FILL_ALPHA) * rgb[m] + FILL_ALPHA * np.asarray(PALETTE[(int(k) - 1) % len(PALETTE)])
    return rgb.astype(np.uint8).repeat(scale, 0).repeat(scale, 1)


def class_overlay(image: np.ndarray, truth: Optional[np.ndarray], pred: np.ndarray, class_names: Sequence[str], *,
                  caption: str = "", min_side: int = 256) -> Image.Image:
    """Reference (left) and prediction (right) of one slice, one colour per class, with a legend.

    Arguments:
      image: (H, W) gray or (H, W, 3) RGB image, 0..255.
      truth: (H, W) reference label map, or None: the prediction alone (one panel).
      pred: (H, W) predicted label map; 0 = background, k = class_names[k - 1].
      class_names: the foreground class names, in label order.
      caption: text under the panels.
      min_side: each panel is enlarged (nearest) until its height is at least this.

    Returns:
      PIL RGB image.
    """
    img = np.asarray(image)
    scale = max(1, -(-min_side // img.shape[0]))
    panels = ([("reference", paint(img, np.asarray(truth), scale))] if truth is not None else []) \
        + [("prediction", paint(img, np.asarray(pred), scale))]
    gap, line = 6, 14
    rows = 2 + (len(class_names) + 3) // 4
    h, w = panels[0][1].shape[:2]
    canvas = Image.new("RGB", (len(panels) * w + (len(panels) - 1) * gap, h + rows * line + 6), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    y = h + 3
    for i, (title, pic) in enumerate(panels):
        canvas.paste(Image.fromarray(pic), (i * (w + gap), 0))
        draw.text((i * (w + gap) + 4, y), title, fill=TEXT_COLOUR)
    for k, name in enumerate(class_names):
        x, yy = 4 + (k % 4) * (canvas.width // 4), y + line * (1 + k // 4)
        draw.rectangle((x, yy + 2, x + 9, yy + 11), fill=PALETTE[k % len(PALETTE)])
        draw.text((x + 13, yy), name, fill=TEXT_COLOUR)
    if caption:
        draw.text((4, y + line * (rows - 1)), caption, fill=TEXT_COLOUR)
    return canvas


def pick_slices(truth: Optional[np.ndarray], pred: np.ndarray, k: int) -> List[int]:
    """Up to `k` slice indices of a (Z, H, W) stack, spread over the slices where either label map
    (`truth` may be None) has foreground, else over all slices."""
    fg = (pred > 0).any(axis=(1, 2))
    if truth is not None:
        fg = fg | (truth > 0).any(axis=(1, 2))
    where = np.flatnonzero(fg)
    pool = where if where.size else np.arange(pred.shape[0])
    picks = np.unique(pool[np.linspace(0, len(pool) - 1, num=min(k, len(pool))).round().astype(int)])
    return [int(z) for z in picks]
