"""All drawing of the image applications (the algorithm modules never draw): mask and part overlays,
correspondence lines in matching colours, PCA as RGB, and the raw mask / label PNGs.

Pictures are ``HxWx3`` uint8 RGB arrays at the image's original size, or scaled down to fit ``max_side``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from PIL import Image

from densevit.errors import InvalidArgumentError
from densevit.io.files import atomic_write
from densevit.models.grid import TokenGrid

from .common import tokens_to_image

__all__ = ["COLOURS", "colour", "fit_size", "as_rgb", "mask_overlay", "parts_overlay", "correspondence_image",
           "heatmap_overlay", "discovery_overlay", "contact_sheet",
           "points_overlay", "pca_rgb", "pca_panel", "save_rgb", "save_mask", "save_labels", "label_banner",
           "legend_strip", "with_legend", "colour_bar"]

BOX_RGB = (255, 220, 0)            # object discovery: the box
SEED_RGB = (30, 80, 255)           # and the seed
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


_FONT = cv2.FONT_HERSHEY_SIMPLEX
Legend = Sequence[Tuple[Optional[Tuple[int, int, int]], str]]


def _text_scale(width: int) -> Tuple[float, int]:
    """Font scale and thickness for a picture ``width`` pixels wide (readable from 300 to 2000 pixels)."""
    scale = min(1.0, max(0.4, width / 1400))
    return scale, max(1, round(scale * 2))


def label_banner(out: np.ndarray, text: str) -> np.ndarray:
    """``text`` written on ``out`` (in place) in its top-left corner, white on a dark box."""
    scale, th = _text_scale(out.shape[1])
    (tw, tht), base = cv2.getTextSize(text, _FONT, scale, th)
    pad = max(4, tht // 2)
    cv2.rectangle(out, (0, 0), (tw + 2 * pad, tht + base + 2 * pad), (20, 20, 20), -1)
    cv2.putText(out, text, (pad, pad + tht), _FONT, scale, (255, 255, 255), th, cv2.LINE_AA)
    return out


def legend_strip(width: int, entries: Legend, caption: str = "") -> np.ndarray:
    """A white strip ``width`` pixels wide: ``caption`` then each ``(colour, text)`` entry (a swatch of the
    colour, or none for None), wrapped onto as many rows as needed."""
    scale, th = _text_scale(width)
    (_, tht), base = cv2.getTextSize("Ag", _FONT, scale, th)
    row_h, pad, sw = tht + base + 10, 8, tht + 2
    rows: List[List[Tuple[Optional[Tuple[int, int, int]], str, int]]] = [[]]
    for word in caption.split():            # the caption wrapped by words, on rows of its own
        line = f"{rows[-1][0][1]} {word}" if rows[-1] else word
        if rows[-1] and cv2.getTextSize(line, _FONT, scale, th)[0][0] > width - 2 * pad:
            rows.append([(None, word, pad)])
        else:
            rows[-1] = [(None, line, pad)]
    if caption and entries:
        rows.append([])
    items = list(entries)
    x = pad
    for rgb, text in items:
        w = cv2.getTextSize(text, _FONT, scale, th)[0][0] + (sw + 6 if rgb is not None else 0) + 3 * pad
        if rows[-1] and x + w > width:
            rows.append([])
            x = pad
        rows[-1].append((rgb, text, x))
        x += w
    rows = [r for r in rows if r]
    strip = np.full((len(rows) * row_h + pad, width, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        y = pad + r * row_h + tht
        for rgb, text, x0 in row:
            if rgb is not None:
                cv2.rectangle(strip, (x0, y - tht), (x0 + sw, y + 1), tuple(int(c) for c in rgb), -1)
                cv2.rectangle(strip, (x0, y - tht), (x0 + sw, y + 1), (60, 60, 60), 1)
                x0 += sw + 6
            cv2.putText(strip, text, (x0, y), _FONT, scale, (20, 20, 20), th, cv2.LINE_AA)
    return strip


def with_legend(img: np.ndarray, entries: Legend, caption: str = "") -> np.ndarray:
    """``img`` with a :func:`legend_strip` below it."""
    return np.concatenate([img, legend_strip(img.shape[1], entries, caption)], axis=0)


def colour_bar(width: int, lo: float, hi: float, title: str, colormap: int = cv2.COLORMAP_CIVIDIS) -> np.ndarray:
    """A horizontal colour bar ``width`` pixels wide: ``title``, the colormap from ``lo`` (left) to ``hi``."""
    scale, th = _text_scale(width)
    (_, tht), base = cv2.getTextSize("Ag", _FONT, scale, th)
    pad, bar_h = 8, max(10, tht)
    lo_s, hi_s = f"{lo:.3g}", f"{hi:.3g}"
    lw = cv2.getTextSize(lo_s, _FONT, scale, th)[0][0]
    hw = cv2.getTextSize(hi_s, _FONT, scale, th)[0][0]
    strip = np.full((tht + base + bar_h + 3 * pad, width, 3), 255, np.uint8)
    cv2.putText(strip, title, (pad, pad + tht), _FONT, scale, (20, 20, 20), th, cv2.LINE_AA)
    x0, x1 = 2 * pad + lw, width - 2 * pad - hw
    if x1 - x0 < max(8, width // 4):           # too narrow for the labels beside the bar: the bar alone
        x0, x1 = 0, width
    ramp = np.linspace(0, 255, x1 - x0).astype(np.uint8)[None]
    bar = cv2.applyColorMap(np.repeat(ramp, bar_h, axis=0), colormap)[..., ::-1]
    y0 = 2 * pad + tht + base
    strip[y0:y0 + bar_h, x0:x1] = bar
    ty = y0 + bar_h // 2 + tht // 2
    if x0 > 0:
        cv2.putText(strip, lo_s, (pad, ty), _FONT, scale, (20, 20, 20), th, cv2.LINE_AA)
        cv2.putText(strip, hi_s, (x1 + pad, ty), _FONT, scale, (20, 20, 20), th, cv2.LINE_AA)
    return strip


def mask_overlay(image: ImageLike, mask: np.ndarray, rgb: Tuple[int, int, int] = (255, 40, 40),
                 dim: float = 0.25, max_side: Optional[int] = 1024) -> np.ndarray:
    """The image with its background faded into a checkerboard and the mask's outline drawn in ``rgb``; a mask
    that is the whole image (whose outline would be a thin frame) or empty says so on the picture."""
    img = as_rgb(image, max_side)
    m = _fit_map(np.asarray(mask).astype(np.uint8), img.shape[:2]).astype(bool)
    out = np.clip(_background(img, m, dim) + 0.5, 0, 255).astype(np.uint8)
    _contours(out, m, rgb, max(1, round(max(img.shape[:2]) / 300)))
    full = bool(np.asarray(mask).all())
    if full or not np.asarray(mask).any():
        label_banner(out, "100 % foreground (the mask is the whole image)" if full else "no foreground")
    return out


def parts_overlay(image: ImageLike, parts: np.ndarray, num_parts: int, alpha: float = 0.5, dim: float = 0.25,
                  max_side: Optional[int] = 1024, legend: bool = True, empty: Sequence[int] = ()) -> np.ndarray:
    """Parts (``HxW`` ids, -1 background) blended in their colours over the image; background faded; with
    ``legend`` a strip below names each part's colour (parts in ``empty``, empty in every image of the set,
    are named so)."""
    img = as_rgb(image, max_side)
    p = _fit_map(np.asarray(parts).astype(np.int16), img.shape[:2])
    fg = p >= 0
    out = _background(img, fg, dim)
    pal = np.array([colour(i) for i in range(max(num_parts, 1))], np.float32)
    out[fg] = (1 - alpha) * out[fg] + alpha * pal[p[fg] % len(pal)]
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    for i in range(num_parts):  # outlines per part (a loop over parts, not pixels)
        _contours(out, p == i, (255, 255, 255), 1)
    if not legend:
        return out
    gone = set(int(i) for i in empty)
    entries = [(colour(i), f"part {i + 1}" + (" (empty in every image)" if i in gone else ""))
               for i in range(num_parts)]
    return with_legend(out, [(None, "parts:")] + entries)


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
    _mark_shared(out, qa, r)
    _mark_shared(out, qb, r)
    return out


def _mark_shared(out: np.ndarray, pts: np.ndarray, r: int) -> None:
    """Points of ``pts`` that land on one spot (within a marker) drawn as a ringed marker with their count
    (``x3``), so no point hides another."""
    if len(pts) < 2:
        return
    key = np.round(pts / max(1, r)).astype(np.int64)
    _, first, inverse, counts = np.unique(key, axis=0, return_index=True, return_inverse=True, return_counts=True)
    scale, th = _text_scale(out.shape[1])
    for g in np.flatnonzero(counts > 1):
        c = tuple(int(round(v)) for v in pts[first[g]])
        cv2.circle(out, c, r + 5, (0, 0, 0), 2, lineType=cv2.LINE_AA)
        cv2.circle(out, c, r + 8, (255, 255, 255), 2, lineType=cv2.LINE_AA)
        text = f"x{counts[g]}"
        org = (c[0] + r + 10, c[1] + r // 2)
        cv2.putText(out, text, org, _FONT, scale, (255, 255, 255), th + 2, cv2.LINE_AA)
        cv2.putText(out, text, org, _FONT, scale, (0, 0, 0), th, cv2.LINE_AA)


def pca_panel(image: ImageLike, token_map: np.ndarray, caption: str, gap: int = 8) -> np.ndarray:
    """The photo beside its token map (both at the map's size), with ``caption`` below."""
    img = cv2.resize(as_rgb(image), (token_map.shape[1], token_map.shape[0]), interpolation=cv2.INTER_AREA)
    row = np.full((token_map.shape[0], 2 * token_map.shape[1] + gap, 3), 255, np.uint8)
    row[:, :token_map.shape[1]] = img
    row[:, token_map.shape[1] + gap:] = token_map
    return with_legend(row, [], caption)


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
def save_png(path: Union[str, Path], img: Image.Image) -> None:
    """Write a PIL image as PNG through the atomic writer (never a partial file; one-line errors)."""
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def save_rgb(path: Union[str, Path], rgb: np.ndarray) -> None:
    """Write an ``HxWx3`` uint8 RGB picture as PNG."""
    save_png(path, Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)))


def save_mask(path: Union[str, Path], mask: np.ndarray) -> None:
    """Write a binary mask as an 8-bit greyscale PNG (0 background, 255 foreground), original resolution."""
    save_png(path, Image.fromarray(np.where(np.asarray(mask, bool), 255, 0).astype(np.uint8)))


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
    save_png(path, img)


def heatmap_overlay(image: ImageLike, values: np.ndarray, alpha: float = 0.6,
                    max_side: Optional[int] = 1024, title: Optional[str] = None) -> np.ndarray:
    """A map ``HxW`` (the image's size) min-max scaled and coloured (cividis) over the image; with ``title`` a
    colour bar below it, from the map's minimum to its maximum."""
    img = as_rgb(image, max_side)
    v = np.asarray(values, np.float32)
    lo, hi = float(v.min()), float(v.max())
    u8 = np.clip((v - lo) / (hi - lo if hi > lo else 1.0) * 255 + 0.5, 0, 255).astype(np.uint8)
    u8 = cv2.resize(u8, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
    colours = cv2.applyColorMap(u8, cv2.COLORMAP_CIVIDIS)[..., ::-1].astype(np.float32)
    out = np.clip((1 - alpha) * img + alpha * colours + 0.5, 0, 255).astype(np.uint8)
    if title is None:
        return out
    return np.concatenate([out, colour_bar(out.shape[1], lo, hi, title)], axis=0)


def discovery_overlay(image: ImageLike, mask: np.ndarray, box: Sequence[float], seed_xy: Sequence[float],
                      max_side: Optional[int] = 1024, rgb: Tuple[int, int, int] = (255, 40, 40),
                      legend: bool = True) -> np.ndarray:
    """:func:`mask_overlay` with the object box (``x0, y0, x1, y1`` original pixels, exclusive maxima) drawn in
    yellow and the seed marked in blue; with ``legend`` a strip below names the three marks."""
    out = mask_overlay(image, mask, rgb=rgb, max_side=max_side)
    H0 = image.height if isinstance(image, Image.Image) else np.asarray(image).shape[0]
    s = out.shape[0] / H0
    x0, y0, x1, y1 = (float(c) * s for c in box)
    t = max(2, round(max(out.shape[:2]) / 250))
    cv2.rectangle(out, (int(round(x0)), int(round(y0))), (int(round(x1)) - 1, int(round(y1)) - 1),
                  BOX_RGB, t, lineType=cv2.LINE_AA)
    _marker(out, (seed_xy[0] * s, seed_xy[1] * s), SEED_RGB, max(3, round(max(out.shape[:2]) / 120)))
    if not legend:
        return out
    return with_legend(out, [(rgb, "object mask (outline)"), (BOX_RGB, "object box"), (SEED_RGB, "seed patch")])


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
