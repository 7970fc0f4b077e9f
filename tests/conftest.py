"""Shared fixtures: the golden random-weight ViT-S/8 and the shared data folder (never downloaded)."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from densevit.io.paths import golden_weights, shared_dir


@pytest.fixture(scope="session")
def shared() -> Path:
    d = shared_dir()
    if not (d / "golden").is_dir():
        raise RuntimeError(f"shared data not found at {d}: clone the project with ../shared beside it "
                           f"or set DENSEVIT_SHARED")
    return d


@pytest.fixture(scope="session")
def golden_path(shared) -> Path:
    return golden_weights()


@pytest.fixture(scope="session")
def golden(shared):
    return np.load(shared / "golden" / "extractor_golden.npz")


@functools.lru_cache(maxsize=8)
def _extractor(stride: int, dtype: str = "float32"):
    from densevit import ViTExtractor

    return ViTExtractor("dino_vits8", stride=stride, weights=str(golden_weights()), device="cpu", dtype=dtype)


@pytest.fixture(scope="session")
def make_extractor(shared):
    """``make_extractor(stride, dtype='float32')`` -> a cached golden-weight ViT-S/8 extractor on the CPU."""
    return _extractor


@pytest.fixture(scope="session")
def images(shared) -> list[Path]:
    d = shared / "data" / "images"
    return [d / "cat.jpg", d / "ibex.jpg"]


@pytest.fixture(scope="module")
def one_thread():
    """Run a module single-threaded, then restore. torch and FAISS share one OpenMP runtime whose spin-waiting
    makes small ops several times slower with 2 threads when other processes compete for the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def load_benchmark(monkeypatch):
    """``load_benchmark(name)`` -> the module ``benchmarks/<name>.py``, its extractor built once per stride (speed)."""
    import importlib.util

    from densevit.io.paths import repo_root

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", repo_root() / "benchmarks" / f"{name}.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        built, orig = {}, bench.build_extractor

        def build(args):
            if args.stride not in built:
                built[args.stride] = orig(args)
            return built[args.stride]

        monkeypatch.setattr(bench, "build_extractor", build)
        return bench

    return load


@pytest.fixture(scope="session")
def noise_pair():
    """Two 144x112 RGB noise images, the second the first's content moved 16 pixels right (a shifted copy):
    random-weight descriptors match identical textured content, so matches must shift by the same amount."""
    from PIL import Image

    base = np.random.default_rng(14).integers(0, 256, (112, 176, 3), dtype=np.uint8)
    a = Image.fromarray(np.ascontiguousarray(base[:, 16:160]))
    b = Image.fromarray(np.ascontiguousarray(base[:, 0:144]))
    return a, b
