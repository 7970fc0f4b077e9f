"""Tests for densevit.storage.cache: roundtrip, hits skip compute, corrupt / foreign / tampered entries are rebuilt."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import densevit.storage.cache as cache_mod
from densevit.io.files import canonical_key, file_fingerprint
from densevit.storage.cache import CacheWarning, DescriptorCache

KEY = {"image": {"path": "/data/cat.jpg", "size": 1234, "mtime_ns": 1}, "backbone": "dino_vits8",
       "weights": "random", "stride": 4, "load_size": 224, "layer": 11, "facet": "key", "bin": False,
       "dtype": "float32"}


class Counter:
    """compute() stand-in that records its calls."""

    def __init__(self, seed: int = 0):
        self.calls = 0
        self.seed = seed

    def __call__(self):
        self.calls += 1
        g = torch.Generator().manual_seed(self.seed)
        big = torch.randn(4, 50, 24, generator=g)
        return {"descriptors": torch.randn(100, 24, generator=g),
                "half": torch.randn(7, 3, generator=g).to(torch.bfloat16),
                "view": big[1, :10],  # a view into a bigger tensor: only the view is stored
                "saliency": np.linspace(0, 1, 100, dtype=np.float32),
                "mask": torch.arange(100) % 3 == 0,
                "grid_hw": [10, 10]}


def _assert_same(a, b):
    assert set(a) == set(b)
    for name in a:
        if isinstance(a[name], torch.Tensor):
            assert isinstance(b[name], torch.Tensor) and b[name].dtype == a[name].dtype
            assert torch.equal(a[name], b[name]), name
        elif isinstance(a[name], np.ndarray):
            assert isinstance(b[name], np.ndarray) and b[name].dtype == a[name].dtype
            np.testing.assert_array_equal(a[name], b[name])
        else:
            assert a[name] == b[name]


def test_roundtrip_and_hit_skips_compute(tmp_path):
    c = DescriptorCache(tmp_path / "cache")
    compute = Counter()
    first = c.get_or_compute(KEY, compute)
    assert compute.calls == 1
    path = c.path_for(KEY)
    assert path.is_file() and path.parent == tmp_path / "cache" and len(path.stem) == 64
    assert KEY in c
    second = c.get_or_compute(KEY, compute)
    assert compute.calls == 1
    _assert_same(first, second)
    # the view was stored on its own, not with its 4x50x24 base
    assert path.stat().st_size < 40_000
    # a new cache object on the same root (a new run) hits too; key order does not matter
    reordered = dict(reversed(list(KEY.items())))
    third = DescriptorCache(tmp_path / "cache").get_or_compute(reordered, compute)
    assert compute.calls == 1
    _assert_same(first, third)
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]


def test_different_key_different_entry(tmp_path):
    c = DescriptorCache(tmp_path)
    a, b = Counter(0), Counter(1)
    key2 = dict(KEY, layer=9)
    ra = c.get_or_compute(KEY, a)
    rb = c.get_or_compute(key2, b)
    assert a.calls == b.calls == 1
    assert c.path_for(KEY) != c.path_for(key2)
    assert not torch.equal(ra["descriptors"], rb["descriptors"])
    _assert_same(c.get_or_compute(key2, b), rb)
    assert len(list(tmp_path.glob("*.pt"))) == 2


def _rebuilt(c, compute, match):
    with pytest.warns(CacheWarning, match=match):
        out = c.get_or_compute(KEY, compute)
    assert compute.calls == 2
    return out


def test_truncated_file_is_rebuilt(tmp_path):
    c = DescriptorCache(tmp_path)
    compute = Counter()
    ref = c.get_or_compute(KEY, compute)
    path = c.path_for(KEY)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_same(_rebuilt(c, compute, "unreadable"), ref)
    # the rebuilt entry is valid again
    _assert_same(c.get_or_compute(KEY, compute), ref)
    assert compute.calls == 2


def test_garbage_and_empty_files_are_rebuilt(tmp_path):
    c = DescriptorCache(tmp_path)
    for junk in (b"", os.urandom(5000)):
        compute = Counter()
        c.path_for(KEY).write_bytes(junk)
        compute.calls = 1  # as if computed before
        _rebuilt(c, compute, "unreadable")


def test_tampered_bytes_are_rebuilt(tmp_path):
    """Flip bytes inside the stored tensor data (zip structure intact)."""
    c = DescriptorCache(tmp_path)
    compute = Counter()
    ref = c.get_or_compute(KEY, compute)
    path = c.path_for(KEY)
    data = bytearray(path.read_bytes())
    needle = ref["descriptors"].numpy().tobytes()[:64]
    pos = data.find(needle)
    assert pos >= 0
    data[pos + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    # torch may or may not verify zip CRCs: either way the entry must not be used
    _assert_same(_rebuilt(c, compute, "checksum mismatch|unreadable"), ref)


def test_tampered_payload_with_stale_checksum_is_rebuilt(tmp_path):
    """A well-formed file whose payload no longer matches its stored checksum."""
    c = DescriptorCache(tmp_path)
    compute = Counter()
    ref = c.get_or_compute(KEY, compute)
    path = c.path_for(KEY)
    blob = torch.load(path, weights_only=True)
    blob["payload"]["descriptors"][3, 4] += 1.0
    torch.save(blob, path)
    _assert_same(_rebuilt(c, compute, "checksum mismatch"), ref)


def test_key_mismatch_is_rebuilt(tmp_path):
    """A file that holds another key's entry (e.g. a copied file) is never served for this key."""
    c = DescriptorCache(tmp_path)
    other = dict(KEY, facet="query")
    c.get_or_compute(other, Counter(5))
    os.replace(c.path_for(other), c.path_for(KEY))
    compute = Counter()
    compute.calls = 1
    out = _rebuilt(c, compute, "stored key differs")
    _assert_same(out, Counter()())


def test_failed_write_leaves_previous_entry(tmp_path, monkeypatch):
    c = DescriptorCache(tmp_path)
    compute = Counter()
    ref = c.get_or_compute(KEY, compute)
    before = c.path_for(KEY).read_bytes()

    def boom(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod.torch, "save", boom)
    with pytest.raises(OSError):
        c.save(KEY, compute())
    monkeypatch.undo()
    assert c.path_for(KEY).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [c.path_for(KEY).name]
    _assert_same(c.get_or_compute(KEY, compute), ref)


def test_keys_and_fingerprints(tmp_path):
    assert canonical_key({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'
    assert canonical_key({"p": tmp_path}) == canonical_key({"p": str(tmp_path)})
    with pytest.raises(TypeError):
        canonical_key({"x": object()})
    with pytest.raises(ValueError):
        canonical_key({"x": float("nan")})
    f = tmp_path / "img.jpg"
    f.write_bytes(b"abc")
    fp = file_fingerprint(f)
    assert fp["size"] == 3 and fp["path"] == str(f.resolve()) and "mtime_ns" in fp
    assert file_fingerprint(f, content_hash=True)["sha256"] == \
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    with pytest.raises(TypeError):
        DescriptorCache(tmp_path).get_or_compute(KEY, lambda: {"bad": object()})
