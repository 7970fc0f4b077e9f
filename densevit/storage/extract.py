"""Dataset extraction into a :mod:`densevit.storage.store`: batched, overlapped, resumable, on one or many processes.

Pipeline per process: a ``torch.utils.data.DataLoader`` decodes and resizes images in worker processes (uint8,
so the hand-over is small), images of one resized shape are batched together (a shard holds one shape), the
model runs in the extractor's dtype and finished shards are written on background threads
(:class:`densevit.runtime.threads.BackgroundWriter`). Under ``torchrun`` (:mod:`densevit.runtime.dist`) rank 0 reads the image
headers, checks the store's settings and decides which shards are missing; the missing shards are dealt to the
ranks balancing their cost (images x input pixels; :func:`densevit.runtime.dist.deal`), each rank writes its own shards,
and rank 0 writes the manifest after all have finished; rank 0 holds the store's lock for the whole job (one
writer per store; :class:`densevit.storage.store.StoreLock`).
A complete shard is never computed again, so rerunning the same command finishes only what is missing. A store
only grows (:func:`plan_store`): another image list adds its images and keeps the stored ones, whose shards are
kept as they are; ``prune`` drops the stored images that are not in the list.
"""
from __future__ import annotations

import math
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..errors import DensevitError
from ..features.extractor import FACETS
from ..features.options import load_size_opt
from ..io.images import (
    IMAGE_SUFFIXES,
    check_min_side,
    not_a_file_or_folder,
    image_size,
    load_resized,
    normalize,
    resized_hw,
    skip_unreadable,
    to_uint8_tensor,
)
from ..models.grid import grid_shape
from ..options import opt
from ..runtime.dist import DistContext
from ..runtime.threads import BackgroundWriter, prefetch_map
from ..io.files import file_fingerprint, key_digest
from .store import FORMAT, STORE_DTYPES, StoreFullError, StoreWriter, tensor_name

__all__ = ["ExtractionConfig", "ExtractionReport", "StorePlan", "gather_dataset", "store_settings", "read_headers",
           "group_shards", "plan_shards", "plan_store", "extract_to_store"]


@dataclass
class ExtractionConfig:
    """What to extract and how. ``layers`` may be negative (resolved against the backbone)."""

    layers: Tuple[int, ...] = opt((11,), "block index, 0-based (-1 = last); several with --store", flag="--layer")
    facets: Tuple[str, ...] = opt(("key",), "facet(s); several with --store (key_rope/query_rope: after the rotary "
                                            "embedding, rotary backbones only)", flag="--facet", choices=FACETS)
    load_size: Optional[int] = load_size_opt(224)
    saliency: bool = opt(False, "also write the CLS-attention saliency map", negatable=False)
    store_dtype: str = opt("float16", "stored descriptor dtype", choices=("float16", "float32"))
    fast_decode: bool = opt(False, "decode large JPEGs at a reduced scale (PIL draft mode) before the exact resize",
                            negatable=False)
    batch_size: int = opt(8, "images per forward pass (one resized shape)")
    workers: int = opt(2, "decoding worker processes per rank (0: in the main one)")
    writers: int = opt(2, "shard-writing threads per rank")
    shard_size: int = opt(256, "images per shard")
    content_hash: bool = opt(False, "identify source images by SHA-256 of their bytes (default: path, size and "
                                    "mtime)", negatable=False)
    overwrite: bool = opt(False, "empty the store first", cli=False)
    prune: bool = opt(False, "remove the stored images that are not in this run's list (and replace stored images "
                             "that have an input's key but another file)", negatable=False)
    progress: bool = opt(True, "progress bar", cli=False)


@dataclass
class ExtractionReport:
    """What one process did; ``seconds`` splits its time into decode (worker CPU time), forward (the model and
    the copies to the host), writing (writer threads' time, summed), waiting (the model idle for input) and
    total wall time; on a GPU also ``gpu``, the GPU time of the forward passes (CUDA events)."""

    images: int = 0
    computed_shards: int = 0
    reused_shards: int = 0
    failed: Dict[str, str] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=lambda: dict(decode=0.0, forward=0.0, write=0.0, wait=0.0,
                                                                     total=0.0))
    per_rank: List[Dict[str, Any]] = field(default_factory=list)  # on rank 0: every rank's images and seconds
    window: List[float] = field(default_factory=list)  # [start, end] of the compute loop, Unix time (seconds)
    change: Dict[str, List[str]] = field(default_factory=dict)  # on rank 0: images kept/added/updated/removed

    def merge(self, other: "ExtractionReport") -> None:
        self.images += other.images
        self.computed_shards += other.computed_shards
        self.failed.update(other.failed)
        for k, v in other.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v
        if other.window:
            self.window = ([min(self.window[0], other.window[0]), max(self.window[1], other.window[1])]
                           if self.window else list(other.window))


# ------------------------------------------------------------------------------------------------ planning
def gather_dataset(inputs: Sequence[str], recursive: bool = False) -> List[Tuple[str, Path]]:
    """``(key, path)`` of every image: files keep their name as key, images in a folder their path relative
    to it (sub-folders too with ``recursive``). Sorted per folder; duplicate keys are an error."""
    out: List[Tuple[str, Path]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(f for f in p.glob(pattern) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DensevitError(f"no images found in folder {p}" + ("" if recursive else " (--recursive?)"))
            out.extend((f.relative_to(p).as_posix(), f) for f in files)
        elif p.is_file():
            out.append((p.name, p))
        else:
            raise DensevitError(not_a_file_or_folder(p))
    if not out:
        raise DensevitError("no input images given")
    keys = [k for k, _ in out]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        a, b = [p for k, p in out if k == dup][:2]
        fix = ("give their common parent folder (with --recursive) or rename one" if a.name != dup or b.name != dup
               or a.parent != Path(dup).parent else "rename one")
        raise DensevitError(f"{a} and {b} would both be stored as {dup!r} (a store keys an image by its path "
                            f"relative to the folder given, a file by its name); {fix}")
    return out


def weights_fingerprint(weights: Optional[str], backbone: str) -> Dict[str, Any]:
    """What identifies the weights in a store's manifest: a file's name, size and SHA-256, ``random``, or the
    backbone's default source (from :func:`~densevit.models.provenance.weights_provenance`)."""
    from ..models.provenance import weights_provenance

    prov = weights_provenance(weights, backbone)
    if prov["source"] == "random":
        return {"source": "random"}
    if prov["source"] == "timm-hub":
        return {"source": "timm-hub", "backbone": backbone}
    return {"source": "file", "name": prov["name"], "size": prov["size"], "sha256": prov["sha256"]}


def store_settings(extractor, cfg: ExtractionConfig, weights: Optional[str]) -> Dict[str, Any]:
    """Everything the stored values depend on (a run with other settings is refused)."""
    if cfg.store_dtype not in STORE_DTYPES:
        raise DensevitError(f"store dtype must be one of {', '.join(STORE_DTYPES)}, got {cfg.store_dtype!r}")
    return {"format": FORMAT, "backbone": extractor.spec.name, "weights": weights_fingerprint(weights, extractor.spec.name),
            "patch_size": extractor.patch_size, "stride": extractor.stride, "load_size": cfg.load_size,
            "depth": extractor.depth,
            "layers": sorted({extractor.resolve_layer(l) for l in cfg.layers}), "facets": sorted(set(cfg.facets)),
            "model_dtype": str(extractor.dtype).replace("torch.", ""), "store_dtype": cfg.store_dtype,
            "saliency": bool(cfg.saliency), "fast_decode": bool(cfg.fast_decode),
            "mean": list(extractor.spec.mean), "std": list(extractor.spec.std)}


def _header(item: Tuple[str, Path], content_hash: bool) -> Tuple[str, Path, Any]:
    key, path = item
    try:
        hw = image_size(path)
        return key, path, (hw, file_fingerprint(path, content_hash))
    except (DensevitError, OSError) as exc:
        return key, path, str(exc)


def read_headers(items: Sequence[Tuple[str, Path]], patch_size: int, stride: int, cfg: ExtractionConfig
                 ) -> Tuple[List[Dict[str, Any]], Dict[str, str]]:
    """Read the image headers only: ``(images, unreadable)``, an image ``{"key", "path", "source", "image_hw"}``
    (input order), ``unreadable`` the images left out, with the reason."""
    images: List[Dict[str, Any]] = []
    unreadable: Dict[str, str] = {}
    for key, path, res in prefetch_map(lambda it: _header(it, cfg.content_hash), items, ahead=64):
        if isinstance(res, str):
            unreadable[key] = res
            continue
        hw, source = res
        try:
            check_min_side(path, hw, patch_size)
        except DensevitError as exc:
            unreadable[key] = str(exc)
            continue
        try:
            grid_shape(resized_hw(hw, cfg.load_size), patch_size, stride)
        except DensevitError as exc:
            unreadable[key] = f"{path}: {exc}"
            continue
        images.append({"key": key, "path": str(path), "source": source, "image_hw": list(hw)})
    return images, unreadable


def group_shards(images: Sequence[Dict[str, Any]], cfg: ExtractionConfig) -> List[Dict[str, Any]]:
    """Group images by resized shape into shards of at most ``cfg.shard_size`` images (deterministic: sorted
    shapes, given order within a shape); a shard is ``{"name", "input_hw", "images"}``, named by its shape, its
    number and a hash of its images' keys and sources."""
    buckets: Dict[Tuple[int, int], List[Dict[str, Any]]] = {}
    for im in images:
        buckets.setdefault(tuple(resized_hw(tuple(im["image_hw"]), cfg.load_size)), []).append(im)
    shards = []
    size = max(1, cfg.shard_size)
    for input_hw in sorted(buckets):
        ims = buckets[input_hw]
        for j in range(0, len(ims), size):
            chunk = ims[j:j + size]
            tag = key_digest({"images": [[im["key"], im["source"]] for im in chunk]})[:10]
            shards.append({"name": f"{input_hw[0]}x{input_hw[1]}-{j // size:05d}-{tag}", "input_hw": list(input_hw),
                           "images": chunk})
    return shards


def plan_shards(items: Sequence[Tuple[str, Path]], patch_size: int, stride: int, cfg: ExtractionConfig
                ) -> Tuple[List[Dict[str, Any]], Dict[str, str]]:
    """The shards of ``items`` alone (:func:`read_headers` then :func:`group_shards`): ``(shards, unreadable)``."""
    images, unreadable = read_headers(items, patch_size, stride, cfg)
    return group_shards(images, cfg), unreadable


@dataclass
class StorePlan:
    """What a run does to a store: ``shards`` (the stored ones first, then the new ones), ``live`` (for each
    stored shard, the images it keeps; an empty list: the shard is removed), ``done`` (complete shards),
    ``unreadable`` (this run's images that could not be read) and ``failed`` (every failure to record)."""

    shards: List[Dict[str, Any]]
    live: Dict[str, List[str]]
    done: List[str]
    unreadable: Dict[str, str]
    failed: Dict[str, str]

    @property
    def pending(self) -> List[Dict[str, Any]]:
        """The shards to compute."""
        done = set(self.done)
        return [s for s in self.shards if s["name"] not in done and self.live.get(s["name"], True) != []]


def _unchanged(im: Mapping[str, Any], content_hash: bool) -> bool:
    """Whether a stored image's file is still the one it was extracted from (header and fingerprint)."""
    _, _, res = _header((im["key"], Path(im["source"].get("path", ""))), content_hash)
    return not isinstance(res, str) and list(res[0]) == list(im["image_hw"]) and res[1] == im["source"]


def plan_store(writer: StoreWriter, items: Sequence[Tuple[str, Path]], patch_size: int, stride: int,
               cfg: ExtractionConfig) -> StorePlan:
    """Plan a run of ``items`` into the store :meth:`StoreWriter.prepare` opened. The store only grows: its
    shards stay as they are (a damaged one is recomputed from its images' files, under its name), images of
    ``items`` it does not hold (or whose file changed) go to new shards, and its other images are kept --
    unless ``cfg.prune``, which drops the stored images that are not in ``items``. An input with the key of a
    stored image from another file is refused without ``prune`` (which replaces it). Deterministic for a given
    store and list, so a rerun after a kill plans the same shards."""
    images, unreadable = read_headers(items, patch_size, stride, cfg)
    prev = writer.previous or {"images": {}, "shards": {}, "failed": {}}
    stored: Dict[str, Any] = prev["images"]
    listed = {k for k, _ in items}

    def keep(key: str) -> bool:
        return key in listed or not cfg.prune

    clash = [im for im in images if im["key"] in stored
             and stored[im["key"]]["source"].get("path") != im["source"]["path"]]
    if clash and not cfg.prune:
        im = clash[0]
        raise DensevitError(f"{len(clash)} input image(s) have the key of a stored image from another file "
                            f"({im['key']}: stored from {stored[im['key']]['source'].get('path')}, given "
                            f"{im['source']['path']}); rename them, or --prune to replace the stored ones")
    given = {im["key"]: im for im in images}
    # after a lost manifest (the stored images recovered from the shard records) the listed images are planned
    # as one new list, so a rerun after a kill computes exactly the shards of an uninterrupted run
    recovered = bool(prev.get("recovered"))
    fresh = [im for im in images if recovered or stored.get(im["key"], {}).get("source") != im["source"]]
    fresh_keys = {im["key"] for im in fresh}
    by_shard: Dict[str, List[str]] = {}
    for key, e in stored.items():
        by_shard.setdefault(e["shard"], []).append(key)
    shards: List[Dict[str, Any]] = []
    live: Dict[str, List[str]] = {}
    done: List[str] = []
    for name in sorted(prev["shards"]):
        alive = sorted(k for k in by_shard.get(name, []) if k not in fresh_keys and keep(k))
        entry = {"name": name, "input_hw": list(prev["shards"][name]["input_hw"]), "images": writer.stored_images(name)}
        shards.append(entry)
        live[name] = alive
        if not alive:                                       # nothing of it is kept: removed at the end
            continue
        if writer.shard_done(name, entry["images"], verify=any(k in listed for k in alive)):
            done.append(name)
            continue
        # damaged (missing, truncated, modified): recomputed from its images' files if they are unchanged
        usable: List[Dict[str, Any]] = []
        for im in entry["images"]:
            k = im["key"]
            if k in given and given[k]["source"] == im["source"]:
                usable.append(given[k])
            elif k not in given and _unchanged(im, cfg.content_hash):
                usable.append({**im, "path": im["source"]["path"]})
        if len(usable) == len(entry["images"]):
            entry["images"] = usable                        # the same shard again, under its name
            continue
        ok = {im["key"] for im in usable}
        lost = [k for k in alive if k not in ok]
        if lost and not cfg.prune:
            raise DensevitError(f"shard {writer.shard_path(name)} is damaged and {len(lost)} of its image(s) cannot "
                                f"be recomputed (their files changed or are gone: {lost[0]}); give them again, or "
                                f"--prune to drop them")
        moved = [im for im in usable if im["key"] in alive]  # its usable images go to new shards
        fresh.extend(moved)
        fresh_keys.update(im["key"] for im in moved)
        live[name] = []
    for s in group_shards(fresh, cfg):
        if s["name"] in live:  # a stored shard of these very images (its name hashes them): this entry replaces it
            shards = [x for x in shards if x["name"] != s["name"]]
            done = [n for n in done if n != s["name"]]
            del live[s["name"]]
        shards.append(s)
        if writer.shard_done(s["name"], s["images"]):
            done.append(s["name"])
    failed = {k: v for k, v in prev.get("failed", {}).items() if k not in listed and keep(k)}
    failed.update(unreadable)
    return StorePlan(shards, live, done, unreadable, failed)


def _space_needed(writer: StoreWriter, pending: Sequence[Dict[str, Any]], tensors: Mapping[str, torch.Tensor]
                  ) -> int:
    """About how many bytes the shards of ``pending`` that are not written yet need, scaled from the tensors of
    the shard that did not fit (per image and per token), plus their records and the manifest."""
    patch, stride = writer.settings["patch_size"], writer.settings["stride"]
    total = 0
    for shard in pending:
        if writer.shard_done(shard["name"], shard["images"], verify=False):
            continue
        n, tokens = len(shard["images"]), math.prod(grid_shape(tuple(shard["input_hw"]), patch, stride))
        for name, t in tensors.items():
            if name == "saliency":
                per_image = [tokens]
            elif name.endswith("/cls"):
                per_image = list(t.shape[1:])
            elif name.endswith("/attn"):
                per_image = [t.shape[1], tokens, tokens]
            else:
                per_image = [tokens, t.shape[-1]]
            total += t.element_size() * n * math.prod(per_image)
        total += 1024 + 512 * n                             # the safetensors header, the record, the manifest
    return total


# ------------------------------------------------------------------------------------------------ decoding
class _DecodeSet(Dataset):
    """Image ``i`` of the rank's work list -> ``(i, uint8 3xHxW or None, error or None, decode seconds)``."""

    def __init__(self, images: Sequence[Dict[str, Any]], load_size: Optional[int], fast: bool) -> None:
        self.images, self.load_size, self.fast = list(images), load_size, fast

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        im = self.images[i]
        t = time.perf_counter()
        try:
            resized, hw = load_resized(im["path"], self.load_size, self.fast)
            if list(hw) != im["image_hw"]:
                raise DensevitError(f"{im['path']} changed since its header was read")
            x, err = to_uint8_tensor(resized), None
        except DensevitError as exc:
            x, err = None, str(exc)
        return i, x, err, time.perf_counter() - t


def _collate(items):
    good = [x for _, x, _, _ in items if x is not None]
    return ([i for i, _, _, _ in items], torch.stack(good) if good else None,
            [(i, e) for i, _, e, _ in items if e is not None], sum(t for *_, t in items))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ extraction
def extract_to_store(extractor, items: Sequence[Tuple[str, Path]], store_root: Path, cfg: ExtractionConfig,
                     weights: Optional[str], ctx: DistContext = DistContext()) -> ExtractionReport:
    """Extract ``items`` (from :func:`gather_dataset`) into the store at ``store_root``, adding them to what it
    holds (:func:`plan_store`); every rank of ``ctx`` calls this, and rank 0 holds the store's lock from the
    plan to the manifest. Returns the merged report on rank 0 (this rank's elsewhere); unreadable images are
    reported in ``report.failed``, and printed as one line each."""
    layers = [extractor.resolve_layer(l) for l in cfg.layers]
    lock_holder: Optional[StoreWriter] = None
    try:
        def prepare() -> Tuple[Dict[str, Any], Any]:
            nonlocal lock_holder
            settings = store_settings(extractor, cfg, weights)
            lock_holder = StoreWriter(store_root, settings)
            lock_holder.prepare(cfg.overwrite)
            return settings, plan_store(lock_holder, items, extractor.patch_size, extractor.stride, cfg)

        settings, plan = ctx.on_main(prepare)
        writer = lock_holder or StoreWriter(store_root, settings)
        pending = plan.pending
        mine = ctx.shard(pending, [len(s["images"]) * s["input_hw"][0] * s["input_hw"][1] for s in pending])
        report = ExtractionReport(reused_shards=len(plan.done) if ctx.is_main else 0)
        if ctx.is_main:
            for key, msg in plan.unreadable.items():
                skip_unreadable("densevit-extract", msg)
            report.failed.update(plan.unreadable)
        _run_shards(extractor, writer, mine, layers, cfg, report, ctx, pending)
        reports = ctx.gather(report)
        if not ctx.is_main:
            return report
        total = ExtractionReport(reused_shards=len(plan.done))
        for r in reports:
            total.merge(r)
        total.seconds["total"] = max(r.seconds["total"] for r in reports)
        total.per_rank = [{"rank": i, "images": r.images, "shards": r.computed_shards, "seconds": r.seconds,
                           "window": r.window, "device": str(extractor.device) if i == ctx.rank else None}
                          for i, r in enumerate(reports)]
        writer.finalize([(s["name"], s["images"]) for s in plan.shards], plan.failed, live=plan.live,
                        prune=cfg.prune)
        total.change = writer.change
        return total
    finally:
        if lock_holder is not None:
            lock_holder.close()


def _run_shards(extractor, writer: StoreWriter, shards: List[Dict[str, Any]], layers: List[int],
                cfg: ExtractionConfig, report: ExtractionReport, ctx: DistContext,
                job: Sequence[Dict[str, Any]] = ()) -> None:
    """Compute and write ``shards`` (this rank's share of ``job``, the job's pending shards)."""
    t_start, unix_start = time.perf_counter(), time.time()
    images: List[Dict[str, Any]] = []
    batches: List[List[int]] = []
    batch_shard: List[int] = []
    for si, s in enumerate(shards):
        first = len(images)
        images.extend(s["images"])
        for j in range(first, len(images), max(1, cfg.batch_size)):
            batches.append(list(range(j, min(j + cfg.batch_size, len(images)))))
            batch_shard.append(si)
    if not batches:
        report.seconds["total"] = time.perf_counter() - t_start
        report.window = [unix_start, time.time()]
        return
    device = extractor.device
    store_dtype = STORE_DTYPES[cfg.store_dtype]
    facets = sorted(set(cfg.facets))
    loader = DataLoader(_DecodeSet(images, cfg.load_size, cfg.fast_decode), batch_sampler=batches,
                        num_workers=cfg.workers, collate_fn=_collate, worker_init_fn=_worker_init,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if cfg.workers > 0 else None,
                        persistent_workers=False)
    remaining = [sum(1 for b in batch_shard if b == si) for si in range(len(shards))]
    buffers: Dict[int, Dict[str, List[torch.Tensor]]] = {}
    failed: Dict[int, Dict[str, str]] = {}
    write_seconds = [0.0]

    lock = threading.Lock()

    def write(si: int, tensors: Dict[str, torch.Tensor], shard_failed: Dict[str, str]) -> None:
        t = time.perf_counter()
        s = shards[si]
        try:
            writer.write_shard(s["name"], tensors, s["images"], tuple(s["input_hw"]), shard_failed)
        except StoreFullError as exc:  # one line: the folder and about what the job's unwritten shards need
            raise StoreFullError(exc.folder, max(exc.need, _space_needed(writer, job or shards, tensors))) from None
        with lock:  # writer threads' seconds, summed
            write_seconds[0] += time.perf_counter() - t

    bar = tqdm(total=len(images), desc=f"extract[rank {ctx.rank}]" if ctx.world_size > 1 else "extract",
               unit="img", disable=not cfg.progress or (ctx.rank != 0) or None, file=sys.stderr)
    cuda = device.type == "cuda"
    copy_stream = torch.cuda.Stream(device) if cuda else None
    gpu_spans: List[Tuple[Any, Any]] = []  # CUDA events around each batch's forward: the GPU's busy time

    def collect(si: int, n: int, outs: Optional[Dict[str, torch.Tensor]], done: Any, bg: BackgroundWriter) -> None:
        """One batch's outputs to the host and into its shard's buffer; the shard is written after its last
        batch. On a GPU the copy runs on a side stream while the next batch computes."""
        if outs is not None:
            t = time.perf_counter()
            buf = buffers.setdefault(si, {})
            if cuda:
                copy_stream.wait_event(done)
                with torch.cuda.stream(copy_stream):
                    host = {k: v.cpu() for k, v in outs.items()}
            else:
                host = outs
            for k, v in host.items():
                buf.setdefault(k, []).append(v)
            report.seconds["forward"] += time.perf_counter() - t
        bar.update(n)
        remaining[si] -= 1
        if remaining[si] == 0:
            tensors = {k: torch.cat(v) for k, v in buffers.pop(si, {}).items()}
            bg.submit(write, si, tensors, failed.pop(si, {}))
            report.computed_shards += 1

    writers = max(1, cfg.writers)
    with BackgroundWriter(workers=writers, max_pending=2 * writers + 2) as bg:
        it = iter(loader)
        previous = None
        for bi, si in enumerate(batch_shard):
            t = time.perf_counter()
            idx, x, errors, decode_s = next(it)
            report.seconds["wait"] += time.perf_counter() - t
            report.seconds["decode"] += decode_s
            for i, err in errors:
                key = images[i]["key"]
                failed.setdefault(si, {})[key] = err
                report.failed[key] = err
                skip_unreadable("densevit-extract", err)
            outs, done = None, None
            if x is not None:
                t = time.perf_counter()
                if cuda:
                    start = torch.cuda.Event(enable_timing=True)
                    start.record()
                xb = normalize(x.to(device, non_blocking=True), extractor.spec.mean, extractor.spec.std)
                feats = extractor.extract(xb, layers, facets, saliency=cfg.saliency)
                outs = {}
                for l in layers:
                    for f in facets:
                        outs[tensor_name(l, f)] = feats.descriptors[(l, f)].to(store_dtype)
                        if (l, f) in feats.cls:
                            outs[tensor_name(l, f, cls=True)] = feats.cls[(l, f)].to(store_dtype)
                if cfg.saliency:
                    outs["saliency"] = feats.saliency.float()
                if cuda:
                    done = torch.cuda.Event(enable_timing=True)
                    done.record()
                    gpu_spans.append((start, done))
                report.seconds["forward"] += time.perf_counter() - t
                report.images += x.shape[0]
            if previous is not None:  # the previous batch's copy overlaps this batch's compute
                collect(*previous, bg)
            previous = (si, len(idx), outs, done)
        if previous is not None:
            collect(*previous, bg)
    bar.close()
    if cuda:
        torch.cuda.synchronize(device)
        report.seconds["gpu"] = sum(a.elapsed_time(b) for a, b in gpu_spans) / 1000.0
    report.seconds["write"] = write_seconds[0]
    report.seconds["total"] = time.perf_counter() - t_start
    report.window = [unix_start, time.time()]


def extractor_for_store(settings: Mapping[str, Any], weights: Optional[str], device=None):
    """An extractor that computes what a store holds (its backbone, stride and model dtype), with ``weights``
    that must be the store's (same size and SHA-256): for images that are not in the store."""
    from ..features.extractor import ViTExtractor

    if weights is None and settings["weights"].get("source") == "file":
        raise DensevitError(f"the store was extracted with weights {settings['weights']['name']}; give that file "
                            f"(--weights) to extract an image that is not in the store")
    if weights_fingerprint(weights, settings["backbone"]) != settings["weights"]:
        raise DensevitError(f"weights {weights} are not the ones the store was extracted with "
                            f"({settings['weights'].get('name', settings['weights'].get('source'))})")
    return ViTExtractor(settings["backbone"], stride=settings["stride"], weights=weights, device=device,
                        dtype=settings["model_dtype"])
