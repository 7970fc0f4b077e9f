"""Overlap file work with the model: decode the next inputs and write finished outputs on worker threads while
the device computes. Image decoding (Pillow, OpenCV), PNG encoding and torch's CPU ops release the GIL, so
threads are enough."""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Deque, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """Worker threads for file work: a few, never more than the machine's cores."""
    return max(1, min(4, os.cpu_count() or 1))


def prefetch_map(fn: Callable[[T], R], items: Iterable[T], ahead: int = 16,
                 workers: Optional[int] = None) -> Iterator[R]:
    """``map(fn, items)`` in order, with up to ``ahead`` calls running or done before they are consumed.

    An exception raised by ``fn`` is raised when its result is reached; closing the iterator early cancels the
    calls not yet started. ``ahead <= 0`` runs ``fn`` in the caller's thread.
    """
    if ahead <= 0:
        yield from map(fn, items)
        return
    pending: Deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


class BackgroundWriter:
    """Run write calls (``writer.submit(write_mask, path, mask)``) on worker threads, at most ``max_pending`` at a
    time (a submit waits for the oldest beyond that), and raise the first failure at the next submit or at
    :meth:`close`. Use as a context manager; leaving it waits for every write."""

    def __init__(self, workers: Optional[int] = None, max_pending: int = 32) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers or default_workers())
        self._pending: Deque[Future] = deque()
        self.max_pending = max(1, max_pending)

    def submit(self, fn: Callable[..., object], *args, **kwargs) -> None:
        while self._pending and (self._pending[0].done() or len(self._pending) >= self.max_pending):
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args, **kwargs))

    def close(self) -> None:
        """Wait for every submitted write; raise the first failure."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            for f in self._pending:
                f.cancel()
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # already failing: finish what was started without masking the original error
            for f in self._pending:
                f.cancel()
            self._pool.shutdown(wait=True)
