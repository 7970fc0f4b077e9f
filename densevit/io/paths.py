"""Where the project's shared data lives (read-only fixtures, DAVIS subset, example images)."""
from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The source checkout's root (the folder holding ``densevit/``)."""
    return Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """The shared data folder: ``$DENSEVIT_SHARED`` or ``<repo>/../shared``."""
    env = os.environ.get("DENSEVIT_SHARED")
    return Path(env) if env else repo_root().parent / "shared"


def golden_weights() -> Path:
    """The fixed random ViT-S/8 weights (official DINO layout, fp16) used by tests and smoke runs."""
    return shared_dir() / "golden" / "vits8_random_fp16.pth"


def example_images() -> list[Path]:
    """The two example photographs (cat, ibex)."""
    d = shared_dir() / "data" / "images"
    return [d / "cat.jpg", d / "ibex.jpg"]
