"""A validated, memory-mappable store of raw dense descriptors of a dataset (one folder per run).

Layout of a store folder::

    store.json                    format, settings (backbone, weights fingerprint, stride, load size, layers,
                                  facets, dtypes...) and their digest; written first, a run with other
                                  settings into the same folder is refused
    shards/<name>.safetensors     one shard = images of one resized shape; tensors (N images, T = h*w tokens):
                                  "<layer>/<facet>" NxTxD raw descriptors (attn: NxheadsxTxT),
                                  "<layer>/<facet>/cls" NxD CLS descriptors, "saliency" NxT (if asked for)
    shards/<name>.json            the shard's record: sha256 and size of the .safetensors file, its images
                                  (key, source fingerprint, original size) in offset order, input size, failures
    manifest.json                 written by rank 0 when a run ends: settings, every shard's record and an index
                                  image key -> (shard, offset, original size, source); ``complete`` is false
                                  while shards are missing
    store.lock                    the writer's advisory lock (``fcntl.flock``; the holder's PID while held)

A store only grows: a run with another image list adds its images and keeps the stored ones; only
``prune`` (images not in the run's list) and ``overwrite`` (everything) remove stored images. One writer at a
time: the writer holds ``store.lock`` from :meth:`StoreWriter.prepare` to :meth:`StoreWriter.finalize`
(under torchrun rank 0 holds it for the whole job); a second writer is refused naming the holder's PID, and
the kernel releases the lock of a process that dies.

Descriptors are stored raw (not log-binned: binned ones are 17x larger) in float16 by default (float32 on
request) and binned at read time with :func:`densevit.features.binning.log_bin`, exactly as extraction bins them.
Every file is written atomically (temp file + ``os.replace``, :func:`densevit.io.files.atomic_write`), so a
killed run, or one that ran out of disk space (:class:`StoreFullError`, one line naming the folder and the
space needed), leaves only complete shards. Reads check each shard's size and SHA-256 against its record the
first time it is opened; a truncated or modified shard raises :class:`StoreError` naming the file.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import DensevitError
from ..features.binning import log_bin
from ..features.frames import FrameBatch, InputRule
from ..features.source import ImageFeatures, ImageInput, image_name
from ..io.files import atomic_write, canonical_key, check_outputs, file_sha256, human_bytes, key_digest, verify_file
from ..io.images import load_image, load_resized, resize_short_side
from ..models.grid import TokenGrid

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no store lock
    fcntl = None

__all__ = ["StoreError", "StoreFullError", "StoreLock", "FeatureStore", "StoreWriter", "StoreBatch", "tensor_name",
           "FORMAT"]

FORMAT = "densevit-store-v1"
SETTINGS_FILE = "store.json"
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
LOCK_FILE = "store.lock"
STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class StoreError(DensevitError):
    """A store is missing, incomplete, corrupt (the shard is named) or made with other settings."""


class StoreFullError(StoreError):
    """The store's device is full: names the folder and about how many more bytes the run needs."""

    def __init__(self, folder: Union[str, Path], need: int) -> None:
        self.folder, self.need = Path(folder), int(need)
        try:
            free = f"{human_bytes(shutil.disk_usage(self.folder).free)} free"
        except OSError:
            free = "free space unknown"
        super().__init__(f"no space left on the device of {self.folder} ({free}): about {human_bytes(self.need)} "
                         f"more needed to finish the store; free some space and rerun the same command (the "
                         f"finished shards are kept)")


def store_internals(root: Union[str, Path]) -> List[Path]:
    """The files and folders a store keeps as its own (never symbolic links: :func:`check_store_outputs`)."""
    root = Path(root)
    return [root / SETTINGS_FILE, root / MANIFEST_FILE, root / SHARDS_DIR, root / LOCK_FILE]


def check_store_outputs(root: Union[str, Path], inputs: Sequence[Any] = ()) -> None:
    """The output rule (:func:`densevit.io.files.check_outputs`) for a store folder: not inside nor around an
    input, writable, and its internals (``shards/``, the manifest...) real files and folders, not links that
    would lead its writes and prunes elsewhere. Checked before any model loads."""
    check_outputs(inputs, folders=[root, Path(root) / SHARDS_DIR], overwrite=True, internals=store_internals(root))


def check_unlocked(root: Union[str, Path]) -> None:
    """Refuse, before any model loads, a store another writer holds (one line naming it); the lock is not kept
    (the writer takes it in :meth:`StoreWriter.prepare`)."""
    if (Path(root) / LOCK_FILE).is_file():
        StoreLock(root).acquire().release()


def _is_temp(name: str) -> bool:
    """A temp file of the atomic writer (``.<stem>.<12 hex>.tmp``): the only stray files a store removes."""
    parts = name.rsplit(".", 2)
    return (name.startswith(".") and len(parts) == 3 and parts[2] == "tmp" and len(parts[1]) == 12
            and all(c in "0123456789abcdef" for c in parts[1]))


def tensor_name(layer: int, facet: str, cls: bool = False) -> str:
    """Name of a (layer, facet) tensor in a shard: ``"9/key"`` (``"9/key/cls"`` for the CLS descriptors)."""
    return f"{int(layer)}/{facet}" + ("/cls" if cls else "")


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` atomically; a full device (or quota) raises :class:`StoreFullError` (no temp file left)."""
    try:
        atomic_write(path, lambda f: f.write(data))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreFullError(path.parent, len(data)) from None
        raise


def _write_json(path: Path, obj: Any) -> None:
    _write_file(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _read_json(path: Path, what: str) -> Dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{what} {path} is missing") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"{what} {path} is unreadable or corrupt ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise StoreError(f"{path} is not a densevit store file ({FORMAT})")
    return obj


def _settings_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> List[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# ---------------------------------------------------------------------------------------------------- writing
_HELD_LOCKS: set = set()  # descriptors of the store locks this process holds


def _forget_locks_in_child() -> None:
    """In a forked child (e.g. a DataLoader worker): close the inherited lock descriptors, so that the lock
    lives exactly as long as the process that took it (a child outliving a killed writer does not hold it)."""
    for fd in _HELD_LOCKS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


class StoreLock:
    """The lock of a store's one writer: ``fcntl.flock`` on ``store.lock`` in the store folder, which holds the
    holder's PID and host while it is held. The kernel releases it when the holding process ends, however it
    ends, so the lock of a dead process never blocks (the file stays; only the ``flock`` counts); forked
    children do not keep it."""

    def __init__(self, root: Union[str, Path]) -> None:
        self.path = Path(root) / LOCK_FILE
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "StoreLock":
        """Take the lock now, or raise :class:`StoreError` naming the process that holds it (no waiting)."""
        if self._fd is not None or fcntl is None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise StoreError(f"cannot open the store lock {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreError(f"cannot lock the store {self.path.parent}: {exc.strerror}") from None
            raise StoreError(f"store {self.path.parent} is being written by another process "
                             f"({holder or 'PID not recorded yet'}); wait until it ends, or use another "
                             f"folder") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError:  # e.g. a full disk: the lock holds without the note
            pass
        self._fd = fd
        _HELD_LOCKS.add(fd)
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD_LOCKS.discard(fd)
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class StoreWriter:
    """Writes a store: settings first (:meth:`prepare`, rank 0, which takes the store's lock), shards with their
    records (any rank), the manifest last (:meth:`finalize`, rank 0, which releases the lock; :meth:`close`
    releases it when the run fails). Use as a context manager to release the lock in every case."""

    def __init__(self, root: Union[str, Path], settings: Mapping[str, Any]) -> None:
        self.root = Path(root)
        self.settings = json.loads(canonical_key(settings))
        self.digest = key_digest(self.settings)
        self.previous: Optional[Dict[str, Any]] = None  # the manifest :meth:`prepare` found (the stored images)
        self.overwritten: List[str] = []                # images ``overwrite`` removed
        self.change: Dict[str, List[str]] = {}          # after :meth:`finalize`: kept/added/updated/removed images
        self._lock = StoreLock(self.root)

    @property
    def shard_dir(self) -> Path:
        return self.root / SHARDS_DIR

    def prepare(self, overwrite: bool = False) -> None:
        """Take the store's lock (refused in one line, naming the holder, while another writer has it); create
        the store or check that it was made with the same settings (refused otherwise, unless ``overwrite``,
        which empties it first); read the stored images' manifest into :attr:`previous`."""
        path = self.root / SETTINGS_FILE
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root} is a file, not a store folder; use another path")
        check_outputs(internals=store_internals(self.root))     # no link leads a write or a prune elsewhere

        def foreign() -> bool:          # a folder with files but no store settings
            return not overwrite and not path.exists() and any(f.name != LOCK_FILE for f in self.root.iterdir())

        if self.root.exists() and foreign() and not (self.root / LOCK_FILE).exists():
            raise StoreError(f"{self.root} exists and is not a densevit store; use another folder or --overwrite")
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()            # a store another writer is making: refused here, naming it
        try:
            if foreign():               # a store whose first writer died before its settings were written
                raise StoreError(f"{self.root} exists and is not a densevit store; use another folder or "
                                 f"--overwrite")
            self._prepare_locked(path, overwrite)
        except BaseException:
            self.close()
            raise

    def _prepare_locked(self, path: Path, overwrite: bool) -> None:
        if path.exists():
            try:
                old = _read_json(path, "store settings")
            except StoreError:
                if not overwrite:
                    raise
                old = {}
            if old.get("digest") != self.digest and not overwrite:
                diff = _settings_diff(old.get("settings", {}), self.settings)
                raise StoreError(f"{self.root} holds a store made with other settings "
                                 f"({', '.join(diff) or 'format'} differ); use another folder or --overwrite")
            if overwrite:
                try:
                    self.overwritten = sorted(_read_json(self.root / MANIFEST_FILE, "store manifest")["images"])
                except (StoreError, KeyError, TypeError):
                    self.overwritten = []
                for f in self._own_shard_files(self._manifest_shards()):   # only what the store wrote
                    f.unlink(missing_ok=True)
                (self.root / MANIFEST_FILE).unlink(missing_ok=True)
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        for folder in (self.root, self.shard_dir):       # temp files of a writer that was killed mid-write
            for stale in folder.iterdir():
                if _is_temp(stale.name) and stale.is_file():
                    stale.unlink(missing_ok=True)
        settings = {"format": FORMAT, "settings": self.settings, "digest": self.digest}
        data = (json.dumps(settings, indent=1, sort_keys=True) + "\n").encode()
        if not path.is_file() or path.read_bytes() != data:   # unchanged: not rewritten (a full disk still reads)
            _write_file(path, data)
        self.previous = self._read_previous()

    def _manifest_shards(self) -> set:
        """The shard names the manifest lists (none when it is missing or unreadable)."""
        try:
            return set(_read_json(self.root / MANIFEST_FILE, "store manifest").get("shards", {}))
        except (StoreError, AttributeError):
            return set()

    def _own_record(self, path: Path) -> Optional[Dict[str, Any]]:
        """The shard record at ``path`` when the store wrote it (its format, and its own name inside), else None."""
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(rec, dict) and rec.get("format") == FORMAT and rec.get("shard") == path.name[:-len(".json")]
        return rec if ok else None

    def _own_shard_files(self, known: set = frozenset(), only: Optional[set] = None) -> List[Path]:
        """The files of ``shards/`` the store wrote and recorded as its own: a shard record (its format and name
        inside it), the shard file of such a record or of a name in ``known`` (the manifest's, the plan's). Any
        other file there (put there by someone else) is never removed. ``only``: these shard names only."""
        if not self.shard_dir.is_dir() or self.shard_dir.is_symlink():
            return []
        own = []
        for f in self.shard_dir.iterdir():
            if not f.is_file() or f.is_symlink():
                continue
            for suffix in (".safetensors", ".json"):
                if not f.name.endswith(suffix):
                    continue
                stem = f.name[:-len(suffix)]
                if only is not None and stem not in only:
                    continue
                if stem in known or self._own_record(self.shard_dir / f"{stem}.json") is not None:
                    own.append(f)
        return own

    def _recover_previous(self) -> Optional[Dict[str, Any]]:
        """The stored images when the manifest is lost: rebuilt from the shard records of these settings whose
        shard file is there with its recorded size (newest record first for an image in two), so a run after a
        lost manifest keeps them instead of silently dropping them."""
        if not self.shard_dir.is_dir():
            return None
        recs = []
        for f in self.shard_dir.glob("*.json"):
            rec = self._own_record(f)
            shard = self.shard_path(f.name[:-len(".json")])
            if rec and rec.get("digest") == self.digest and shard.is_file() and shard.stat().st_size == rec.get("size"):
                recs.append((f.stat().st_mtime, f.name, rec))
        if not recs:
            return None
        index: Dict[str, Any] = {}
        shards: Dict[str, Any] = {}
        for _, _, rec in sorted(recs, key=lambda r: (r[0], r[1])):
            name, offset = rec["shard"], 0
            shards[name] = {k: rec[k] for k in ("size", "sha256", "input_hw", "tensors")}
            for im in rec["images"]:
                if im["key"] in rec.get("failed", {}):
                    continue
                index[im["key"]] = {"shard": name, "offset": offset, "image_hw": im["image_hw"],
                                    "source": im["source"]}
                offset += 1
        return {"format": FORMAT, "settings": self.settings, "digest": self.digest, "shards": shards,
                "images": index, "failed": {}, "recovered": True}

    def _read_previous(self) -> Optional[Dict[str, Any]]:
        path = self.root / MANIFEST_FILE
        if not path.exists():
            return self._recover_previous()
        try:
            m = _read_json(path, "store manifest")
        except StoreError as exc:
            raise StoreError(f"{exc}; the stored images are unknown: restore it, or start the store again with "
                             f"--overwrite") from None
        if m.get("digest") != self.digest or not isinstance(m.get("images"), dict):
            raise StoreError(f"store manifest {path} does not match {SETTINGS_FILE}; restore it, or start the store "
                             f"again with --overwrite")
        return m

    def stored_images(self, name: str) -> List[Dict[str, Any]]:
        """The images (``key``, ``path``, ``source``, ``image_hw``) of shard ``name`` of :attr:`previous`, in
        offset order: from its record, or from the manifest's index when the record is lost."""
        try:
            rec = _read_json(self.record_path(name), "shard record")
            if rec.get("digest") == self.digest and rec.get("shard") == name:
                return [dict(im) for im in rec["images"]]
        except (StoreError, KeyError, TypeError):
            pass
        index = (self.previous or {}).get("images", {})
        entries = sorted((e["offset"], k) for k, e in index.items() if e["shard"] == name)
        return [{"key": k, "path": index[k]["source"].get("path"), "source": index[k]["source"],
                 "image_hw": index[k]["image_hw"]} for _, k in entries]

    def record_path(self, name: str) -> Path:
        return self.shard_dir / f"{name}.json"

    def shard_path(self, name: str) -> Path:
        return self.shard_dir / f"{name}.safetensors"

    def shard_done(self, name: str, images: Sequence[Mapping[str, Any]], verify: bool = True) -> bool:
        """Whether shard ``name`` is complete for exactly ``images`` (keys and source fingerprints, in order):
        its record matches and the shard file has the recorded size (and SHA-256 when ``verify``)."""
        try:
            rec = _read_json(self.record_path(name), "shard record")
        except StoreError:
            return False
        planned = [(im["key"], im["source"]) for im in images]
        if rec.get("digest") != self.digest or [(im["key"], im["source"]) for im in rec.get("images", [])] != planned:
            return False
        shard = self.shard_path(name)
        if not shard.is_file() or shard.stat().st_size != rec.get("size"):
            return False
        return not verify or file_sha256(shard) == rec.get("sha256")

    def write_shard(self, name: str, tensors: Mapping[str, torch.Tensor], images: Sequence[Mapping[str, Any]],
                    input_hw: Tuple[int, int], failed: Mapping[str, str]) -> Dict[str, Any]:
        """Write a shard (tensors with one row per image in ``images`` that did not fail) and then its record,
        both atomically; returns the record. A full device raises :class:`StoreFullError`."""
        from safetensors.torch import save

        # one metadata entry: safetensors writes a map's entries in no fixed order, and identical runs must
        # give identical bytes
        data = save({k: v.contiguous() for k, v in tensors.items()},
                    metadata={"densevit": json.dumps({"format": FORMAT, "digest": self.digest}, sort_keys=True)})

        _write_file(self.shard_path(name), data)
        rec = {"format": FORMAT, "digest": self.digest, "shard": name, "size": len(data),
               "sha256": hashlib.sha256(data).hexdigest(), "input_hw": list(input_hw),
               "images": [dict(im) for im in images], "failed": dict(failed),
               "tensors": {k: list(v.shape) for k, v in tensors.items()}}
        _write_json(self.record_path(name), rec)
        return rec

    def finalize(self, plan: Sequence[Tuple[str, Sequence[Mapping[str, Any]]]], unreadable: Mapping[str, str],
                 live: Optional[Mapping[str, Sequence[str]]] = None, prune: bool = False) -> Dict[str, Any]:
        """Write ``manifest.json`` from the shard records of ``plan`` (``(name, images)`` per shard; an image in
        several shards is indexed from the last one), then release the lock. For a shard named in ``live`` only
        those images are indexed (its others were replaced or pruned), and the shard is removed when none is
        left; with ``prune`` also every shard file the manifest does not list (left by a killed run with another
        image list). ``unreadable``: images that failed, with the reason (kept unless the image is indexed).
        Sets :attr:`change` (the images kept, added, updated -- re-extracted from a changed file -- and
        removed) and returns the manifest."""
        live = {n: set(v) for n, v in (live or {}).items()}
        records: Dict[str, Dict[str, Any]] = {}
        index: Dict[str, Any] = {}
        failed: Dict[str, str] = dict(unreadable)
        missing: List[str] = []
        dead: set = set()
        for name, images in plan:
            keep = live.get(name)
            if keep is not None and not keep:
                dead.add(name)
                continue
            if not self.shard_done(name, images, verify=False):
                missing.append(name)
                continue
            rec = records[name] = _read_json(self.record_path(name), "shard record")
            if keep is None:
                failed.update(rec["failed"])
            offset = 0
            for im in rec["images"]:
                if im["key"] in rec["failed"]:
                    continue
                if keep is None or im["key"] in keep:
                    index[im["key"]] = {"shard": name, "offset": offset, "image_hw": im["image_hw"],
                                        "source": im["source"]}
                offset += 1
        used = {e["shard"] for e in index.values()}
        listed = {n for n in records if n in used or n not in live}
        shards = {n: {k: records[n][k] for k in ("size", "sha256", "input_hw", "tensors")} for n in listed}
        failed = {k: v for k, v in failed.items() if k not in index}
        manifest = {"format": FORMAT, "settings": self.settings, "digest": self.digest,
                    "complete": not missing, "missing_shards": missing, "shards": shards, "images": index,
                    "failed": failed}
        _write_json(self.root / MANIFEST_FILE, manifest)
        # after the manifest: no manifest ever lists a removed shard; only files the store wrote are removed
        known = set(records) | dead | set((self.previous or {}).get("shards", {}))
        for f in self._own_shard_files(known):
            stem = f.name[:-len(".safetensors")] if f.name.endswith(".safetensors") else f.name[:-len(".json")]
            if stem not in listed and stem not in missing and (prune or stem in records or stem in dead):
                f.unlink(missing_ok=True)
        before = (self.previous or {}).get("images", {})
        self.change = {"kept": [k for k in index if k in before and before[k]["source"] == index[k]["source"]],
                       "added": [k for k in index if k not in before],
                       "updated": [k for k in index if k in before and before[k]["source"] != index[k]["source"]],
                       "removed": sorted((set(before) - set(index)) | set(self.overwritten))}
        self.close()
        return manifest

    def close(self) -> None:
        """Release the store's lock (if this writer holds it)."""
        self._lock.release()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------- reading
@dataclass
class StoreBatch:
    """Images of one resized shape read together: ``descriptors`` is ``BxTxD`` (or ``BxTx(17*D)`` binned)."""

    keys: List[str]
    descriptors: torch.Tensor
    grids: List[TokenGrid]


class FeatureStore:
    """Read a store made by ``densevit-extract --store`` (see the module docstring for the layout).

    Args:
        root: the store folder.
        verify: check each shard's SHA-256 the first time it is read (its size is always checked).
        allow_incomplete: open a store whose run has not finished (reads only what is there).
    """

    def __init__(self, root: Union[str, Path], verify: bool = True, allow_incomplete: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise StoreError(f"no feature store at {self.root}")
        m = _read_json(self.root / MANIFEST_FILE, "store manifest")
        if not m.get("complete") and not allow_incomplete:
            raise StoreError(f"store {self.root} is incomplete ({len(m.get('missing_shards', []))} shard(s) "
                             f"missing); rerun the extraction command to finish it")
        self.manifest = m
        self.settings: Dict[str, Any] = m["settings"]
        self.verify = verify
        self._checked: set = set()
        self._handles: Dict[str, Any] = {}
        self._by_path: Optional[Dict[str, str]] = None

    # --------------------------------------------------------------------- what is stored
    @property
    def images(self) -> List[str]:
        """Image keys, in extraction order (paths relative to the input folder, or file names)."""
        return list(self.manifest["images"])

    @property
    def failed(self) -> Dict[str, str]:
        """Images that could not be read, with the reason."""
        return dict(self.manifest.get("failed", {}))

    @property
    def layers(self) -> List[int]:
        return list(self.settings["layers"])

    @property
    def facets(self) -> List[str]:
        return list(self.settings["facets"])

    def __len__(self) -> int:
        return len(self.manifest["images"])

    def __contains__(self, image: Union[str, Path]) -> bool:
        try:
            self._entry(image)
            return True
        except StoreError:
            return False

    def _entry(self, image: Union[str, Path]) -> Dict[str, Any]:
        index = self.manifest["images"]
        e = index.get(str(image))
        if e is None:  # a path: match the resolved source path
            if self._by_path is None:
                self._by_path = {v["source"].get("path"): k for k, v in index.items()}
            key = self._by_path.get(str(Path(image).resolve()))
            e = index.get(key) if key is not None else None
        if e is None:
            why = f" (it failed: {self.failed[str(image)]})" if str(image) in self.failed else ""
            raise StoreError(f"image {image} is not in store {self.root}{why}")
        return e

    def key(self, image: Union[str, Path]) -> str:
        """The stored key of ``image`` (a key, or the path of a stored image's file)."""
        if str(image) in self.manifest["images"]:
            return str(image)
        self._entry(image)
        return self._by_path[str(Path(image).resolve())]

    def source_path(self, image: Union[str, Path]) -> str:
        """The file a stored image was read from."""
        return self._entry(image)["source"]["path"]

    def grid(self, image: Union[str, Path]) -> TokenGrid:
        """Token grid of a stored image (resized input size and original size)."""
        e = self._entry(image)
        return self._grid(e["shard"], e["image_hw"])

    def _grid(self, shard: str, image_hw: Sequence[int]) -> TokenGrid:
        s = self.settings
        return TokenGrid(s["patch_size"], s["stride"], tuple(self.manifest["shards"][shard]["input_hw"]),
                         tuple(image_hw))

    # --------------------------------------------------------------------- shards
    def _shard(self, name: str):
        handle = self._handles.get(name)
        if handle is not None:
            return handle
        from safetensors import safe_open

        rec = self.manifest["shards"][name]
        path = self.root / SHARDS_DIR / f"{name}.safetensors"
        sha256 = rec["sha256"] if self.verify and name not in self._checked else None
        verify_file(path, rec["size"], sha256, "shard", "the manifest",
                    "rerun the extraction command to recompute it", StoreError)
        if sha256 is not None:
            self._checked.add(name)
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:
            raise StoreError(f"shard {path} is unreadable ({type(exc).__name__})") from None
        self._handles[name] = handle
        return handle

    def resolve_layer(self, layer: int) -> int:
        """Block index of ``layer`` as the extractor counts it (negative counts from the end of the backbone)."""
        layer = int(layer)
        if layer < 0 and "depth" in self.settings:
            return layer + int(self.settings["depth"])
        return layer

    def has_cls(self, layer: int, facet: str) -> bool:
        """Whether every shard holds the CLS descriptors of (``layer``, ``facet``)."""
        name = tensor_name(self.resolve_layer(layer), facet, cls=True)
        return all(name in s["tensors"] for s in self.manifest["shards"].values())

    def select(self, layer: Optional[int] = None, facet: Optional[str] = None) -> Tuple[int, str]:
        """The stored ``(layer, facet)`` meant by ``layer`` / ``facet`` (None: the store's only one; a negative
        layer counts from the end); a one-line :class:`StoreError` when it is not stored."""
        if layer is not None:
            layer = self.resolve_layer(layer)
        if layer is None:
            if len(self.layers) != 1:
                raise StoreError(f"store holds layers {self.layers}; say which")
            layer = self.layers[0]
        if facet is None:
            if len(self.facets) != 1:
                raise StoreError(f"store holds facets {self.facets}; say which")
            facet = self.facets[0]
        if int(layer) not in self.layers or facet not in self.facets:
            raise StoreError(f"store holds layers {self.layers} and facets {self.facets}, not ({layer}, {facet})")
        return int(layer), facet

    def _rows(self, shard: str, name: str, start: int, stop: int) -> torch.Tensor:
        h = self._shard(shard)
        if name not in h.keys():
            raise StoreError(f"shard {shard} has no tensor {name!r}")
        return h.get_slice(name)[start:stop]

    def _finish(self, raw: torch.Tensor, facet: str, grid: TokenGrid, bin: bool, dtype: torch.dtype) -> torch.Tensor:
        """``BxTxD`` raw -> requested dtype, log-binned on the token grid when ``bin``."""
        x = raw.to(dtype)
        if bin:
            if facet == "attn":
                raise StoreError("log-binning applies to descriptors, not attention maps")
            B, T, D = x.shape
            x = log_bin(x.transpose(1, 2).reshape(B, D, *grid.shape))
        return x

    # --------------------------------------------------------------------- public reads
    runs_model = False      # FeatureSource: only what was extracted

    def image_features(self, image: ImageInput, load_size: Optional[int], layer: int, facet: str, *,
                       bin: bool = False, saliency: bool = True, include_cls: bool = False,
                       name: Optional[str] = None, pixels: bool = True) -> ImageFeatures:
        """:class:`~densevit.features.source.FeatureSource`: the stored descriptors of image file ``image``
        (log-binned now when ``bin``), saliency and CLS descriptor; the image read and resized as the extraction
        did (the store's load size and decoding: ``load_size`` is ignored); with ``pixels=False`` no image file is
        read (``image`` may be a store key; ``image`` and ``resized`` are then None)."""
        if not isinstance(image, (str, Path)):
            raise StoreError("a feature store holds features of image files only, not of images made in memory "
                             "(such as augmentations)")
        grid = self.grid(image)                       # a one-line StoreError when the image is not in the store
        if not pixels:
            desc = self.descriptors(image, layer, facet, bin=bin)
            sal = self.saliency(image) if saliency else None
            cls = self.cls(image, layer, facet) if include_cls else None
            return ImageFeatures(name or image_name(image, 0), None, None, grid, desc, sal, cls)
        img = load_image(image)
        if (img.height, img.width) != tuple(grid.original_hw):
            raise StoreError(f"{image} is {img.width}x{img.height} pixels but was {grid.original_hw[1]}x"
                             f"{grid.original_hw[0]} when store {self.root} was made; re-extract it")
        size = self.settings.get("load_size") or None
        if self.settings.get("fast_decode") and size is not None:
            resized = load_resized(image, size, fast_jpeg=True)[0]
        else:
            resized = resize_short_side(img, size)
        desc = self.descriptors(image, layer, facet, bin=bin)
        sal = self.saliency(image) if saliency else None
        cls = self.cls(image, layer, facet) if include_cls else None
        return ImageFeatures(name or image_name(image, 0), img, resized, grid, desc, sal, cls)

    def frames_features(self, frames: Sequence[ImageInput], rule: InputRule, layers: Sequence[int],
                        facets: Sequence[str], *, batch_size: int = 8, guide: bool = False,
                        saliency: bool = False, attention: bool = False, stride: Optional[int] = None,
                        names: Optional[Sequence[str]] = None,
                        check_grid: Optional[Callable[[TokenGrid], None]] = None) -> Iterator[FrameBatch]:
        """:class:`~densevit.features.source.FeatureSource`: the stored features of image files, one per batch, for
        the rule and stride the store was extracted with only (shorter side to its load size, no padding); another
        rule or stride, the network input as a ``guide``, attention inputs, or saliency it does not hold, is refused
        in one line."""
        own = InputRule("short_side", self.settings.get("load_size") or None)
        if rule != own:
            raise StoreError(f"store {self.root} holds images resized with {own.describe()}, not {rule.describe()}; "
                             f"use the model (give the weights)")
        if guide:
            raise StoreError(f"store {self.root} does not keep the network input that guides the upsampling; "
                             f"use the model (give the weights)")
        if attention:
            raise StoreError(f"store {self.root} holds no attention inputs (queries and keys of every token); use "
                             f"the model (give the weights)")
        if stride is not None and int(stride) != int(self.settings["stride"]):
            raise StoreError(f"store {self.root} holds stride {self.settings['stride']}, not {stride}; use the model "
                             f"(give the weights)")
        for j, frame in enumerate(frames):
            f = self.image_features(frame, None, layers[0], facets[0], saliency=False,
                                    name=names[j] if names is not None else None)
            hw = tuple(f.grid.original_hw)
            if check_grid is not None:
                check_grid(f.grid)
            desc = {(l, fa): self.descriptors(frame, l, fa)[None] for l in layers for fa in facets}
            sal = self.saliency(frame)[None] if saliency else None
            yield FrameBatch([f.name], [hw], [f.resized], f.grid, desc, None, sal)

    def descriptors(self, image: Union[str, Path], layer: Optional[int] = None, facet: Optional[str] = None,
                    bin: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``TxD`` descriptors of one image (``Tx(17*D)`` log-binned with ``bin``), row-major token order."""
        layer, facet = self.select(layer, facet)
        e = self._entry(image)
        raw = self._rows(e["shard"], tensor_name(layer, facet), e["offset"], e["offset"] + 1)
        return self._finish(raw, facet, self._grid(e["shard"], e["image_hw"]), bin, dtype)[0]

    def cls(self, image: Union[str, Path], layer: Optional[int] = None, facet: Optional[str] = None
            ) -> torch.Tensor:
        """``D`` CLS descriptor of one image (float32)."""
        layer, facet = self.select(layer, facet)
        e = self._entry(image)
        return self._rows(e["shard"], tensor_name(layer, facet, cls=True), e["offset"], e["offset"] + 1)[0].float()

    def saliency(self, image: Union[str, Path]) -> torch.Tensor:
        """``T`` CLS-attention saliency in [0, 1] (stored when extracted with ``--saliency``)."""
        if not self.settings.get("saliency"):
            raise StoreError(f"store {self.root} has no saliency maps (extract with --saliency)")
        e = self._entry(image)
        return self._rows(e["shard"], "saliency", e["offset"], e["offset"] + 1)[0].float()

    def batches(self, batch_size: int = 32, layer: Optional[int] = None, facet: Optional[str] = None,
                bin: bool = False, dtype: torch.dtype = torch.float32) -> Iterator[StoreBatch]:
        """Every stored image in batches of up to ``batch_size`` images of one resized shape (shard order)."""
        layer, facet = self.select(layer, facet)
        by_shard: Dict[str, List[Tuple[str, Dict[str, Any]]]] = {}
        for key, e in self.manifest["images"].items():
            by_shard.setdefault(e["shard"], []).append((key, e))
        for shard, entries in by_shard.items():
            entries.sort(key=lambda ke: ke[1]["offset"])
            for i in range(0, len(entries), max(1, batch_size)):
                chunk = entries[i:i + batch_size]
                start, stop = chunk[0][1]["offset"], chunk[-1][1]["offset"] + 1
                grids = [self._grid(shard, e["image_hw"]) for _, e in chunk]
                raw = self._rows(shard, tensor_name(layer, facet), start, stop)
                yield StoreBatch([k for k, _ in chunk], self._finish(raw, facet, grids[0], bin, dtype), grids)

    def locations(self, images: Sequence[str]) -> Tuple[List[str], np.ndarray, np.ndarray]:
        """Where images are stored: ``(shard names, shard number per image, offset per image)``."""
        entries = [self._entry(k) for k in images]
        names = sorted({e["shard"] for e in entries})
        number = {n: i for i, n in enumerate(names)}
        return (names, np.array([number[e["shard"]] for e in entries], np.int64),
                np.array([e["offset"] for e in entries], np.int64))

    def gather(self, shards: Sequence[str], shard_no: np.ndarray, offsets: np.ndarray, tokens: np.ndarray,
               layer: Optional[int] = None, facet: Optional[str] = None) -> torch.Tensor:
        """Raw descriptors ``NxD`` (float32) of token ``tokens[i]`` of the image at ``offsets[i]`` of shard
        ``shards[shard_no[i]]``, gathered from the memory-mapped shards (no whole image is read)."""
        layer, facet = self.select(layer, facet)
        name = tensor_name(layer, facet)
        out: Optional[np.ndarray] = None
        for s in np.unique(shard_no):
            sel = np.nonzero(shard_no == s)[0]
            arr = self._memmap(shards[int(s)], name)
            if out is None:
                out = np.empty((len(tokens), arr.shape[-1]), np.float32)
            out[sel] = arr[offsets[sel], tokens[sel]]
        return torch.from_numpy(out if out is not None else np.empty((0, 0), np.float32))

    def token_rows(self, images: Sequence[str], tokens: Sequence[int], layer: Optional[int] = None,
                   facet: Optional[str] = None) -> torch.Tensor:
        """Raw descriptors ``NxD`` of token ``tokens[i]`` of image ``images[i]`` (float32), from the memory-mapped
        shards: for re-scoring search candidates."""
        names, shard_no, offsets = self.locations(images)
        return self.gather(names, shard_no, offsets, np.asarray(tokens, np.int64), layer, facet)

    def _memmap(self, shard: str, name: str) -> np.ndarray:
        """A read-only ``numpy.memmap`` of tensor ``name`` of a (checked) shard, from the safetensors header."""
        key = (shard, name)
        cache = self.__dict__.setdefault("_memmaps", {})
        if key not in cache:
            self._shard(shard)                                    # size / SHA-256 checks
            path = self.root / SHARDS_DIR / f"{shard}.safetensors"
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            info = header.get(name)
            if info is None:
                raise StoreError(f"shard {shard} has no tensor {name!r}")
            dtype = {"F16": np.float16, "F32": np.float32, "BF16": None}[info["dtype"]]
            if dtype is None:
                raise StoreError(f"tensor {name!r} of shard {shard} is bfloat16; read it with descriptors()")
            begin, end = info["data_offsets"]
            cache[key] = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin, shape=tuple(info["shape"]))
        return cache[key]

    def verify_all(self) -> None:
        """Check every shard's size and SHA-256 now (raises :class:`StoreError` naming the first bad one)."""
        for name in self.manifest["shards"]:
            self._shard(name)
