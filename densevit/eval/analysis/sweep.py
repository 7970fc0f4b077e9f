"""Best layer for a task: score every (layer, facet) of one or more backbones with task callables.

A *task* is any callable ``task(ext, layer, facet) -> float | Mapping[str, float]`` with a ``name`` attribute
(a mapping must hold ``"score"``; its other numbers are kept as extra columns); higher scores are better.
Tasks may cache per-extractor work since the sweep calls them with one extractor for all its facets and layers
before building the next; a task with a ``prepare(ext, facet, layers)`` method is told the layers of a facet
before they are scored (the built-in correspondence task then extracts all of them in one forward pass per image).
Built-in tasks (:func:`build_task`) wrap the project's own measures: ``warp_pck`` (correspondence PCK on synthetic
warps with exact geometry), ``davis_jf`` (DAVIS J&F of first-mask propagation on a subset) and ``coseg``
(co-segmentation agreement, Jaccard, with DAVIS ground truth); each is available only when the module that measures
it is importable (:func:`available_tasks`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ...errors import DensevitError
from .attention import resolve_layers

SWEEP_FACETS = ("key", "query", "value", "token", "token_norm")
TaskResult = Union[float, Mapping[str, float]]


@dataclass
class FunctionTask:
    """Wrap a plain function ``fn(ext, layer, facet) -> score`` as a named task."""

    name: str
    fn: Callable[..., TaskResult]

    def __call__(self, ext, layer: int, facet: str) -> TaskResult:
        return self.fn(ext, layer, facet)


ModelSource = Union[Callable[[], object], object]


def run_sweep(models: Sequence[Tuple[str, ModelSource]], tasks: Sequence, *, layers: Optional[Iterable[int]] = None,
          facets: Sequence[str] = ("key",), progress: bool = True) -> List[Dict[str, object]]:
    """Score every model x task x facet x layer.

    Args:
        models: ``(label, extractor or zero-argument factory)``; factories are built one at a time and released
            before the next, so only one backbone is in memory.
        tasks: task callables (see the module docstring).
        layers: blocks to score (``None``: all; negative counts from the end).
    Returns:
        records ``{"model", "backbone", "task", "facet", "layer", "score", ...extra numbers}``.
    """
    from tqdm.auto import tqdm

    for f in facets:
        if f not in SWEEP_FACETS:
            raise DensevitError(f"facet {f!r} cannot be swept; choose from {', '.join(SWEEP_FACETS)}")
    if not tasks:
        raise DensevitError("no task to sweep")
    names = [getattr(t, "name", None) or getattr(t, "__name__", "task") for t in tasks]
    records: List[Dict[str, object]] = []
    for label, source in models:
        ext = source() if callable(source) and not hasattr(source, "extract") else source
        ls = resolve_layers(ext.depth, layers)
        bar = tqdm(total=len(tasks) * len(facets) * len(ls), desc=f"sweep {label}", disable=not progress,
                   leave=False)
        for task, name in zip(tasks, names):
            for facet in facets:
                if callable(getattr(task, "prepare", None)):
                    task.prepare(ext, facet, ls)
                for layer in ls:
                    out = task(ext, layer, facet)
                    extra = dict(out) if isinstance(out, Mapping) else {"score": out}
                    if "score" not in extra:
                        raise DensevitError(f"task {name} returned no 'score'")
                    rec = {"model": label, "backbone": ext.spec.name, "task": name, "facet": facet,
                           "layer": int(layer)}
                    rec.update({k: float(v) for k, v in extra.items()})
                    records.append(rec)
                    bar.update(1)
        bar.close()
        del ext
    return records


def best_layers(records: Sequence[Mapping[str, object]]) -> List[Dict[str, object]]:
    """The best-scoring layer per (model, task, facet): ``{"model", "task", "facet", "layer", "score"}``."""
    best: Dict[Tuple[str, str, str], Dict[str, object]] = {}
    for r in records:
        key = (str(r["model"]), str(r["task"]), str(r["facet"]))
        s = float(r["score"])
        if math.isnan(s):
            continue
        if key not in best or s > float(best[key]["score"]):
            best[key] = {"model": key[0], "task": key[1], "facet": key[2], "layer": int(r["layer"]), "score": s}
    return list(best.values())


# ---------------------------------------------------------------------------------------------- feature cache
class LayerFeatureCache:
    """Patch descriptors of several layers of one facet for a set of images, computed in one forward pass per
    image and kept for one ``(extractor, facet, layers)`` at a time (memory: images x layers x T x D)."""

    def __init__(self, load_size: Optional[int]) -> None:
        self.load_size = load_size
        self._sig: Optional[Tuple[int, str, Tuple[int, ...]]] = None
        self._store: Dict[str, Tuple[object, Dict[int, object]]] = {}

    def prepare(self, ext, facet: str, layers: Sequence[int]) -> None:
        """Declare the extractor, facet and layers of the coming :meth:`get` calls (drops other entries)."""
        sig = (id(ext), facet, tuple(sorted(set(int(l) for l in layers))))
        if sig != self._sig:
            self._sig, self._store = sig, {}

    def get(self, ext, facet: str, layer: int, key: str, image) -> Tuple[object, object]:
        """``(descriptors T x D on the extractor's device, TokenGrid)`` of ``image`` (cached under ``key``)."""
        same = self._sig is not None and self._sig[:2] == (id(ext), facet)
        if not same or int(layer) not in self._sig[2]:   # undeclared use: widen (or restart) the layer set
            self.prepare(ext, facet, (list(self._sig[2]) if same else []) + [int(layer)])
        if key not in self._store:
            x, grid = ext.preprocess(image, self.load_size)
            layers = self._sig[2]
            f = ext.extract(x, layers=layers, facets=(facet,), image_hw=grid.image_hw)
            self._store[key] = (grid, {l: f.descriptors[(l, facet)][0] for l in layers})
        grid, by_layer = self._store[key]
        return by_layer[int(layer)], grid


# ---------------------------------------------------------------------------------------------- built-in tasks
class WarpPCKTask:
    """Correspondence PCK on synthetic warps of the given images (exact geometric ground truth).

    Pairs come from :mod:`densevit.eval.datasets.warp` (``num_pairs`` cycling over the images, seeded); source
    keypoints are transferred by descriptor nearest neighbour (:func:`densevit.eval.keypoints.evaluate_pair`) and
    scored with :mod:`densevit.eval.metrics.pck` (per point, ``alpha`` times the target box's longer side).
    """

    name = "warp_pck"

    def __init__(self, images: Sequence, load_size: Optional[int] = 224, num_pairs: Optional[int] = None,
                 alpha: float = 0.1, threshold: str = "bbox", seed: int = 0, image_size: int = 512,
                 points: int = 20, **_) -> None:
        from ..datasets.warp import WarpConfig, WarpSource, load_source_image, make_warp_pairs

        if not images:
            raise DensevitError("the warp_pck task needs at least one image")
        sources = [WarpSource(Path(p).stem if not hasattr(p, "size") else f"image{i}", "images",
                              p if hasattr(p, "size") else load_source_image(p, image_size))
                   for i, p in enumerate(images)]
        n = num_pairs if num_pairs is not None else 2 * len(sources)
        self.pairs = list(make_warp_pairs(sources, n, seed, WarpConfig(num_points=points)))
        self.alpha, self.threshold = float(alpha), threshold
        self.cache = LayerFeatureCache(load_size)

    def prepare(self, ext, facet: str, layers: Sequence[int]) -> None:
        self.cache.prepare(ext, facet, layers)

    def __call__(self, ext, layer: int, facet: str) -> Dict[str, float]:
        from ..keypoints import EvalPair, evaluate_pair
        from ..metrics.pck import summarize

        describe = lambda key, image: self.cache.get(ext, facet, layer, key, image)  # noqa: E731
        records = []
        for wp in self.pairs:
            pair = EvalPair(wp.name, wp.category, f"src:{wp.source}", wp.src_image, f"trg:{wp.name}", wp.trg_image,
                            wp.src_kps, wp.trg_kps, wp.trg_bbox, wp.trg_hw, wp.flags)
            records.append(evaluate_pair(describe, pair))
        row = [r for r in summarize(records, (self.alpha,), self.threshold) if r.group == "all"][0]
        return {"score": row.per_point[self.alpha], "pck_per_image": row.per_image[self.alpha],
                "points": float(row.n_points)}


class DavisJFTask:
    """DAVIS J&F-Mean of first-mask propagation (:mod:`densevit.apps.vos`) on the first ``frames`` frames of a
    few sequences, scored by :mod:`densevit.eval.metrics.davis` (semi-supervised protocol: first and last frames of the
    clip not scored). Frames are resized to a short side of ``short_side`` pixels (a subset for speed)."""

    name = "davis_jf"

    def __init__(self, davis_root, davis_year: str = "2016", davis_sequences: Optional[Sequence[str]] = None,
                 davis_frames: int = 6, load_size: Optional[int] = 224, **_) -> None:
        from ..datasets.davis import DavisDataset

        if davis_frames < 3:
            raise DensevitError("the davis_jf task needs at least 3 frames per sequence "
                                "(the first and last are not scored)")
        ds = DavisDataset(davis_root, year=davis_year, sequences=davis_sequences)
        seqs = list(davis_sequences) if davis_sequences else ds.sequences[:1]
        self.clips = []
        for seq in seqs:
            frames = ds.frames(seq)[:davis_frames]
            gt, _ = ds.ground_truth(seq)
            if len(gt) < len(frames):
                raise DensevitError(f"DAVIS sequence {seq} has fewer annotations than frames")
            self.clips.append((seq, frames, gt[: len(frames)], ds.num_objects(seq)))
        self.short_side = int(load_size or 480)

    def __call__(self, ext, layer: int, facet: str) -> Dict[str, float]:
        from densevit.apps.vos import VOSConfig, segment_video

        from ..metrics.davis import DavisScores, evaluate_semisupervised

        cfg = VOSConfig(short_side=self.short_side, multiple=ext.patch_size, layer=layer, facet=facet)
        scores = DavisScores()
        for seq, frames, gt, n_obj in self.clips:
            pred = np.stack(segment_video(ext, frames, gt[0], cfg))
            J, F = evaluate_semisupervised(gt, pred, n_objects=n_obj)
            scores.add_sequence(seq, J, F)
        row = scores.global_row()
        return {"score": row["J&F-Mean"], "J": row["J-Mean"], "F": row["F-Mean"]}


class CosegTask:
    """Co-segmentation agreement with ground truth: :func:`densevit.apps.coseg.cosegment` (the paper's
    defaults; the layer and facet swept) on a set of ``frames`` frames spread evenly over each DAVIS sequence (one
    set per sequence: one common object), scored by the mean Jaccard index (:func:`densevit.eval.metrics.davis.db_eval_iou`)
    of every frame's mask with its ground-truth foreground (all objects)."""

    name = "coseg"

    def __init__(self, davis_root, davis_year: str = "2016", davis_sequences: Optional[Sequence[str]] = None,
                 davis_frames: int = 6, load_size: Optional[int] = 224, seed: int = 0, **_) -> None:
        from ..datasets.davis import DavisDataset

        if davis_frames < 2:
            raise DensevitError("the coseg task needs at least 2 frames per sequence")
        ds = DavisDataset(davis_root, year=davis_year, sequences=davis_sequences)
        seqs = list(davis_sequences) if davis_sequences else ds.sequences[:1]
        self.sets = []
        for seq in seqs:
            frames = ds.frames(seq)
            gt, _ = ds.ground_truth(seq)
            n = min(len(frames), len(gt))
            idx = sorted(set(np.linspace(0, n - 1, min(davis_frames, n)).round().astype(int).tolist()))
            if len(idx) < 2:
                raise DensevitError(f"DAVIS sequence {seq} has fewer than 2 annotated frames")
            self.sets.append((seq, [frames[i] for i in idx], gt[idx] > 0))
        self.load_size = load_size

    def __call__(self, ext, layer: int, facet: str) -> Dict[str, float]:
        from densevit.apps.coseg import cosegment

        from ..metrics.davis import db_eval_iou

        js, ks = [], []
        for _, frames, gt in self.sets:
            # co-segmentation's own defaults (the reference's k-means seed); --seed draws the warp pairs
            res = cosegment(ext, frames, load_size=self.load_size, layer=layer, facet=facet)
            js.append(np.atleast_1d(db_eval_iou(gt, np.stack(res.masks))))
            ks.append(res.k)
        return {"score": float(np.concatenate(js).mean()), "clusters": float(np.mean(ks))}


def _task_builders() -> Dict[str, Tuple[str, Callable[..., object]]]:
    """name -> (module that must import for the task to be available, builder taking keyword options)."""
    return {
        "warp_pck": ("densevit.eval.datasets.warp", WarpPCKTask),
        "davis_jf": ("densevit.apps.vos", DavisJFTask),
        "coseg": ("densevit.apps.coseg", CosegTask),
    }


def available_tasks() -> List[str]:
    """Built-in task names whose measuring modules are importable.

    A task whose own densevit module is missing is a broken installation (an error, never a silent drop); a task
    whose module needs an optional package that is not installed is left out."""
    import importlib

    out = []
    for name, (module, _) in _task_builders().items():
        try:
            importlib.import_module(module)
        except ImportError as e:
            missing = getattr(e, "name", None) or ""
            if missing == "densevit" or missing.startswith("densevit."):
                raise DensevitError(f"task {name}: its module {module} cannot be imported ({e})") from None
            continue
        out.append(name)
    return out


def known_tasks() -> List[str]:
    """Every built-in task name (available or not)."""
    return list(_task_builders())


def build_task(name: str, **options) -> object:
    """Build a built-in task by name (options are task-specific keywords; unknown ones are ignored)."""
    builders = _task_builders()
    if name not in builders:
        raise DensevitError(f"unknown task {name!r}; choose from {', '.join(builders)}")
    module, builder = builders[name]
    if name not in available_tasks():
        raise DensevitError(f"task {name} needs {module}, which is not available in this installation")
    return builder(**options)
