"""Files: atomic writes, content hashes and keys, and the one output policy every command follows.

Every densevit file that must never be seen half-written (store shards and manifests, caches, indexes, saved
pictures) goes through :func:`atomic_write`; every command checks its outputs with :func:`check_outputs` before
it writes anything.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Type, Union

from ..errors import DensevitError

__all__ = ["PathLike", "WritesIntoInputsError", "check_outputs", "ensure_writable", "atomic_write", "file_sha256",
           "file_problem", "verify_file", "canonical_key", "key_digest", "file_fingerprint"]


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


def atomic_write(path: Union[str, Path], write: Callable[[Any], None]) -> Path:
    """Write a file atomically: ``write(f)`` fills a temp file in the same folder (flushed, fsync'ed), which then
    replaces ``path`` with ``os.replace``; readers see the old file or the complete new one, never a partial one.
    The file gets the mode ``open()`` gives (the umask applies). A failure removes the temp file and re-raises.
    Every densevit file that must never be seen half-written (store, cache, index) is written here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path.parent, f".{path.stem[:16]}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


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


def check_outputs(inputs: Iterable[PathLike] = (), folders: Iterable[PathLike] = (), files: Iterable[PathLike] = (),
                  overwrite: bool = False) -> None:
    """The one output rule of every command, checked before it writes anything (raises a one-line
    :class:`DensevitError`; commands exit 2):

    * an output folder (``folders``) is a folder or does not exist yet; an output file (``files``) is not a
      folder, and an existing one is replaced only with ``overwrite``; no output lies below a file;
    * no command writes into its inputs, ``overwrite`` or not: an output folder that is, lies inside or
      contains an input folder, and an output file that is an input file or lies inside an input folder, are
      refused. ``inputs`` are the paths the command reads (files or folders; missing ones and None are
      ignored here)."""
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


def ensure_writable(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless ``overwrite`` (:func:`check_outputs` of one file)."""
    check_outputs(files=[path], overwrite=overwrite)
