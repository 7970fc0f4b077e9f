"""densevit-segment: fully unsupervised semantic segmentation of a whole dataset (Leopart's evaluation, CVPR 2022).

    densevit-segment IMAGES... | --voc VOC_ROOT [--split val]  -o OUT  [--store STORE] [--k-fg 200 --k-community 100]

Over-clusters the patch features of every image together (k-means), keeps the clusters the CLS-attention masks vote
foreground, clusters the foreground again and merges those clusters into objects by Infomap community detection on
their co-occurrence graph as the reference does (``--merge louvain``: networkx's Louvain instead;
:mod:`densevit.eval.analysis.unsup_seg`). With ``--voc`` (PASCAL VOC layout:
``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``, ``ImageSets/Segmentation/<split>.txt``) the ground truth
is read, the foreground threshold searched on it as the reference does (unless ``--fg-threshold``), and the
Hungarian-matched mIoU reported. Writes ``labels/<name>.png`` (label map at the original size: 0 background,
objects 1..), ``overlays/<name>.png`` and ``segment.json`` (settings, threshold, communities, metrics, timings).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DensevitError
from ..io.files import atomic_write, check_outputs
from ..io.images import drop_unreadable, gather_images, report_unreadable
from ..options import opt
from .common import OutputOptions, add_backbone_args, add_store_arg, build_source, run_cli
from .flags import add_config_flags, make_parser

PROG = "densevit-segment"


@dataclass(frozen=True)
class SegmentOptions:
    """What densevit-segment clusters and how (defaults: the reference's; ``merge="louvain"`` is densevit's option)."""

    images: Tuple[str, ...] = opt((), "image files and/or folders (or --voc)", positional=True, nargs="*")
    voc: Optional[str] = opt(None, "a PASCAL VOC layout folder: its split's images and ground truth (mIoU)")
    split: str = opt("val", "VOC split (ImageSets/Segmentation/<split>.txt)")
    max_images: Optional[int] = opt(None, "use at most this many images")
    k_fg: int = opt(200, "clusters of the foreground extraction (spherical k-means)", group="clustering")
    k_community: int = opt(100, "clusters of the foreground, merged into objects", group="clustering")
    pca_dim: int = opt(50, "PCA dimensions of the standardised features", group="clustering")
    eval_size: int = opt(100, "side of the label maps the clustering and evaluation work on", group="clustering")
    attn_keep: float = opt(0.65, "share of CLS-attention mass kept as noisy foreground", group="clustering")
    fg_threshold: Optional[float] = opt(None, "cluster precision voted foreground (default: searched on the ground "
                                              "truth as the reference, else the 65 %% background cut)",
                                        group="clustering")
    weight_threshold: float = opt(0.05, "co-occurrence edge weight kept in the graph", group="clustering")
    merge: str = opt("infomap", "community detection merging the clusters: infomap (the reference's) or louvain "
                                "(networkx)", choices=("infomap", "louvain"), group="clustering")
    markov_time: float = opt(1.0, "Infomap Markov time (higher: fewer, larger objects)", group="clustering")
    merge_seed: int = opt(1, "seed of the community detection (Infomap: >= 1)", group="clustering")
    resolution: float = opt(1.0, "Louvain resolution, with --merge louvain (higher: more, smaller objects)",
                            group="clustering")
    seed: int = opt(0, "seed of the k-means clusterings", group="clustering")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(PROG, __doc__)
    groups = {}
    for name, f in SegmentOptions.__dataclass_fields__.items():
        groups.setdefault(f.metadata.get("group"), []).append(name)
    add_config_flags(p, SegmentOptions, only=groups[None])
    add_config_flags(p, OutputOptions, only=["out"])
    add_backbone_args(p, stride="patch", load_size=448, layer=-1, facet="token_norm")
    add_store_arg(p)
    add_config_flags(p, SegmentOptions, only=groups["clustering"], title="clustering")
    add_config_flags(p, OutputOptions, only=["overwrite", "quiet"])
    return p


def read_voc(root: Path, split: str) -> Tuple[List[Path], List[Path]]:
    """Images and ground-truth files of a VOC split, in the split file's order."""
    ids = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not ids.is_file():
        raise DensevitError(f"{ids} not found: --voc needs the PASCAL VOC layout")
    names = [l.strip() for l in ids.read_text().splitlines() if l.strip()]
    imgs = [root / "JPEGImages" / f"{n}.jpg" for n in names]
    gts = [root / "SegmentationClass" / f"{n}.png" for n in names]
    for f in imgs + gts:
        if not f.is_file():
            raise DensevitError(f"{f} is missing from the VOC folder {root}")
    return imgs, gts


def read_gt(paths: Sequence[Path], load: int, size: int) -> np.ndarray:
    """Ground-truth class maps ``N x size x size``: nearest to ``load x load`` then to ``size`` (the reference's
    two steps)."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    out = []
    for p in paths:
        m = Image.open(p)
        m = np.asarray(m if m.mode in ("P", "L") else m.convert("L")).astype(np.int64)
        t = torch.from_numpy(m)[None, None].float()
        t = F.interpolate(F.interpolate(t, size=(load, load), mode="nearest"), size=(size, size), mode="nearest")
        out.append(t[0, 0].long().numpy())
    return np.stack(out)


def gather_features(source, images: Sequence[Path], args, progress: bool):
    """``(N x h x w x D features, N x h x w attention, attention_is_model's)`` of every image on one square grid."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    feats, attn = [], []
    grid = None
    for p in tqdm(images, desc="features", disable=not progress, leave=False):
        if source.runs_model:
            x, g = source.preprocess(p, (args.load_size, args.load_size))
            layer = source.resolve_layer(args.layer)
            last = source.depth - 1
            f = source.extract(x, layers=(layer, last), facets=(args.facet, "attn"), include_cls=True)
            d = f.descriptors[(layer, args.facet)][0, 1:].float().cpu()
            a = f.descriptors[(last, "attn")][0, :, 0, 1:].float().mean(0).cpu()
            h, w = g.shape
        else:
            ft = source.image_features(p, None, args.layer, args.facet, saliency=True)
            d, a = ft.descriptors.float(), ft.saliency.float()
            h, w = ft.grid.shape
        dm, am = d.T.reshape(1, -1, h, w), a.reshape(1, 1, h, w)
        if grid is None:
            grid = (max(h, w), max(h, w)) if not source.runs_model else (h, w)
        if (h, w) != grid:
            dm, am = F.interpolate(dm, size=grid, mode="nearest"), F.interpolate(am, size=grid, mode="nearest")
        feats.append(dm[0].permute(1, 2, 0))
        attn.append(am[0, 0])
    return torch.stack(feats), torch.stack(attn)


PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128],
                    [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195], [128, 128, 0],
                    [255, 215, 180], [0, 0, 128], [128, 128, 128]], dtype=np.uint8)


def _png(path: Path, img) -> Path:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def save_outputs(out: Path, image: Path, name: str, labels: np.ndarray) -> List[Path]:
    """The label map at the image's size (indexed PNG) and an overlay."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(Image.open(image)).convert("RGB")
    lab = Image.fromarray(labels.astype(np.uint8), mode="L").resize(img.size, Image.NEAREST)
    arr = np.asarray(lab)
    pal = Image.fromarray(arr, mode="P")
    colours = np.concatenate([PALETTE[np.arange(256) % len(PALETTE)]]).ravel().tolist()
    pal.putpalette(colours)
    over = np.asarray(img).astype(np.float32)
    col = PALETTE[arr % len(PALETTE)].astype(np.float32)
    fg = (arr > 0)[..., None]
    over = np.where(fg, 0.45 * over + 0.55 * col, 0.6 * over).clip(0, 255).astype(np.uint8)
    return [_png(out / "labels" / f"{name}.png", pal), _png(out / "overlays" / f"{name}.png", Image.fromarray(over))]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ..eval.analysis.unsup_seg import unsupervised_segmentation

    if args.voc and args.images:
        raise DensevitError("give images or --voc, not both")
    gts: Optional[List[Path]] = None
    if args.voc:
        images, gts = read_voc(Path(args.voc), args.split)
        unreadable = {}
    else:
        if not args.images:
            raise DensevitError("no input: give images / folders or --voc")
        images = gather_images(args.images)
        images, unreadable = drop_unreadable(PROG, images)
    if args.max_images is not None:
        if args.max_images < 1:
            raise DensevitError("--max-images must be at least 1")
        images = images[: args.max_images]
        gts = gts[: args.max_images] if gts else gts
    if len(images) < 2:
        raise DensevitError("a dataset of at least 2 images is needed")
    for flag in ("k_fg", "k_community", "pca_dim", "eval_size"):
        if getattr(args, flag) < 1:
            raise DensevitError(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0 < args.attn_keep <= 1 or args.weight_threshold < 0 or args.resolution <= 0 or args.markov_time <= 0:
        raise DensevitError("--attn-keep must be in (0, 1], --weight-threshold >= 0, --resolution and "
                            "--markov-time > 0")
    if args.merge == "infomap" and args.merge_seed < 1:
        raise DensevitError("--merge-seed must be at least 1 for Infomap")
    if args.fg_threshold is not None and not 0 <= args.fg_threshold <= 1:
        raise DensevitError("--fg-threshold must be in [0, 1]")
    names = [p.stem for p in images]
    if len(set(names)) != len(names):
        raise DensevitError("two inputs share a file name; their label maps would collide")
    out = Path(args.out)
    planned = [out / "segment.json"] + [out / d / f"{n}.png" for n in names for d in ("labels", "overlays")]
    check_outputs(list(args.images) + ([args.voc] if args.voc else []) + ([args.store] if args.store else []),
                  folders=[out], files=planned, overwrite=args.overwrite)
    source = build_source(args, saliency=True)
    progress = not args.quiet
    t0 = time.perf_counter()
    feats, attn = gather_features(source, images, args, progress)
    t1 = time.perf_counter()
    load = int(args.load_size) if source.runs_model else int(source.settings.get("load_size") or 448)
    gt = read_gt(gts, load, args.eval_size) if gts else None
    res = unsupervised_segmentation(feats, attn, k_fg=args.k_fg, k_community=args.k_community, pca_dim=args.pca_dim,
                                    eval_size=args.eval_size, fg_threshold=args.fg_threshold,
                                    weight_threshold=args.weight_threshold, merge=args.merge,
                                    markov_time=args.markov_time, merge_seed=args.merge_seed,
                                    resolution=args.resolution, seed=args.seed, gt=gt, keep=args.attn_keep,
                                    attn_is_mask=False)
    t2 = time.perf_counter()
    for p, n, lab in zip(images, names, res.labels):
        save_outputs(out, p, n, lab)
    t3 = time.perf_counter()
    summary = {"images": [str(p) for p in images], "source": "model" if source.runs_model else str(args.store),
               "settings": {k: getattr(args, k) for k in SegmentOptions.__dataclass_fields__ if k != "images"},
               "fg_threshold_used": res.threshold, "cluster_to_object": res.communities.tolist(),
               "edges": len(res.edges), **res.metrics,
               "timings_s": {"features": round(t1 - t0, 3), "clustering": round(t2 - t1, 3),
                             "writing": round(t3 - t2, 3), "per_image": round((t3 - t0) / len(images), 4)}}
    atomic_write(out / "segment.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
    msg = f"{len(images)} images: {res.metrics['communities']} objects, foreground threshold {res.threshold:.2f}"
    if "miou" in res.metrics:
        msg += f", mIoU {100 * res.metrics['miou']:.1f} (foreground IoU {100 * res.metrics['fg_iou']:.1f})"
    print(msg)
    print(f"{PROG}: wrote {2 * len(images) + 1} files to {out}", file=sys.stderr)
    return report_unreadable(PROG, unreadable)


entry = run_cli(main, PROG)

if __name__ == "__main__":
    entry()
