"""A patch index with its inverted lists on disk: built in parts over torchrun ranks, grown and pruned in place.

    torchrun --nproc_per_node N -m densevit.cli.index build STORE -o INDEX --kind ivf-pq --on-disk
    densevit-index update INDEX [--prune]

The build: every rank reads the store's manifest and plans the same parts (consecutive images, about
``part_vectors`` vectors each; a vector's id is its position in the store's image order). Rank 0 trains the coarse
quantiser and the PQ on a sample drawn across every image (the sample a one-process in-memory build draws) and
broadcasts the trained index; the parts are dealt to the ranks by their vector counts
(:func:`densevit.runtime.dist.deal`, as extraction deals images); each rank encodes its parts
(:func:`densevit.storage.ondisk.encode_part`) into ``INDEX/parts/``; rank 0 merges them in part order into one
file of inverted lists (:func:`densevit.storage.ondisk.merge_lists`), writes the id map and ``index.json`` last,
and removes the parts. One process and N processes write byte-identical lists, id map and index (the same codes
in the same list order). A killed build leaves no ``index.json``, so nothing half-built loads; rerunning the same
command resumes, keeping every part whose record verifies.

An index folder on disk::

    index.json          as for every index, plus the per-image records (shard SHA-256, row, size), the
                        generation and the id counter
    trained-<b>.faiss   the trained, empty index (quantiser + PQ tables) of build ``b``: what updates encode with
    ivf-<g>.faiss       the searchable index: trained tables + the directory of the lists in lists-<g>.ivfdata
    lists-<g>.ivfdata   the inverted lists (codes + ids), memory-mapped read-only at search
    ids-<g>.npy         ``N x 3`` int32 (image number, token row, token column) per vector id, memory-mapped

``update`` encodes the images the store gained (the trained tables unchanged) and merges the old lists and the new
parts into generation ``g + 1``; with ``--prune`` the vectors of images the store no longer holds are left out
(their id-map rows stay, unused). ``index.json`` switches generations atomically; the old files are removed after.

Memory of a rank: the trained index, one part (``part_vectors x (code_size + 8)`` bytes of codes and ids, 12 bytes
a vector of id map) and one chunk of ``chunk_images`` images' float32 descriptors; plus O(images) bookkeeping
(token counts, records). The merge and search read lists and parts through ``mmap`` (page cache).
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from ..errors import DensevitError
from ..io.files import atomic_path, atomic_write, atomic_write_text, file_problem, file_sha256, human_bytes
from ..runtime.dist import DistContext
from ..runtime.progress import stage
from . import ondisk
from .patch_index import (FORMAT, META, IndexConfig, PatchIndex, PatchIndexError, _content_digest, _make_faiss,
                          _normalize, _store_digest, check_selected, image_record, index_inputs, load_index, read_meta,
                          rebuild_command, select_tokens, training_sample, verify_index_files)
from .store import FeatureStore

__all__ = ["IndexSpaceError", "build_on_disk", "estimate_bytes", "plan_parts", "update_index"]

PARTS, PLAN, TRAINED = "parts", "plan.json", "trained.faiss"
PLAN_FORMAT = "densevit-index-parts-v1"
SAMPLED = 256 << 20          # files larger than this are checked at load by sampled blocks (whole SHA-256 below)
_OWN = re.compile(r"^((ivf|trained)-\d+\.faiss|lists-\d+\.ivfdata|ids-\d+\.npy|index\.faiss|ids\.npy|vectors\.npy)$")
_OWN_PART = re.compile(r"^(part|kept)-\d{5}(\.faiss|\.ids\.npy|\.json)$")
SEARCH_ONLY = ("nprobe", "ef_search", "rerank")       # settings that do not change what is built


class IndexSpaceError(DensevitError, OSError):
    """The output disk cannot hold what the build or update is estimated to write."""


# ------------------------------------------------------------------------------------------------ planning
def plan_parts(counts: Sequence[int], part_vectors: int, first_image: int = 0, first_id: int = 0
               ) -> List[Dict[str, int]]:
    """Consecutive images grouped into parts of about ``part_vectors`` vectors (at least one image each):
    ``[{"start", "stop" (image numbers), "first_id", "count"}]``; image ``first_image + i`` has ``counts[i]``."""
    parts, start, size = [], 0, 0
    for i, c in enumerate(counts):
        if size and size + c > part_vectors:
            parts.append({"start": first_image + start, "stop": first_image + i, "first_id": first_id, "count": size})
            first_id += size
            start, size = i, 0
        size += int(c)
    if size:
        parts.append({"start": first_image + start, "stop": first_image + len(counts), "first_id": first_id,
                      "count": size})
    return parts


def _code_size(cfg: IndexConfig, params: Dict[str, Any], d: int) -> int:
    if cfg.kind == "ivf-flat":
        return 4 * d
    return (params["pq_m"] * params["pq_bits"] + 7) // 8


def estimate_bytes(vectors_listed: int, vectors_encoded: int, code_size: int, id_rows: int) -> int:
    """Bytes a build or update writes at its peak: the merged lists (``vectors_listed`` entries), the parts
    (``vectors_encoded``), the new id map (``id_rows`` rows) and the parts' id maps, with 5 % slack."""
    entry = code_size + ondisk.LIST_ENTRY_OVERHEAD
    return int(1.05 * (entry * (vectors_listed + vectors_encoded) + 12 * (id_rows + vectors_encoded)) + (1 << 20))


def _check_space(out: Path, need: int) -> None:
    free = ondisk.free_bytes(out)
    if free is not None and free < need:
        raise IndexSpaceError(f"no space left on the device of {out} for the index: it needs about "
                              f"{human_bytes(need)} and {human_bytes(free)} is free there; free some space or write "
                              f"the index to another disk")


# ------------------------------------------------------------------------------------------------ parts
class _Parts:
    """The ``parts/`` folder of a build or update in progress: its plan, the trained index and each part."""

    def __init__(self, out: Path) -> None:
        self.dir = out / PARTS

    def plan(self) -> Optional[Dict[str, Any]]:
        try:
            return json.loads((self.dir / PLAN).read_text())
        except (OSError, ValueError):
            return None

    def path(self, i: int, suffix: str) -> Path:
        return self.dir / f"part-{i:05d}{suffix}"

    def done(self, i: int, part: Dict[str, int]) -> bool:
        """Part ``i`` is written and its record verifies (a killed writer leaves no record)."""
        try:
            rec = json.loads(self.path(i, ".json").read_text())
        except (OSError, ValueError):
            return False
        if rec.get("part") != part:
            return False
        for suffix in (".faiss", ".ids.npy"):
            f = rec["files"][suffix]
            if file_problem(self.path(i, suffix), f["size"], f["sha256"]) is not None:
                return False
        return True

    def write(self, i: int, part: Dict[str, int], trained: np.ndarray, chunks: Iterator[Tuple[np.ndarray, np.ndarray]],
              rows: List[np.ndarray]) -> None:
        n = ondisk.encode_part(trained, chunks, self.path(i, ".faiss"))
        if n != part["count"]:
            raise PatchIndexError(f"part {i} holds {n} vectors, its plan {part['count']} (the store changed?)")
        ids = np.concatenate(rows) if rows else np.empty((0, 3), np.int32)
        _save_npy(self.path(i, ".ids.npy"), ids)
        files = {s: {"size": self.path(i, s).stat().st_size, "sha256": file_sha256(self.path(i, s))}
                 for s in (".faiss", ".ids.npy")}
        atomic_write_text(self.path(i, ".json"), json.dumps({"part": part, "files": files}) + "\n")

    def clear(self) -> None:
        """Remove the files a build wrote here (its own names only), then the folder when left empty."""
        if not self.dir.is_dir():
            return
        for f in self.dir.iterdir():
            if f.is_file() and not f.is_symlink() and (_OWN_PART.match(f.name) or f.name in (PLAN, TRAINED)
                                                        or f.name.startswith(".")):
                f.unlink()
        try:
            self.dir.rmdir()
        except OSError:
            pass


def _save_npy(path: Path, arr: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, arr))


# ------------------------------------------------------------------------------------------------ the build
class _Source:
    """The store side of a build: image keys, their selected tokens and descriptors."""

    def __init__(self, st: FeatureStore, cfg: IndexConfig, layer: int, facet: str) -> None:
        self.st, self.cfg, self.layer, self.facet = st, cfg, layer, facet

    def select(self, key: str) -> torch.Tensor:
        cfg = self.cfg
        return select_tokens(self.st.grid(key), cfg, self.st.saliency(key) if cfg.salient_only else None)

    def counts(self, keys: Sequence[str]) -> np.ndarray:
        return np.array([int(self.select(k).numel()) for k in keys], np.int64)

    def chunks(self, keys: Sequence[str], part: Dict[str, int], rows: List[np.ndarray]
               ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Part ``part``'s vectors a chunk of images at a time, with their ids; id-map rows into ``rows``."""
        next_id = part["first_id"]
        for start in range(part["start"], part["stop"], self.cfg.chunk_images):
            xs = []
            for j in range(start, min(start + self.cfg.chunk_images, part["stop"])):
                key = keys[j]
                sel = self.select(key)
                xs.append(_normalize(self.st.descriptors(key, self.layer, self.facet)[sel]))
                r, c = self.st.grid(key).unflat(sel)
                rows.append(np.stack([np.full(sel.numel(), j), r.numpy(), c.numpy()], 1).astype(np.int32))
            x = np.concatenate(xs)
            yield x, np.arange(next_id, next_id + len(x), dtype=np.int64)
            next_id += len(x)


def _plan_record(cfg: IndexConfig, st: FeatureStore, layer: int, facet: str, keys: Sequence[Optional[str]],
                 parts: List[Dict[str, int]], base: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """What a parts folder is for: settings, store, images and parts (and the index generation it updates)."""
    config = {k: v for k, v in asdict(cfg).items() if k not in SEARCH_ONLY}
    return {"format": PLAN_FORMAT, "config": config, "layer": layer, "facet": facet, "store_digest": _store_digest(st),
            "store_content": _content_digest(st, [k for k in keys if k is not None]), "images": len(keys),
            "parts": parts, "base": None if base is None else {"generation": base["generation"],
                                                                 "store_content": base["store_content"]}}


def _encode(out: Path, src: _Source, keys: Sequence[str], plan: Dict[str, Any], trained: np.ndarray,
            ctx: DistContext, progress: bool) -> None:
    """This rank's share of the plan's parts, each written unless already done (a resumed run)."""
    parts = _Parts(out)
    plist = plan["parts"]
    mine = ctx.shard(list(range(len(plist))), [p["count"] for p in plist])
    todo = [i for i in mine if not parts.done(i, plist[i])]
    total = sum(plist[i]["count"] for i in todo)
    desc = "encoding" + (f" (rank {ctx.rank} of {ctx.world_size})" if ctx.world_size > 1 else "")
    with tqdm(total=total, desc=desc, unit="vec", unit_scale=True, disable=not progress or not ctx.is_main) as bar:
        for i in todo:
            rows: List[np.ndarray] = []
            parts.write(i, plist[i], trained, src.chunks(keys, plist[i], rows), rows)
            bar.update(plist[i]["count"])


def _prepare(out: Path, record: Dict[str, Any], train: Callable[[], Any], need: int,
             overwrite_parts: bool) -> np.ndarray:
    """Rank 0: resume the parts folder when it holds this plan, else start it afresh (refusing another plan's
    unfinished work unless ``overwrite_parts``); check the disk; the trained index, serialised."""
    parts = _Parts(out)
    old = parts.plan()
    if old is not None and old != record:
        if not overwrite_parts:
            raise DensevitError(f"{out} holds an unfinished index build or update of other settings or another "
                                f"store content; pass --overwrite to discard it")
        stage(f"discarding the unfinished work in {parts.dir} (other settings or store content)")
        parts.clear()
        old = None
    done = sum(parts.done(i, p) for i, p in enumerate(record["parts"])) if old is not None else 0
    _check_space(out, need)
    trained_path = parts.dir / TRAINED
    if old is not None and trained_path.is_file():
        stage(f"resuming the unfinished build in {out}: {done} of {len(record['parts'])} part(s) done")
        return np.fromfile(trained_path, np.uint8)
    parts.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(parts.dir / PLAN, json.dumps(record) + "\n")
    trained = train()
    data = ondisk.index_to_bytes(trained)
    ondisk.write_index(trained, trained_path)
    return data


def build_on_disk(store: Union[str, Path, FeatureStore], out: Union[str, Path], cfg: IndexConfig = IndexConfig(),
                  progress: bool = True, ctx: DistContext = DistContext(), overwrite: bool = False
                  ) -> Optional[PatchIndex]:
    """Build an index of ``store`` whose inverted lists live on disk, into ``out``, this process being rank
    ``ctx.rank`` of ``ctx.world_size`` (see the module docstring). Returns the loaded index on rank 0 (None on
    the others)."""
    cfg.check()
    if not cfg.on_disk:
        cfg = IndexConfig(**{**asdict(cfg), "on_disk": True})
    out = Path(out)
    st = store if isinstance(store, FeatureStore) else FeatureStore(store)
    layer, facet, keys = index_inputs(st, cfg)
    src = _Source(st, cfg, layer, facet)
    counts = src.counts(keys)
    n = check_selected(int(counts.sum()))
    d = int(st.descriptors(keys[0], layer, facet).shape[1])
    cfg.check_sizes(n, d)
    index0, params = _make_faiss(cfg, d, n)
    plist = plan_parts(counts, cfg.part_vectors)
    record = _plan_record(cfg, st, layer, facet, keys, plist, None)
    need = estimate_bytes(n, n, _code_size(cfg, params, d), n)

    def train():
        sample = training_sample(st, keys, lambda i: src.select(keys[i]), layer, facet, cfg, n, progress)
        stage(f"training on {len(sample):,} sampled vectors")
        with ondisk.all_threads():                     # the other ranks wait meanwhile
            index0.train(sample)
        return index0

    trained = ctx.on_main(lambda: _prepare(out, record, train, need, overwrite))
    _encode(out, src, keys, record, trained, ctx, progress)
    ctx.barrier()

    def commit():
        meta = {"format": FORMAT, "kind": cfg.kind, "config": asdict(cfg), "params": params, "layer": layer,
                "facet": facet, "dim": d, "on_disk": True, "generation": _generation(out), "next_id": 0, "count": 0,
                "images": [], "records": {}, "store": str(st.root.resolve()), "store_digest": _store_digest(st)}
        return _commit(out, meta, record, trained, keys, st, progress=progress)

    ctx.on_main(commit)
    return load_index(out, st) if ctx.is_main else None


# ------------------------------------------------------------------------------------------------ commit
def _generation(out: Path) -> int:
    """The generation of the on-disk index ``out`` holds (-1: none), so a rebuild over it (``--overwrite``)
    writes new file names and switches to them as an update does."""
    try:
        return int(json.loads((out / META).read_text()).get("generation", -1))
    except (OSError, ValueError, TypeError):
        return -1


def _commit(out: Path, meta: Dict[str, Any], record: Dict[str, Any], trained: np.ndarray, keys: Sequence[str],
            st: FeatureStore, progress: bool, dead: Sequence[int] = (), base_ids: Optional[np.ndarray] = None) -> None:
    """Rank 0: merge the base lists (``meta``'s generation, less the vectors of the ``dead`` image numbers) and
    the new parts (images ``keys``) into the next generation, write its id map and switch ``index.json`` to it;
    then remove the parts and the previous generation's files."""
    parts = _Parts(out)
    plist = record["parts"]
    missing = [i for i, p in enumerate(plist) if not parts.done(i, p)]
    if missing:
        raise PatchIndexError(f"part {missing[0]} of {out} was not written or does not verify (a rank failed?); "
                              f"rerun the same command to resume")
    gen = meta["generation"] + 1
    faiss_file, lists_file, ids_file = f"ivf-{gen}.faiss", f"lists-{gen}.ivfdata", f"ids-{gen}.npy"
    base: Optional[Any] = None
    paths: List[Path] = []
    if base_ids is not None:                           # an update: the current lists are the base
        base = ondisk.open_index(out / meta["faiss_file"])
        if len(dead):
            dead_arr = np.array(sorted(dead), np.int64)
            keep = lambda ids: ~np.isin(base_ids[ids, 0], dead_arr)      # noqa: E731  (per list: bounded)
            paths += ondisk.filter_parts(base, keep, trained, parts.dir, "kept-", meta["config"]["part_vectors"])
            base = None
    paths += [parts.path(i, ".faiss") for i in range(len(plist))]
    first = [] if base is None else [base]
    stage(f"merging {len(first) + len(paths)} part(s) into {out / lists_file}")
    opened = itertools.chain(first, (ondisk.open_part(p) for p in paths))     # opened one by one, see lists_of
    del base, first
    with ondisk.lists_of(opened) as sources:
        merged = ondisk.merge_lists(trained, sources, out / lists_file, out / faiss_file)
    added = sum(p["count"] for p in plist)
    rows = (0 if base_ids is None else len(base_ids)) + added
    with atomic_path(out / ids_file) as tmp:          # the id map, streamed: old rows, then each part's
        ids = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(rows, 3))
        at = 0
        if base_ids is not None:
            for s in range(0, len(base_ids), 1 << 22):
                e = min(s + (1 << 22), len(base_ids))
                ids[s:e] = base_ids[s:e]
            at = len(base_ids)
        for i in range(len(plist)):
            part_ids = np.load(parts.path(i, ".ids.npy"), mmap_mode="r")
            ids[at:at + len(part_ids)] = part_ids
            at += len(part_ids)
        ids.flush()
        del ids
    trained_file = meta.get("trained_file") if base_ids is not None else f"trained-{gen}.faiss"
    if base_ids is None:                                # the tables every later update encodes with
        ondisk.write_index(ondisk.index_from_bytes(trained), out / trained_file)
    dead_set = set(dead)
    new_keys = [None if i in dead_set else k for i, k in enumerate(meta["images"])] + list(keys)
    records = {k: image_record(st, k) for k in new_keys if k is not None}
    files = {}
    for name in (trained_file, faiss_file, lists_file, ids_file):
        size = (out / name).stat().st_size
        files[name] = ({"size": size, "sample_sha256": ondisk.sample_sha256(out / name)} if size > SAMPLED
                       else {"size": size, "sha256": file_sha256(out / name)})
    old_files = set(meta.get("files", {}))
    meta = dict(meta, generation=gen, faiss_file=faiss_file, ids_file=ids_file, lists_file=lists_file,
                trained_file=trained_file,
                next_id=rows, count=merged, images=new_keys, records=records, files=files,
                store_content=_content_digest(st, new_keys))
    atomic_write_text(out / META, json.dumps(meta, indent=1) + "\n")
    parts.clear()
    for name in old_files - set(files):                # the previous generation, now unreferenced
        if _OWN.match(name):
            (out / name).unlink(missing_ok=True)
    for f in out.iterdir():                            # a killed run's leftovers of our own names
        if f.is_file() and not f.is_symlink() and _OWN.match(f.name) and f.name not in files:
            f.unlink()


# ------------------------------------------------------------------------------------------------ update
def update_index(root: Union[str, Path], store: Union[str, Path, FeatureStore, None] = None, prune: bool = False,
                 progress: bool = True, ctx: DistContext = DistContext()) -> Optional[Tuple[int, int]]:
    """Add to the on-disk index ``root`` the images its store gained since the build (the trained tables
    unchanged); with ``prune``, remove those the store no longer holds. Refuses a store whose indexed images
    changed. Returns ``(images added, images removed)`` on rank 0."""
    root = Path(root)
    meta = read_meta(root)
    cfg = IndexConfig(**meta["config"])
    st = store if isinstance(store, FeatureStore) else FeatureStore(store or meta["store"])
    if not meta.get("on_disk"):
        raise DensevitError(f"index {root} keeps its lists in memory; only an --on-disk index is updated in place: "
                            f"{rebuild_command(root, st.root, IndexConfig(**{**asdict(cfg), 'on_disk': True}))}")
    verify_index_files(root, meta)
    if _store_digest(st) != meta["store_digest"]:
        raise PatchIndexError(f"index {root} was built from a store with other settings than {st.root}; "
                              f"rebuild it from this store")
    rebuild = f"rebuild it: {rebuild_command(root, st.root, cfg)}"
    stored = st.manifest["images"]
    live = {k: i for i, k in enumerate(meta["images"]) if k is not None}
    changed = next((k for k in live if k in stored and image_record(st, k) != meta["records"][k]), None)
    if changed is not None:
        raise PatchIndexError(f"image {changed} of index {root} was replaced or re-extracted in store {st.root} "
                              f"since the index was built; {rebuild}")
    gone = [k for k in live if k not in stored]
    if gone and not prune:
        raise PatchIndexError(f"store {st.root} no longer holds {len(gone)} indexed image(s) (e.g. {gone[0]}); pass "
                              f"--prune to remove them from the index")
    new = [k for k in st.images if k not in live]
    if not new and not gone:
        return 0, 0
    src = _Source(st, cfg, meta["layer"], meta["facet"])
    counts = src.counts(new)
    first = len(meta["images"])
    keys = [None] * first + new                           # part image numbers index this list
    plist = plan_parts(counts, cfg.part_vectors, first_image=first, first_id=meta["next_id"])
    record = _plan_record(cfg, st, meta["layer"], meta["facet"], keys, plist, meta)
    trained_np = np.fromfile(root / meta["trained_file"], np.uint8)
    code_size = _code_size(cfg, meta["params"], meta["dim"])
    added = int(counts.sum())
    need = estimate_bytes(meta["count"] + added, added + (meta["count"] if gone else 0), code_size,
                          meta["next_id"] + added)
    # an unfinished update of another store content restarts (its parts were never committed)
    trained = ctx.on_main(lambda: _prepare(root, record, lambda: ondisk.index_from_bytes(trained_np), need,
                                           overwrite_parts=True))
    _encode(root, src, keys, record, trained, ctx, progress)
    ctx.barrier()

    def commit():
        base_ids = np.load(root / meta["ids_file"], mmap_mode="r")
        _commit(root, meta, record, trained, new, st, progress, dead=[live[k] for k in gone], base_ids=base_ids)
        return len(new), len(gone)

    return ctx.on_main(commit)
