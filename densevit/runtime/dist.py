"""torch.distributed for densevit's multi-process runs: the one place that reads the launcher's environment.

The same command runs alone or under ``torchrun --nproc_per_node N`` (or SLURM through torchrun): with
``WORLD_SIZE > 1`` in the environment, :func:`init` joins the process group (NCCL with one GPU per rank when
CUDA is there, gloo on the CPU); alone, every helper is a no-op.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from ..errors import DensevitError

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: ``rank`` of ``world_size``, and ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def device(self, requested: Optional[str]) -> Optional[str]:
        """The device for this rank: with CUDA and no explicit index, GPU ``local_rank``; otherwise as given."""
        if self.world_size > 1 and torch.cuda.is_available() and requested in (None, "auto", "cuda"):
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` computed on rank 0 only, its result on every rank; a :class:`DensevitError` it raises is
        raised on every rank (so all ranks stop with the same one-line message)."""
        state: Any = None
        if self.is_main:
            try:
                state = ("ok", fn())
            except DensevitError as exc:
                state = ("error", exc)
        state = self.broadcast(state)
        if state[0] == "error":
            raise state[1]
        return state[1]

    def gather(self, obj: T) -> List[T]:
        """Every rank's ``obj`` (in rank order) on every rank."""
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def shard(self, items: Sequence[T], costs: Optional[Sequence[float]] = None) -> List[T]:
        """This rank's share of ``items`` (deterministic, in the given order). Without ``costs``: every
        ``world_size``-th item from ``rank``. With ``costs``: :func:`deal`, balancing the cost per rank."""
        if costs is None:
            return list(items[self.rank::self.world_size])
        return deal(items, costs, self.world_size)[self.rank]


def deal(items: Sequence[T], costs: Sequence[float], ranks: int) -> List[List[T]]:
    """Items per rank, balancing their total cost: costliest first, each to the rank with the least cost so far
    (ties: lowest rank); each rank's items keep their order in ``items``. Deterministic."""
    load, picked = [0.0] * ranks, [[] for _ in range(ranks)]
    for i in sorted(range(len(items)), key=lambda i: (-costs[i], i)):
        r = min(range(ranks), key=lambda j: (load[j], j))
        picked[r].append(i)
        load[r] += costs[i]
    return [[items[i] for i in sorted(ix)] for ix in picked]


def init(timeout_minutes: float = 60.0) -> DistContext:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``); a single process when ``WORLD_SIZE`` is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistContext(rank, world, local)


def finish(ctx: DistContext, clean: bool = True) -> None:
    """Leave the process group: after a final barrier when ``clean``; at once when this rank is failing (the
    others may be inside another collective; torchrun stops them)."""
    if ctx.distributed:
        if clean:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def session(timeout_minutes: float = 60.0) -> Iterator[DistContext]:
    """``with session() as ctx:`` -- :func:`init` on entry, :func:`finish` on exit (at once, without the final
    barrier, when the body raises)."""
    ctx = init(timeout_minutes)
    try:
        yield ctx
    except BaseException:
        finish(ctx, clean=False)
        raise
    finish(ctx)


def main_with_session(body: Callable[[Optional[Sequence[str]], DistContext], int]
                      ) -> Callable[[Optional[Sequence[str]]], int]:
    """``main(argv)`` of a command that runs alone or under torchrun: ``body(argv, ctx)`` inside :func:`session`."""

    def main(argv: Optional[Sequence[str]] = None) -> int:
        with session() as ctx:
            return body(argv, ctx)

    main.__doc__ = body.__doc__
    return main
