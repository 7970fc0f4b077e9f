"""Files: atomic writes, content hashes and keys, and the one output policy every command follows.

Every densevit file that must never be seen half-written (store shards and manifests, caches, indexes, saved
pictures) goes through :func:`atomic_write`; every command checks its outputs with :func:`check_outputs` before
it writes anything.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Type, Union

from ..errors import DensevitError

__all__ = ["PathLike", "WritesIntoInputsError", "OutputWriteError", "check_outputs", "ensure_writable", "atomic_write",
           "atomic_write_bytes", "atomic_write_text", "atomic_path", "file_sha256", "file_problem", "verify_file",
           "human_bytes", "canonical_key", "key_digest", "file_fingerprint"]


def file_sha256(path: Union[str, Path]) -> str:
    """SHA-256 hex digest of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def canonical_key(key: Mapping[str, Any]) -> str:
    """The canonical JSON of a key: sorted keys, no whitespace; ``Path`` values become strings."""
    if not isinstance(key, Mapping):
        raise TypeError(f"cache key must be a mapping, got {type(key).__name__}")
    return json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=lambda o: str(o) if isinstance(o, os.PathLike) else _not_json(o))


def _not_json(o: Any) -> Any:
    raise TypeError(f"cache key value {o!r} of type {type(o).__name__} is not JSON-serialisable")


def key_digest(key: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of :func:`canonical_key` (the entry's file name stem)."""
    return hashlib.sha256(canonical_key(key).encode("utf-8")).hexdigest()


def file_fingerprint(path: Union[str, Path], content_hash: bool = False) -> Dict[str, Any]:
    """Identity of an input file for a cache key: resolved path, size and mtime (ns), or its SHA-256 content.

    ``content_hash=True`` survives copies/touches but reads the whole file.
    """
    p = Path(path).resolve()
    st = p.stat()
    if content_hash:
        return {"path": str(p), "size": st.st_size, "sha256": file_sha256(p)}
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def file_problem(path: Path, size: int, sha256: Optional[str] = None, record: str = "the record") -> Optional[str]:
    """What is wrong with ``path`` against its recorded ``size`` (and ``sha256`` when given), or ``None``.

    The answer reads after the file's name: ``"is missing"``, ``"is truncated: N bytes, <record> says M"``,
    ``"is modified: ..."`` or ``"is modified (its SHA-256 differs from <record>)"``."""
    if not path.is_file():
        return "is missing"
    actual = path.stat().st_size
    if actual != size:
        return f"is {'truncated' if actual < size else 'modified'}: {actual} bytes, {record} says {size}"
    if sha256 is not None and file_sha256(path) != sha256:
        return f"is modified (its SHA-256 differs from {record})"
    return None


def verify_file(path: Path, size: int, sha256: Optional[str], what: str, record: str, fix: str,
                error: Type[DensevitError] = DensevitError) -> None:
    """Raise ``error("<what> <path> <problem>; <fix>")`` when ``path`` is missing, truncated or modified against
    its recorded size and SHA-256 (``sha256=None`` checks the size only)."""
    problem = file_problem(path, size, sha256, record)
    if problem is not None:
        raise error(f"{what} {path} {problem}; {fix}")


def _create_temp(folder: Path, prefix: str, suffix: str = ".tmp") -> Tuple[int, Path]:
    """A new file of a unique name in ``folder``, opened for writing with the mode ``open()`` gives (0666 less
    the umask; ``tempfile.mkstemp`` would make it 0600, unreadable to the other users of a shared folder)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name in {folder}")


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class OutputWriteError(DensevitError, OSError):
    """Writing an output failed (full disk, read-only place, a file where a folder should be...): one line
    naming the file (and, for a full disk, the space it needs where that is known). Also an :class:`OSError`
    with the original ``errno``, so ``except OSError`` still catches it."""

    def __init__(self, path: Union[str, Path], exc: OSError, need: Optional[int] = None,
                 at_least: bool = False) -> None:
        OSError.__init__(self, exc.errno, exc.strerror)
        self.path, self.need = Path(path), need
        self.filename = str(path)
        self.message = self.describe(self.path, exc, need, at_least)

    @staticmethod
    def describe(path: Path, exc: OSError, need: Optional[int] = None, at_least: bool = False) -> str:
        why = exc.strerror or str(exc) or type(exc).__name__
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            try:
                free = f"{human_bytes(shutil.disk_usage(_existing_parent(path)).free)} free"
            except OSError:
                free = "free space unknown"
            needs = (f"; it needs {'more than ' if at_least else 'about '}{human_bytes(need)}" if need else "")
            return (f"cannot write {path}: no space left on its device ({free}{needs}); free some space and "
                    f"rerun (nothing half-written was left)")
        if exc.errno == errno.EROFS:
            return f"cannot write {path}: its file system is read-only; choose another output location"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return f"cannot write {path}: permission denied; choose another output location"
        if exc.errno == errno.ENOTDIR:
            return f"cannot write {path}: a part of its path is a file, not a folder"
        return f"cannot write {path}: {why}"

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # picklable across processes (DataLoader workers, torchrun)
        return (_rebuild_output_error, (str(self.path), self.errno, self.strerror, self.message))


def _rebuild_output_error(path: str, err: int, strerror: str, message: str) -> "OutputWriteError":
    e = OutputWriteError(path, OSError(err, strerror))
    e.message = message
    return e


def _existing_parent(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(".")


def _mkdir(folder: Path, target: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OutputWriteError:
        raise
    except FileExistsError as exc:      # a file where the folder should be
        raise OutputWriteError(target, OSError(errno.ENOTDIR, exc.strerror or "not a folder")) from None
    except OSError as exc:
        raise OutputWriteError(target, exc) from None


def atomic_write(path: Union[str, Path], write: Callable[[Any], None], size: Optional[int] = None) -> Path:
    """Write a file atomically: ``write(f)`` fills a temp file in the same folder (flushed, fsync'ed), which then
    replaces ``path`` with ``os.replace``; readers see the old file or the complete new one, never a partial one.
    The file gets the mode ``open()`` gives (the umask applies). A failure removes the temp file; an
    :class:`OSError` (full disk, read-only place...) becomes :class:`OutputWriteError`, one line naming ``path``
    (and ``size``, the bytes it needs, when the caller knows them). Every output file of densevit is written
    here (or through :func:`atomic_path` for writers that need a file name)."""
    path = Path(path)
    _mkdir(path.parent, path)
    try:
        fd, tmp = _create_temp(path.parent, f".{path.stem[:16]}.")
    except OSError as exc:
        raise OutputWriteError(path, exc, size) from None
    f = None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        reached = _size_of(tmp)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, OutputWriteError) and exc.errno is not None:
            raise OutputWriteError(path, exc, size or reached or None, at_least=size is None) from None
        raise
    return path


def _size_of(p: Path) -> int:
    try:
        return os.stat(p).st_size
    except OSError:
        return 0


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> Path:
    """:func:`atomic_write` of ``data`` (a full disk names the bytes needed)."""
    return atomic_write(path, lambda f: f.write(data), size=len(data))


def atomic_write_text(path: Union[str, Path], text: str) -> Path:
    """:func:`atomic_write` of UTF-8 ``text``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """For writers that need a file name (OpenCV's video writer, savefig): ``with atomic_path(p) as tmp:`` write
    ``tmp`` (a hidden name in ``p``'s folder with ``p``'s suffix); on success it replaces ``p``, on failure it is
    removed. OSErrors become :class:`OutputWriteError` naming ``p``, as in :func:`atomic_write`."""
    path = Path(path)
    _mkdir(path.parent, path)
    try:
        fd, tmp = _create_temp(path.parent, f".{path.stem[:16]}.", f".tmp{path.suffix}")
        os.close(fd)
    except OSError as exc:
        raise OutputWriteError(path, exc) from None
    try:
        yield tmp
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise OutputWriteError(path, OSError(errno.EIO, "the writer produced no data"))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        reached = _size_of(tmp)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, OutputWriteError) and exc.errno is not None:
            raise OutputWriteError(path, exc, reached or None, at_least=True) from None
        raise


# ------------------------------------------------------------------------------------------------ outputs
PathLike = Union[str, Path]


class WritesIntoInputsError(DensevitError):
    """An output would be written into a command's inputs (refused, ``--overwrite`` or not)."""


def _real(p: PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(p))))


def _creatable(path: Path) -> None:
    """Refuse an output whose would-be parent folder is a file (``--out FILE/sub``): one line, not mkdir's error."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DensevitError(f"cannot write {path}: {parent} is a file, not a folder")
            return


def _writable(out: Path) -> None:
    """Refuse, before any work, an output whose nearest existing folder cannot be written (a read-only file
    system, no permission): the same line :class:`OutputWriteError` gives when a write fails."""
    where = out if out.is_dir() else _existing_parent(out.parent)
    if not where.is_dir() or os.access(where, os.W_OK):
        return
    try:
        ro = bool(os.statvfs(where).f_flag & getattr(os, "ST_RDONLY", 1))
    except OSError:
        ro = False
    raise OutputWriteError(out, OSError(errno.EROFS if ro else errno.EACCES, "read-only" if ro else "denied"))


def _no_link(path: Path) -> None:
    """A path the command keeps as its own (store internals) must be a real file or folder, not a link."""
    if path.is_symlink():
        raise WritesIntoInputsError(f"{path} is a symbolic link (to {os.readlink(path)}); densevit writes its own "
                                    f"files only into the folder they belong to: remove the link")


def check_outputs(inputs: Iterable[PathLike] = (), folders: Iterable[PathLike] = (), files: Iterable[PathLike] = (),
                  overwrite: bool = False, internals: Iterable[PathLike] = ()) -> None:
    """The one output rule of every command, checked before it writes anything (raises a one-line
    :class:`DensevitError`; commands exit 2):

    * an output folder (``folders``) is a folder or does not exist yet; an output file (``files``) is not a
      folder, and an existing one is replaced only with ``overwrite``; no output lies below a file;
    * no command writes into its inputs, ``overwrite`` or not: an output folder that is, lies inside or
      contains an input folder, and an output file that is an input file or lies inside an input folder, are
      refused. ``inputs`` are the paths the command reads (files or folders; missing ones and None are
      ignored here). Every path is compared resolved (through symbolic links);
    * the place of every output can be written (not a read-only file system, not without permission);
    * ``internals`` (files and folders a command keeps as its own, such as a store's ``shards/``) are not
      symbolic links: whatever they point to is never written into nor pruned."""
    for p in internals:
        _no_link(Path(p))
    in_dirs: List[Tuple[Path, Path]] = []           # (as given, resolved)
    in_files: List[Tuple[Path, Path]] = []
    for p in inputs:
        if p is not None and Path(p).is_dir():
            in_dirs.append((Path(p), _real(p)))
        elif p is not None and Path(p).exists():
            in_files.append((Path(p), _real(p)))
    for out in map(Path, folders):
        if out.exists() and not out.is_dir():
            raise DensevitError(f"output folder {out} exists and is not a folder; give a folder to write into")
        _creatable(out)
        r = _real(out)
        for given, d in in_dirs:
            how = ("is" if r == d else "lies inside" if d in r.parents else "contains" if r in d.parents else None)
            if how:
                raise WritesIntoInputsError(f"output folder {out} {how} the input folder {given}; no command "
                                            f"writes into its inputs: choose another output folder")
        _writable(out)
    for out in map(Path, files):
        if out.is_dir():
            raise DensevitError(f"output {out} is a folder; give a file name")
        _creatable(out)
        r = _real(out)
        for given, f in in_files:
            if r == f or (out.exists() and os.path.samefile(out, given)):
                raise WritesIntoInputsError(f"output {out} is the input {given}; no command writes into its "
                                            f"inputs: choose another output")
        for given, d in in_dirs:
            if d in r.parents:
                raise WritesIntoInputsError(f"output {out} lies inside the input folder {given}; no command "
                                            f"writes into its inputs: choose another output folder")
        if out.exists() and not overwrite:
            raise DensevitError(f"{out} exists; pass --overwrite to replace it")
        _writable(out)


def ensure_writable(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless ``overwrite`` (:func:`check_outputs` of one file)."""
    check_outputs(files=[path], overwrite=overwrite)
