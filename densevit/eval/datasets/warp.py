"""Synthetic correspondence pairs with exact ground truth: a real image and a randomly warped copy of it.

The warp is kornia's augmentation pipeline (horizontal flip, affine rotation/scale/translation, perspective,
resized crop; then photometric changes that move no pixel). Its 3x3 transform is exact, so keypoints sampled on
the source (on the object mask when the source has one) have known targets. Coordinates follow
:mod:`densevit.models.grid` (continuous, (0, 0) = image corner); kornia's matrices act on pixel indices (pixel
centres at integers), hence the half-pixel shifts in :func:`apply_homography`.

Default sources: the two shared photographs (cat, ibex; the object is the whole image) and DAVIS-2016 frames
with their ground-truth masks (keypoints on the object, box = mask box), all from ``densevit.io.paths.shared_dir()``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ...errors import DensevitError
from ...io.images import as_pil, open_image
from ...io.paths import shared_dir


@dataclass(frozen=True)
class WarpConfig:
    """Strength of the random warps (kornia.augmentation parameters) and keypoints per pair."""

    flip_p: float = 0.5                             # horizontal flip probability
    degrees: float = 25.0                           # rotation uniform in [-degrees, degrees]
    scale: Tuple[float, float] = (0.8, 1.25)        # affine scale range
    translate: float = 0.1                          # affine translation (fraction of the size)
    perspective: float = 0.25                       # perspective distortion scale
    perspective_p: float = 0.5                      # perspective probability
    crop_scale: Tuple[float, float] = (0.6, 1.0)    # resized-crop area fraction
    photometric: bool = True                        # colour jitter, blur, noise, greyscale on the target
    num_points: int = 20                            # keypoints per pair (fewer if few land inside the target)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class WarpSource:
    """A source image (RGB PIL) with an optional object mask (``HxW`` bool)."""

    name: str
    category: str
    image: Image.Image
    mask: Optional[torch.Tensor] = None


@dataclass
class WarpPair:
    """A source image, its warped copy and exact correspondences. Keypoints ``Nx2 (x, y)`` float64 in each
    image's pixels; boxes ``(x1, y1, x2, y2)``; ``homography`` maps source to target continuous coordinates."""

    name: str
    category: str
    source: str
    seed: int
    src_image: Image.Image
    trg_image: Image.Image
    src_kps: torch.Tensor
    trg_kps: torch.Tensor
    src_bbox: Tuple[float, float, float, float]
    trg_bbox: Tuple[float, float, float, float]
    homography: torch.Tensor
    flags: Dict[str, int] = field(default_factory=dict)
    params: Dict[str, float] = field(default_factory=dict)

    @property
    def src_hw(self) -> Tuple[int, int]:
        return self.src_image.height, self.src_image.width

    @property
    def trg_hw(self) -> Tuple[int, int]:
        return self.trg_image.height, self.trg_image.width


# ---------------------------------------------------------------------------------------------- sources
def load_source_image(path: Union[str, Path], max_side: Optional[int] = 512) -> Image.Image:
    """Read an image as RGB with its longer side reduced to ``max_side`` (Lanczos; JPEG draft decoding)."""
    with open_image(path) as img:
        if max_side:
            img.draft("RGB", (max_side, max_side))
        img = as_pil(img)
    if max_side and max(img.size) > max_side:
        f = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.LANCZOS)
    return img


def load_mask(path: Union[str, Path], size_wh: Tuple[int, int]) -> torch.Tensor:
    """A binary mask (any non-zero pixel is object) resized (nearest) to ``size_wh``: ``HxW`` bool."""
    with open_image(path) as m:
        m = m.convert("L").resize(size_wh, Image.NEAREST)
    return torch.from_numpy(np.asarray(m) > 0)


def default_sources(root: Optional[Union[str, Path]] = None, max_side: int = 512, davis_frames: Sequence[int] = (0,),
                    photos: bool = True, davis: bool = True) -> List[WarpSource]:
    """The shared photographs (``data/images/*.jpg``) and, for each DAVIS-2016 sequence, the given frame
    indices with their masks (``data/davis2016``), under ``root`` (default: the shared folder)."""
    root = Path(root) if root is not None else shared_dir()
    out: List[WarpSource] = []
    if photos:
        for p in sorted((root / "data" / "images").glob("*.jpg")):
            out.append(WarpSource(p.stem, p.stem, load_source_image(p, max_side)))
    if davis:
        jpeg = root / "data" / "davis2016" / "JPEGImages" / "480p"
        ann = root / "data" / "davis2016" / "Annotations" / "480p"
        for seq in sorted(d.name for d in jpeg.iterdir() if d.is_dir()) if jpeg.is_dir() else []:
            frames = sorted((jpeg / seq).glob("*.jpg"))
            for f in davis_frames:
                if f >= len(frames):
                    continue
                img = load_source_image(frames[f], max_side)
                mask_path = ann / seq / f"{frames[f].stem}.png"
                mask = load_mask(mask_path, img.size) if mask_path.is_file() else None
                if mask is not None and not mask.any():
                    mask = None
                out.append(WarpSource(f"{seq}_{frames[f].stem}", f"davis:{seq}", img, mask))
    if not out:
        raise DensevitError(f"no source images found under {root / 'data'}")
    return out


# ---------------------------------------------------------------------------------------------- geometry
def apply_homography(H: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Map ``Nx2`` continuous coordinates through a kornia transform ``H`` (3x3, acting on pixel indices)."""
    xy = torch.as_tensor(xy, dtype=torch.float64).reshape(-1, 2)
    p = torch.cat([xy - 0.5, torch.ones_like(xy[:, :1])], dim=1) @ H.double().T
    return p[:, :2] / p[:, 2:3] + 0.5


def _jacobian(H: torch.Tensor, xy: Tuple[float, float]) -> torch.Tensor:
    """2x2 Jacobian of the homography at ``xy`` (continuous coordinates)."""
    H = H.double()
    p = torch.tensor([xy[0] - 0.5, xy[1] - 0.5, 1.0], dtype=torch.float64)
    w = H[2] @ p
    u = H[:2] @ p
    return (H[:2, :2] * w - u[:, None] * H[2, :2][None, :]) / (w * w)


def warp_flags(H: torch.Tensor, center_xy: Tuple[float, float]) -> Tuple[Dict[str, int], Dict[str, float]]:
    """Breakdown flags of a warp at a point: ``mirror`` (0/1), ``scale_variation`` and ``rotation`` (0 small,
    1 medium, 2 large: |log2 scale| < 0.15 / < 0.3 / else, |angle| < 10 / < 20 / else degrees) and
    ``perspective`` (0/1); plus the raw ``scale`` and ``angle`` (degrees)."""
    J = _jacobian(H, center_xy)
    det = float(torch.linalg.det(J))
    mirror = det < 0
    if mirror:
        J = J @ torch.diag(torch.tensor([-1.0, 1.0], dtype=torch.float64))
    scale = math.sqrt(abs(det))
    angle = math.degrees(math.atan2(float(J[1, 0] - J[0, 1]), float(J[0, 0] + J[1, 1])))
    ls = abs(math.log2(max(scale, 1e-12)))
    flags = {"mirror": int(mirror), "scale_variation": 0 if ls < 0.15 else 1 if ls < 0.3 else 2,
             "rotation": 0 if abs(angle) < 10 else 1 if abs(angle) < 20 else 2,
             "perspective": int(float(H[2, :2].abs().sum() / H[2, 2].abs()) > 1e-7)}
    return flags, {"scale": scale, "angle": angle}


def _bbox(mask: torch.Tensor) -> Tuple[float, float, float, float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        return (0.0, 0.0, float(mask.shape[1]), float(mask.shape[0]))
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def _pipelines(config: WarpConfig, out_hw: Tuple[int, int]):
    import kornia.augmentation as K

    H, W = out_hw
    ar = W / H
    geometric = K.AugmentationSequential(
        K.RandomHorizontalFlip(p=config.flip_p),
        K.RandomAffine(degrees=config.degrees, translate=(config.translate, config.translate),
                       scale=config.scale, p=1.0),
        K.RandomPerspective(distortion_scale=config.perspective, p=config.perspective_p),
        K.RandomResizedCrop((H, W), scale=config.crop_scale, ratio=(ar * 0.9, ar / 0.9)),
        data_keys=["input"])
    photometric = K.AugmentationSequential(
        K.ColorJitter(0.3, 0.3, 0.3, 0.03, p=0.8),
        K.RandomGrayscale(p=0.1),
        K.RandomGaussianBlur((5, 5), (0.1, 1.5), p=0.3),
        K.RandomGaussianNoise(std=0.02, p=0.3),
        data_keys=["input"]) if config.photometric else None
    return geometric, photometric


def _to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x.clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).numpy())


def make_warp_pair(source: WarpSource, seed: int, config: WarpConfig = WarpConfig(),
                   name: Optional[str] = None) -> WarpPair:
    """Warp ``source`` with the random transform drawn from ``seed`` and sample keypoints with exact targets.

    Keypoints are drawn uniformly on the object mask (or the whole image) and kept when their target falls
    inside the warped image; the target box is the box of the warped mask (or of the warped image area).
    Deterministic for a given ``(source, seed, config)``; the global RNG state is left untouched.
    """
    img = torch.from_numpy(np.asarray(source.image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    _, h, w = img.shape
    mask = source.mask if source.mask is not None else torch.ones(h, w, dtype=torch.bool)
    if tuple(mask.shape) != (h, w) or not mask.any():
        raise DensevitError(f"mask of {source.name} is empty or {tuple(mask.shape)} for an image of {(h, w)}")
    stack = torch.cat([img, mask[None].float(), torch.ones(1, h, w)], dim=0)[None]   # rgb, mask, valid
    geometric, photometric = _pipelines(config, (h, w))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            warped = geometric(stack)
            Hm = geometric.transform_matrix[0].double()
            rgb = warped[:, :3]
            if photometric is not None:
                rgb = photometric(rgb)
    trg_rgb, trg_mask, trg_valid = rgb[0], warped[0, 3] > 0.5, warped[0, 4] > 0.5
    th, tw = trg_rgb.shape[-2:]

    g = torch.Generator().manual_seed(seed)
    cand_n = max(64, 20 * config.num_points)
    fg = torch.nonzero(mask, as_tuple=False)                                         # Mx2 (row, col)
    pick = fg[torch.randint(len(fg), (cand_n,), generator=g)]
    src = pick.flip(1).double() + torch.rand(cand_n, 2, generator=g, dtype=torch.float64)
    trg = apply_homography(Hm, src)
    inside = (trg[:, 0] >= 0) & (trg[:, 0] < tw) & (trg[:, 1] >= 0) & (trg[:, 1] < th)
    ti = trg.floor().long()
    inside &= trg_valid[ti[:, 1].clamp(0, th - 1), ti[:, 0].clamp(0, tw - 1)]
    keep = torch.nonzero(inside).flatten()[: config.num_points]

    center = tuple(float(v) for v in (src[keep].mean(0) if len(keep) else torch.tensor([w / 2, h / 2])))
    flags, params = warp_flags(Hm, center)
    shift = torch.tensor([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]], dtype=torch.float64)
    H_cont = shift @ Hm @ torch.linalg.inv(shift)
    return WarpPair(
        name=name or f"{source.name}-{seed}", category=source.category, source=source.name, seed=seed,
        src_image=source.image, trg_image=_to_pil(trg_rgb), src_kps=src[keep], trg_kps=trg[keep],
        src_bbox=_bbox(mask), trg_bbox=_bbox(trg_mask if source.mask is not None else trg_valid),
        homography=H_cont, flags=flags, params=params)


def make_warp_pairs(sources: Sequence[WarpSource], num_pairs: int, seed: int = 0,
                    config: WarpConfig = WarpConfig()) -> Iterator[WarpPair]:
    """``num_pairs`` pairs cycling over the sources; pair ``i`` is drawn from seed ``seed * 1_000_003 + i`` and
    named ``<i:05d>-<source>``, so any prefix of the sequence is reproducible on its own."""
    if not sources:
        raise DensevitError("no source images for warp pairs")
    for i in range(num_pairs):
        src = sources[i % len(sources)]
        yield make_warp_pair(src, seed * 1_000_003 + i, config, name=f"{i:05d}-{src.name}")
