"""Progress of long work, one rule for every command: a tqdm bar per loop (images, sets, frames) on a terminal, one
status line per stage off a terminal (a log, a pipe, CI), nothing with ``--quiet``.

A command opens a :class:`Progress` with :func:`reporting`; the algorithms below it (any layer) call
:func:`track` around their loops and :func:`stage` before their steps, which do nothing when no command reports
(library use stays silent)::

    with reporting(Progress("densevit-coseg", quiet=args.quiet)):
        feats = [extract(im) for im in track(images, "extracting", "image")]
        stage("clustering")
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import IO, Iterable, Iterator, Optional, TypeVar

__all__ = ["Progress", "reporting", "track", "stage", "current"]

T = TypeVar("T")


class Progress:
    """How one command shows progress on ``stream`` (default stderr): bars on a terminal, status lines
    (``prog: [where: ]text``) elsewhere, nothing when ``quiet``. ``where`` (e.g. ``"set cats"``) prefixes the
    status lines of the current set."""

    def __init__(self, prog: str, quiet: bool = False, stream: Optional[IO[str]] = None,
                 terminal: Optional[bool] = None) -> None:
        self.prog, self.quiet = prog, quiet
        self.stream = stream if stream is not None else sys.stderr
        if terminal is None:
            isatty = getattr(self.stream, "isatty", None)
            terminal = bool(isatty and isatty())
        self.terminal = terminal
        self.where = ""

    def stage(self, text: str) -> None:
        """One status line off a terminal (on a terminal the bars say it)."""
        if self.quiet or self.terminal:
            return
        where = f"{self.where}: " if self.where else ""
        print(f"{self.prog}: {where}{text}", file=self.stream, flush=True)

    def track(self, items: Iterable[T], desc: str, unit: str = "image", total: Optional[int] = None,
              leave: bool = False) -> Iterator[T]:
        """``items``, with a tqdm bar on a terminal or one status line (``desc: N units``) off it."""
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        if self.quiet:
            yield from items
            return
        if not self.terminal:
            count = f" ({total} {unit}{'' if total == 1 else 's'})" if total is not None else ""
            self.stage(f"{desc}{count}")
            yield from items
            return
        from tqdm import tqdm

        where = f"{self.where} " if self.where else ""
        with tqdm(items, desc=f"{where}{desc}", unit=unit, total=total, leave=leave, file=self.stream,
                  dynamic_ncols=True) as bar:
            yield from bar

    def write(self, line: str, stream: Optional[IO[str]] = None) -> None:
        """A line printed above any bar (results, errors)."""
        from tqdm import tqdm

        tqdm.write(line, file=stream if stream is not None else sys.stdout)


_current: ContextVar[Optional[Progress]] = ContextVar("densevit_progress", default=None)


def current() -> Optional[Progress]:
    """The :class:`Progress` of the running command, or None (library use)."""
    return _current.get()


@contextmanager
def reporting(progress: Progress) -> Iterator[Progress]:
    """Make ``progress`` the one :func:`track` and :func:`stage` report to, inside the block."""
    token = _current.set(progress)
    try:
        yield progress
    finally:
        _current.reset(token)


def track(items: Iterable[T], desc: str, unit: str = "image", total: Optional[int] = None) -> Iterable[T]:
    """``items`` shown by the running command's :class:`Progress` (unchanged when none reports)."""
    p = _current.get()
    return items if p is None else p.track(items, desc, unit, total)


def stage(text: str) -> None:
    """A status line of the running command's :class:`Progress` (nothing when none reports)."""
    p = _current.get()
    if p is not None:
        p.stage(text)
