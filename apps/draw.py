"""All drawing of the image applications (the algorithm modules never draw): mask and part overlays,
correspondence lines in matching colours, PCA as RGB, and the raw mask / label PNGs.

Pictures are ``HxWx3`` uint8 RGB arrays at the image's original size, or scaled down to fit ``max_side``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from PIL import Image

from densevit.errors import InvalidArgumentError
from densevit.models.grid import TokenGrid

from .common import tokens_to_image

__all__ = ["COLOURS", "colour", "fit_size", "as_rgb", "mask_overlay", "parts_overlay", "correspondence_image",
           "heatmap_overlay", "discovery_overlay", "contact_sheet",
           "points_overlay", "pca_rgb", "save_rgb", "save_mask", "save_labels"]

# Distinct colours (RGB); the first ones as the reference's part / correspondence colours.
COLOURS = np.array([
    (230, 25, 25), (255, 225, 25), (30, 80, 255), (60, 220, 60), (150, 0, 210), (240, 50, 230), (70, 240, 240),
    (150, 80, 20), (255, 140, 0), (0, 128, 128), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 190, 200),
    (0, 0, 128), (220, 190, 255), (128, 128, 128), (255, 255, 255), (210, 245, 60), (0, 0, 0)], np.uint8)

ImageLike = Union[Image.Image, np.ndarray]


def colour(i: int) -> Tuple[int, int, int]:
    """The i-th distinct colour (cycling)."""
    return tuple(int(c) for c in COLOURS[i % len(COLOURS)])


def fit_size(hw: Tuple[int, int], max_side: Optional[int]) -> Tuple[int, int]:
    """``(H, W)`` scaled down (never up) so the longer side is at most ``max_side``."""
    H, W = hw
    if not max_side or max(H, W) <= max_side:
        return H, W
    s = max_side / max(H, W)
    return max(1, round(H * s)), max(1, round(W * s))


def as_rgb(image: ImageLike, max_side: Optional[int] = None) -> np.ndarray:
    """An image as ``HxWx3`` uint8 RGB, scaled down (area filter) to fit ``max_side``."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    H, W = fit_size(arr.shape[:2], max_side)
    if (H, W) != arr.shape[:2]:
        arr = cv2.resize(arr, (W, H), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(arr)


def _fit_map(m: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    """A label/mask map resized (nearest) to ``hw``."""
    if m.shape[:2] == tuple(hw):
        return m
    return cv2.resize(m.astype(np.int16 if m.dtype != np.uint8 else np.uint8), (hw[1], hw[0]),
                      interpolation=cv2.INTER_NEAREST).astype(m.dtype)


def _checkerboard(hw: Tuple[int, int], edge: int = 10) -> np.ndarray:
    """Grey checkerboard ``HxWx3`` float (the reference's transparent-background pattern)."""
    ys, xs = np.indices(hw)
    board = np.where(((ys // edge) + (xs // edge)) % 2 == 0, 255.0, 191.0)
    return np.repeat(board[..., None], 3, axis=2)


def _background(img: np.ndarray, fg: np.ndarray, dim: float) -> np.ndarray:
    """Background pixels faded into a checkerboard (``dim`` = how much of the image remains)."""
    out = img.astype(np.float32)
    bg = ~fg
    out[bg] = dim * out[bg] + (1 - dim) * _checkerboard(img.shape[:2])[bg]
    return out


def _contours(out: np.ndarray, mask: np.ndarray, rgb: Tuple[int, int, int], thickness: int) -> None:
    cnts, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, cnts, -1, rgb, thickness, lineType=cv2.LINE_AA)


def mask_overlay(image: ImageLike, mask: np.ndarray, rgb: Tuple[int, int, int] = (255, 40, 40),
                 dim: float = 0.25, max_side: Optional[int] = 1024) -> np.ndarray:
    """The image with its background faded into a checkerboard and the mask's outline drawn in ``rgb``."""
    img = as_rgb(image, max_side)
    m = _fit_map(np.asarray(mask).astype(np.uint8), img.shape[:2]).astype(bool)
    out = np.clip(_background(img, m, dim) + 0.5, 0, 255).astype(np.uint8)
    _contours(out, m, rgb, max(1, round(max(img.shape[:2]) / 300)))
    return out


def parts_overlay(image: ImageLike, parts: np.ndarray, num_parts: int, alpha: float = 0.5, dim: float = 0.25,
                  max_side: Optional[int] = 1024) -> np.ndarray:
    """Parts (``HxW`` ids, -1 background) blended in their colours over the image; background faded."""
    img = as_rgb(image, max_side)
    p = _fit_map(np.asarray(parts).astype(np.int16), img.shape[:2])
    fg = p >= 0
    out = _background(img, fg, dim)
    pal = np.array([colour(i) for i in range(max(num_parts, 1))], np.float32)
    out[fg] = (1 - alpha) * out[fg] + alpha * pal[p[fg] % len(pal)]
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    for i in range(num_parts):  # outlines per part (a loop over parts, not pixels)
        _contours(out, p == i, (255, 255, 255), 1)
    return out


def _marker(out: np.ndarray, xy: Tuple[float, float], rgb: Tuple[int, int, int], r: int) -> None:
    c = (int(round(xy[0])), int(round(xy[1])))
    cv2.circle(out, c, r + 2, (255, 255, 255), -1, lineType=cv2.LINE_AA)
    cv2.circle(out, c, r, rgb, -1, lineType=cv2.LINE_AA)


def points_overlay(image: ImageLike, points: np.ndarray, max_side: Optional[int] = 1024,
                   radius: Optional[int] = None) -> np.ndarray:
    """Points ``Nx2 (x, y)`` in the image's original pixels drawn as filled circles, colour i for point i."""
    img = as_rgb(image, max_side)
    H0 = (image.height if isinstance(image, Image.Image) else np.asarray(image).shape[0])
    s = img.shape[0] / H0
    out = img.copy()
    r = radius or max(3, round(max(img.shape[:2]) / 120))
    for i, p in enumerate(np.asarray(points, dtype=np.float64).reshape(-1, 2)):
        _marker(out, (p[0] * s, p[1] * s), colour(i), r)
    return out


def correspondence_image(image_a: ImageLike, image_b: ImageLike, points_a: np.ndarray, points_b: np.ndarray,
                         height: int = 512, gap: int = 8, lines: bool = True) -> np.ndarray:
    """Images A and B side by side (scaled to ``height``), pair i marked in colour i in both, joined by a line
    of the same colour. Points are ``Nx2 (x, y)`` in each image's ORIGINAL pixels."""
    pa, pb = np.asarray(points_a, np.float64).reshape(-1, 2), np.asarray(points_b, np.float64).reshape(-1, 2)
    if len(pa) != len(pb):
        raise InvalidArgumentError(f"{len(pa)} points in A but {len(pb)} in B")
    a, b = as_rgb(image_a), as_rgb(image_b)
    sa, sb = height / a.shape[0], height / b.shape[0]
    a = cv2.resize(a, (max(1, round(a.shape[1] * sa)), height), interpolation=cv2.INTER_AREA)
    b = cv2.resize(b, (max(1, round(b.shape[1] * sb)), height), interpolation=cv2.INTER_AREA)
    out = np.full((height, a.shape[1] + gap + b.shape[1], 3), 255, np.uint8)
    out[:, :a.shape[1]] = a
    off = a.shape[1] + gap
    out[:, off:] = b
    r = max(3, height // 80)
    qa, qb = pa * sa, pb * sb + np.array([off, 0.0])
    if lines:
        for i, (p, q) in enumerate(zip(qa, qb)):
            cv2.line(out, (int(round(p[0])), int(round(p[1]))), (int(round(q[0])), int(round(q[1]))), colour(i),
                     max(1, height // 256), lineType=cv2.LINE_AA)
    for i, (p, q) in enumerate(zip(qa, qb)):
        _marker(out, tuple(p), colour(i), r)
        _marker(out, tuple(q), colour(i), r)
    return out


def caption(picture: np.ndarray, text: str, height: int = 28) -> np.ndarray:
    """``picture`` with a white band on top holding ``text`` (black)."""
    band = np.full((height, picture.shape[1], 3), 255, np.uint8)
    cv2.putText(band, text, (6, height - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([band, picture], axis=0)


def pca_rgb(components: np.ndarray, grid: TokenGrid, rgb: Sequence[int] = (-3, -2, -1),
            max_side: Optional[int] = 1024) -> np.ndarray:
    """Three PCA components (``h x w x n``; ``rgb`` picks them, default the last three as the reference) each
    min-max scaled to [0, 255] over the image, shown at the image's original size (fit to ``max_side``), every
    pixel taking its nearest token's colour (through ``grid``)."""
    comp = np.asarray(components, np.float32)
    if comp.shape[-1] < 3:
        comp = np.concatenate([comp, np.zeros(comp.shape[:-1] + (3 - comp.shape[-1],), np.float32)], axis=-1)
        rgb = (0, 1, 2)
    c = comp[..., list(rgb)].reshape(-1, 3)
    lo, hi = c.min(0), c.max(0)
    c = (c - lo) / np.where(hi > lo, hi - lo, 1.0)
    tok = np.clip(c * 255 + 0.5, 0, 255).astype(np.uint8)
    shown = dataclasses.replace(grid, image_hw=fit_size(grid.original_hw, max_side))
    return tokens_to_image(tok, shown, where="image")


# --------------------------------------------------------------------------------------------------- files
def save_rgb(path: Union[str, Path], rgb: np.ndarray) -> None:
    """Write an ``HxWx3`` uint8 RGB picture as PNG."""
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(path)


def save_mask(path: Union[str, Path], mask: np.ndarray) -> None:
    """Write a binary mask as an 8-bit greyscale PNG (0 background, 255 foreground), original resolution."""
    Image.fromarray(np.where(np.asarray(mask, bool), 255, 0).astype(np.uint8)).save(path)


def save_labels(path: Union[str, Path], labels: np.ndarray) -> None:
    """Write a label map (-1 background, 0..P-1 parts) as an indexed PNG holding ``label + 1`` (0 = background,
    black), with the part colours of :data:`COLOURS` as its palette."""
    lab = np.asarray(labels).astype(np.int32) + 1
    if lab.min() < 0 or lab.max() > 255:
        raise InvalidArgumentError("labels must lie in -1..254")
    img = Image.frombytes("P", (lab.shape[1], lab.shape[0]), np.ascontiguousarray(lab, dtype=np.uint8).tobytes())
    pal = np.zeros((256, 3), np.uint8)
    pal[1:] = np.array([colour(i) for i in range(255)], np.uint8)
    img.putpalette(pal.reshape(-1).tolist())
    img.save(path)


def heatmap_overlay(image: ImageLike, values: np.ndarray, alpha: float = 0.6,
                    max_side: Optional[int] = 1024) -> np.ndarray:
    """A map ``HxW`` (the image's size) min-max scaled and coloured (cividis) over the image."""
    img = as_rgb(image, max_side)
    v = np.asarray(values, np.float32)
    lo, hi = float(v.min()), float(v.max())
    u8 = np.clip((v - lo) / (hi - lo if hi > lo else 1.0) * 255 + 0.5, 0, 255).astype(np.uint8)
    u8 = cv2.resize(u8, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
    colours = cv2.applyColorMap(u8, cv2.COLORMAP_CIVIDIS)[..., ::-1].astype(np.float32)
    return np.clip((1 - alpha) * img + alpha * colours + 0.5, 0, 255).astype(np.uint8)


def discovery_overlay(image: ImageLike, mask: np.ndarray, box: Sequence[float], seed_xy: Sequence[float],
                      max_side: Optional[int] = 1024, rgb: Tuple[int, int, int] = (255, 40, 40)) -> np.ndarray:
    """:func:`mask_overlay` with the object box (``x0, y0, x1, y1`` original pixels, exclusive maxima) drawn in
    yellow and the seed marked."""
    out = mask_overlay(image, mask, rgb=rgb, max_side=max_side)
    H0 = image.height if isinstance(image, Image.Image) else np.asarray(image).shape[0]
    s = out.shape[0] / H0
    x0, y0, x1, y1 = (float(c) * s for c in box)
    t = max(2, round(max(out.shape[:2]) / 250))
    cv2.rectangle(out, (int(round(x0)), int(round(y0))), (int(round(x1)) - 1, int(round(y1)) - 1),
                  (255, 220, 0), t, lineType=cv2.LINE_AA)
    _marker(out, (seed_xy[0] * s, seed_xy[1] * s), (30, 80, 255), max(3, round(max(out.shape[:2]) / 120)))
    return out


def _crop_tile(image: ImageLike, xy: Sequence[float], side: float, tile: int, rgb: Tuple[int, int, int],
               label: str) -> np.ndarray:
    """A ``tile x tile`` crop of ``side`` original pixels centred on ``xy`` (grey outside the image), the
    location marked and ``label`` written underneath."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    x, y = float(xy[0]), float(xy[1])
    box = (round(x - side / 2), round(y - side / 2), round(x + side / 2), round(y + side / 2))
    crop = Image.new("RGB", (box[2] - box[0], box[3] - box[1]), (128, 128, 128))
    crop.paste(img.crop(box).convert("RGB"), (0, 0))  # PIL fills outside the image with black; redo the fill
    inside = Image.new("L", crop.size, 0)
    inside.paste(255, (max(0, -box[0]), max(0, -box[1]), min(crop.width, img.width - box[0]),
                       min(crop.height, img.height - box[1])))
    crop = Image.composite(crop, Image.new("RGB", crop.size, (128, 128, 128)), inside)
    out = np.asarray(crop.resize((tile, tile), Image.BILINEAR)).copy()
    c = ((x - box[0]) * tile / crop.width, (y - box[1]) * tile / crop.height)
    cv2.circle(out, (round(c[0]), round(c[1])), max(4, tile // 14), (255, 255, 255), 3, lineType=cv2.LINE_AA)
    cv2.circle(out, (round(c[0]), round(c[1])), max(4, tile // 14), rgb, 2, lineType=cv2.LINE_AA)
    foot = np.full((22, tile, 3), 255, np.uint8)
    cv2.putText(foot, label[: max(4, tile // 5)], (3, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.37, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([out, foot])


def contact_sheet(query: ImageLike, query_xy: Sequence[float], matches: Sequence[Tuple[ImageLike, Sequence[float], str]],
                  side: float, tile: int = 160, columns: int = 6) -> np.ndarray:
    """The query location (first tile, yellow mark) and each match ``(image, (x, y), label)`` as crops of
    ``side`` original pixels around the location (red mark), ``columns`` tiles a row."""
    tiles = [_crop_tile(query, query_xy, side, tile, (255, 200, 0), "query")]
    tiles += [_crop_tile(im, xy, side, tile, (230, 25, 25), label) for im, xy, label in matches]
    rows = []
    for i in range(0, len(tiles), columns):
        row = tiles[i:i + columns]
        row += [np.full_like(tiles[0], 255)] * (columns - len(row)) if len(tiles) > columns else []
        rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in row], 1))
    return np.concatenate(rows)
