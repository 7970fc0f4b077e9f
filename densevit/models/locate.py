"""Where users keep checkpoint files: the one search every loader (backbones, upsamplers) calls.

Folders, in order: ``$DENSEVIT_WEIGHTS`` (a folder of checkpoints), then torch.hub's checkpoint folder
(``torch.hub.get_dir()/checkpoints``, i.e. ``$TORCH_HOME/hub/checkpoints``, where ``torch.hub.load`` and
``load_state_dict_from_url`` keep the official files)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["WEIGHTS_ENV", "checkpoint_dirs", "find_checkpoint", "describe_search"]

WEIGHTS_ENV = "DENSEVIT_WEIGHTS"


def torch_hub_checkpoints() -> Path:
    """torch.hub's checkpoint folder (honours ``$TORCH_HOME``)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def checkpoint_dirs() -> List[Path]:
    """The folders searched for checkpoint files by name, in order."""
    dirs = []
    root = os.environ.get(WEIGHTS_ENV)
    if root:
        dirs.append(Path(root))
    dirs.append(torch_hub_checkpoints())
    return dirs


def find_checkpoint(file_names: Sequence[str]) -> Optional[Path]:
    """The first existing file named in ``file_names`` (relative paths allowed) in :func:`checkpoint_dirs`."""
    for d in checkpoint_dirs():
        for name in file_names:
            p = d / name
            if p.is_file():
                return p
    return None


def describe_search(file_names: Sequence[str]) -> str:
    """One phrase naming where :func:`find_checkpoint` looked, for error messages."""
    env = os.environ.get(WEIGHTS_ENV)
    first = file_names[0] if file_names else "?"
    places = [f"${WEIGHTS_ENV}={env}" if env else f"${WEIGHTS_ENV} (unset)", str(torch_hub_checkpoints())]
    return f"{first!r} (or {len(file_names) - 1} other name(s)) in " + ", ".join(places) if len(file_names) > 1 \
        else f"{first!r} in " + ", ".join(places)
