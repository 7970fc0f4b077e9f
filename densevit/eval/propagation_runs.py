"""What the label-propagation benchmarks (``benchmarks/jhmdb.py``, ``benchmarks/vip.py``) share: the
settings a results folder was made with (a run with other settings is refused), and dealing the videos still to
do to the ranks of a ``torchrun`` run."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Dict, List, Sequence, TypeVar

from ..errors import DensevitError
from ..io.files import atomic_write
from ..runtime import dist

T = TypeVar("T")

__all__ = ["settings_of", "check_settings", "plan_videos"]


def settings_of(args: argparse.Namespace) -> Dict[str, object]:
    """Everything that changes the predictions."""
    keys = ("protocol", "backbone", "weights", "stride", "dtype", "layer", "facet", "context", "topk", "radius",
            "temperature", "crop_size")
    s = {k: getattr(args, k) for k in keys}
    if s["weights"] not in (None, "random"):
        s["weights"] = str(Path(s["weights"]).resolve())
    return s


def check_settings(out: Path, settings: Dict[str, object], recompute: bool, done: Callable[[], List[Path]]) -> None:
    """Refuse to mix results of different settings in ``out`` (``recompute`` invalidates the old ones: the
    markers ``done()`` lists are removed)."""
    path = out / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff and not recompute:
            raise DensevitError(f"{out} holds results made with other settings ({', '.join(diff)}); "
                                f"use another --out or --recompute")
        if diff:
            for marker in done():
                marker.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(settings, indent=1).encode()))


def plan_videos(ctx: dist.DistContext, make: Callable[[], Sequence[T]], costs: Callable[[Sequence[T]], List[float]]
                ) -> List[T]:
    """This rank's videos: ``make()`` (on rank 0) lists those still to do, dealt by ``costs`` (frames)."""
    def plan() -> List[List[T]]:
        todo = list(make())
        return dist.deal(todo, costs(todo), ctx.world_size)

    return ctx.on_main(plan)[ctx.rank]
