"""Inverted lists on disk: an IVF index encoded in parts and merged into FAISS's ``OnDiskInvertedLists``.

The route of FAISS's own distributed on-disk benchmark (``faiss.contrib.ondisk.merge_ondisk``): a trained, empty
IVF index is copied to every worker; each encodes its share of the vectors (``add_with_ids``) into part files,
one part in memory at a time; the parts' inverted lists are merged, list by list and in part order, into one
file of lists (``*.ivfdata``) that search memory-maps read-only. With parts in ascending id order every merged
list is in ascending id order, whichever worker encoded which part: one process and N processes write the same
bytes.

Memory: a worker holds the trained index (coarse quantizer, PQ tables), one part's codes and ids
(``part_vectors x (code_size + 8)`` bytes) and one chunk of float32 vectors; the merge reads the parts through
``mmap`` (page cache, not process memory) and holds, per part, only its list directory (``nlist`` entries, see
:func:`lists_of`), nothing per vector. Search holds the trained index and the
list directory (``nlist`` entries); the codes are read from the mapped file.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
import contextlib
import sys
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import DensevitError
from ..io.files import atomic_path, atomic_write
from ..matching import knn as knn_index

__all__ = ["LIST_ENTRY_OVERHEAD", "all_threads", "encode_part", "filter_parts", "faiss_module", "index_from_bytes", "index_to_bytes",
           "free_bytes", "list_sizes", "lists_of", "merge_lists", "open_index", "open_part", "quiet_stdout", "sample_sha256", "write_index"]

LIST_ENTRY_OVERHEAD = 8          # bytes per vector in an inverted list besides its code: the int64 id
SAMPLE_BLOCKS, SAMPLE_BLOCK = 64, 1 << 16


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """FAISS's on-disk lists print to the C ``stdout`` (``resizing ...``, ``updating ondisk filename ...``):
    silenced while they run, so a command's own output stays its own."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:                                  # no file descriptor 1 (an embedding host): nothing to hide
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def all_threads() -> Iterator[None]:
    """FAISS on every core of this machine while it runs (rank 0 training while the other ranks wait; torchrun
    gives each rank ``OMP_NUM_THREADS=1``). The trained tables do not depend on the thread count."""
    faiss = faiss_module()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(os.cpu_count() or before)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def faiss_module():
    """FAISS, or one line saying how to get it (on-disk lists are FAISS's)."""
    if not knn_index.faiss_available():
        raise DensevitError("an on-disk index needs FAISS (pip install faiss-cpu)")
    return knn_index.faiss


def index_to_bytes(index: Any) -> np.ndarray:
    """A FAISS index serialised (uint8), e.g. to broadcast a trained index to every rank."""
    return faiss_module().serialize_index(index)


def index_from_bytes(data: np.ndarray) -> Any:
    return faiss_module().deserialize_index(np.ascontiguousarray(data, dtype=np.uint8))


def write_index(index: Any, path: Union[str, Path]) -> Path:
    """``faiss.write_index`` through the atomic writer."""
    faiss = faiss_module()
    return atomic_write(path, lambda f: faiss.write_index(index, faiss.PyCallbackIOWriter(f.write)))


def encode_part(trained: np.ndarray, chunks: Iterable[Tuple[np.ndarray, np.ndarray]], path: Union[str, Path]) -> int:
    """Add ``(x NxD float32, ids N int64)`` chunks to a copy of the ``trained`` (serialised, empty) IVF index and
    write it to ``path``: one part. Returns the vectors added."""
    index = index_from_bytes(trained)
    for x, ids in chunks:
        if len(x):
            index.add_with_ids(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(ids, np.int64))
    write_index(index, path)
    return int(index.ntotal)


def open_part(path: Union[str, Path]) -> Any:
    """A part written by :func:`encode_part`, its lists memory-mapped (not read into memory)."""
    faiss = faiss_module()
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)


def open_index(path: Union[str, Path]) -> Any:
    """An index whose lists are on disk, opened read-only; its ``.ivfdata`` file is looked for beside it."""
    faiss = faiss_module()
    with quiet_stdout():
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)


def _ivf(index: Any) -> Any:
    return faiss_module().extract_index_ivf(index)


@contextlib.contextmanager
def lists_of(indexes: Iterable[Any]) -> Iterator[List[Any]]:
    """The inverted lists of ``indexes`` (opened with :func:`open_part` or :func:`open_index`: FAISS's
    ``OnDiskInvertedLists``, memory-mapped), each index dropped as soon as its lists are taken. A merge of P parts
    then holds P list directories (``nlist`` entries each), not P coarse quantizers (``nlist x d`` float32 each:
    6 MiB at 4096 lists of 384 dimensions) and PQ tables. The lists are unmapped on exit."""
    faiss = faiss_module()
    held: List[Any] = []
    try:
        for index in indexes:
            ivf = _ivf(index)
            lists = faiss.downcast_InvertedLists(ivf.invlists)
            if not isinstance(lists, faiss.OnDiskInvertedLists):
                raise DensevitError(f"expected inverted lists on disk or memory-mapped, got {type(lists).__name__}")
            ivf.own_invlists = False                 # the lists outlive their index; freed below
            held.append(lists)
            del index, ivf
        yield held
    finally:
        for lists in held:                           # SWIG's proxy of a downcast pointer owns nothing: free here
            faiss.OnDiskInvertedLists.__swig_destroy__(lists)
        held.clear()


def merge_lists(trained: np.ndarray, sources: Sequence[Any], lists_path: Union[str, Path],
                index_path: Union[str, Path]) -> int:
    """Merge the inverted lists ``sources`` (from :func:`lists_of`, with the ``trained`` index's ``nlist`` and code
    size), in order, into the on-disk file ``lists_path``, and write the searchable index (trained tables + the
    list directory, naming ``lists_path``'s file) to ``index_path``. Both files appear only complete. Returns the
    vectors merged."""
    faiss = faiss_module()
    lists_path, index_path = Path(lists_path), Path(index_path)
    index = index_from_bytes(trained)
    ivf = _ivf(index)
    if index.ntotal:
        raise DensevitError("the trained index to merge into must be empty")
    with atomic_path(lists_path) as tmp, quiet_stdout():
        invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(tmp))
        vec = faiss.InvertedListsPtrVector()
        for src in sources:
            vec.push_back(src)
        total = int(invlists.merge_from_multiple(vec.data(), vec.size(), False, False))
        invlists.filename = lists_path.name          # the name the index records (looked for beside it)
        index.ntotal = ivf.ntotal = total
        ivf.replace_invlists(invlists, True)
        invlists.this.disown()
        write_index(index, index_path)
        del index, ivf                               # unmaps the lists before the file is renamed
    return total


def filter_parts(src: Any, keep: Callable[[np.ndarray], np.ndarray], trained: np.ndarray, folder: Union[str, Path],
                 prefix: str, max_entries: int) -> List[Path]:
    """The entries of ``src`` whose ids ``keep(ids)`` marks True, list order kept, written as parts (each holding
    whole lists, about ``max_entries`` entries in memory at most) to merge with :func:`merge_lists`: what pruning
    images leaves. Returns the part paths, in list order."""
    faiss = faiss_module()
    sl = _ivf(src).invlists
    cs = _ivf(src).code_size
    paths: List[Path] = []
    part, held = None, 0

    def flush() -> None:
        nonlocal part, held
        if part is not None:
            path = Path(folder) / f"{prefix}{len(paths):05d}.faiss"
            write_index(part, path)
            paths.append(path)
        part, held = None, 0

    for li in range(sl.nlist):                       # a loop over lists (bounded by nlist), numpy inside
        n = sl.list_size(li)
        if n == 0:
            continue
        ids = faiss.rev_swig_ptr(sl.get_ids(li), n).copy()
        mask = np.asarray(keep(ids), bool)
        k = int(mask.sum())
        if k == 0:
            continue
        codes = np.ascontiguousarray(faiss.rev_swig_ptr(sl.get_codes(li), n * cs).reshape(n, cs)[mask])
        kept = np.ascontiguousarray(ids[mask])       # named: swig_ptr does not keep its array alive
        if part is None:
            part = index_from_bytes(trained)
        _ivf(part).invlists.add_entries(li, k, faiss.swig_ptr(kept), faiss.swig_ptr(codes))
        part.ntotal += k
        held += k
        if held >= max_entries:
            flush()
    flush()
    return paths


def list_sizes(index: Any) -> np.ndarray:
    """The number of entries of every inverted list (``nlist``)."""
    ivf = _ivf(index)
    return np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], np.int64)


def sample_sha256(path: Union[str, Path], blocks: int = SAMPLE_BLOCKS, block: int = SAMPLE_BLOCK) -> str:
    """SHA-256 of ``blocks`` blocks of ``block`` bytes spread evenly over the file (its start and end included):
    what a load checks of a file too large to hash whole each time (a truncated, zero-filled or half-written
    list file differs in some block)."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= blocks * block:
            h.update(f.read())
        else:
            for off in np.linspace(0, size - block, blocks).astype(np.int64):
                f.seek(int(off))
                h.update(f.read(block))
    return h.hexdigest()


def free_bytes(folder: Union[str, Path]) -> Optional[int]:
    """Bytes free on the disk holding ``folder`` (its nearest existing parent); None where unknown."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return int(st.f_bavail * st.f_frsize)
