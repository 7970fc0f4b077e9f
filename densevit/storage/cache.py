"""On-disk cache of descriptor sets reused across runs (a dataset, a video), validated on every load.

One file per key: ``<root>/<sha256 of the canonical key JSON>.pt``, written atomically (temp file in the same
folder + ``os.replace``). The file is a ``torch.save`` of ``{"format", "key", "checksum", "kinds", "payload"}``
where ``key`` is the canonical key JSON and ``checksum`` a SHA-256 over every payload entry (name, dtype, shape,
raw bytes). A file that cannot be read (truncated, garbage), whose key differs from the requested one, or whose
payload no longer matches its checksum is reported with a :class:`CacheWarning` and rebuilt, never used.
Loading uses ``torch.load(weights_only=True)``: no arbitrary unpickling.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from ..io.files import atomic_write, canonical_key, key_digest

__all__ = ["CacheWarning", "CacheError", "DescriptorCache"]

FORMAT = "densevit-cache-v1"
Payload = Dict[str, Any]  # name -> torch.Tensor | np.ndarray | JSON value (int, float, str, bool, None, list, dict)


class CacheWarning(UserWarning):
    """A cache entry was invalid (corrupt, wrong key, checksum mismatch) and is being rebuilt."""


class CacheError(Exception):
    """An entry failed validation (the message says why); raised internally, turned into a CacheWarning."""


# ------------------------------------------------------------------------------------------------- payloads
def _to_storable(payload: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Tensors -> CPU tensors owning exactly their data; ndarrays -> tensors (kind remembered); JSON kept."""
    if not isinstance(payload, Mapping):
        raise TypeError(f"compute() must return a dict, got {type(payload).__name__}")
    stored: Dict[str, Any] = {}
    kinds: Dict[str, str] = {}
    for name, value in payload.items():
        if not isinstance(name, str):
            raise TypeError(f"payload keys must be strings, got {name!r}")
        if isinstance(value, torch.Tensor):
            t, kinds[name] = value.detach().cpu(), "tensor"
        elif isinstance(value, np.ndarray):
            if value.dtype == object:
                raise TypeError(f"payload entry {name!r}: object arrays cannot be cached")
            t, kinds[name] = torch.from_numpy(np.ascontiguousarray(value)), "ndarray"
        else:
            json.dumps(value, allow_nan=True)  # raises TypeError for anything else
            stored[name], kinds[name] = value, "json"
            continue
        t = t.contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():  # a view: don't save the whole base
            t = t.clone()
        stored[name] = t
    return stored, kinds


def _checksum(stored: Mapping[str, Any], kinds: Mapping[str, str]) -> str:
    """SHA-256 over every entry's name, kind, dtype, shape and raw bytes (JSON values: canonical JSON)."""
    h = hashlib.sha256()
    for name in sorted(stored):
        value = stored[name]
        h.update(json.dumps([name, kinds.get(name)]).encode())
        if isinstance(value, torch.Tensor):
            h.update(f"{value.dtype}{tuple(value.shape)}".encode())
            if value.numel():
                h.update(memoryview(value.contiguous().reshape(-1).view(torch.uint8).numpy()))
        else:
            h.update(json.dumps(value, sort_keys=True).encode())
    return h.hexdigest()


def _from_stored(stored: Mapping[str, Any], kinds: Mapping[str, str],
                 map_location: Union[str, torch.device]) -> Payload:
    out: Payload = {}
    for name, value in stored.items():
        kind = kinds[name]
        if kind == "ndarray":
            out[name] = value.numpy()
        elif kind == "tensor":
            out[name] = value.to(map_location)
        else:
            out[name] = value
    return out


# ---------------------------------------------------------------------------------------------------- cache
class DescriptorCache:
    """Descriptor sets on disk under ``root``, one validated file per key.

    ``key`` is a JSON-serialisable dict naming everything the payload depends on, e.g.
    ``{"image": file_fingerprint(path), "backbone": "dino_vits8", "weights": "<sha256 or 'random'>",
    "stride": 4, "load_size": 224, "layer": 11, "facet": "key", "bin": False, "dtype": "float32"}``.
    """

    def __init__(self, root: Union[str, Path]) -> None:
        self.root = Path(root)

    def path_for(self, key: Mapping[str, Any]) -> Path:
        """The file that holds (or will hold) ``key``'s entry."""
        return self.root / f"{key_digest(key)}.pt"

    def __contains__(self, key: Mapping[str, Any]) -> bool:
        """True when an entry file exists for ``key`` (not validated)."""
        return self.path_for(key).is_file()

    def _read(self, path: Path, key_json: str, map_location: Union[str, torch.device]) -> Payload:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated zip, garbage bytes, unpickling refused...
            first_line = (str(exc).splitlines() or [""])[0][:120]
            raise CacheError(f"unreadable ({type(exc).__name__}: {first_line})") from None
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise CacheError("not a densevit cache file")
        if blob.get("key") != key_json:
            raise CacheError("stored key differs from the requested key")
        stored, kinds = blob.get("payload"), blob.get("kinds")
        if not isinstance(stored, dict) or not isinstance(kinds, dict) or set(stored) != set(kinds):
            raise CacheError("malformed payload")
        if _checksum(stored, kinds) != blob.get("checksum"):
            raise CacheError("payload checksum mismatch")
        return _from_stored(stored, kinds, map_location)

    def load(self, key: Mapping[str, Any], map_location: Union[str, torch.device] = "cpu") -> Optional[Payload]:
        """The validated entry for ``key``, or None when missing or invalid (invalid: a CacheWarning)."""
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            return self._read(path, canonical_key(key), map_location)
        except CacheError as exc:
            warnings.warn(f"densevit cache: ignoring {path}: {exc}; it will be rebuilt", CacheWarning, stacklevel=3)
            return None

    def save(self, key: Mapping[str, Any], payload: Mapping[str, Any]) -> Path:
        """Store ``payload`` (dict of tensors / ndarrays / JSON values) under ``key`` atomically; returns the path."""
        key_json = canonical_key(key)
        stored, kinds = _to_storable(payload)
        blob = {"format": FORMAT, "key": key_json, "checksum": _checksum(stored, kinds), "kinds": kinds,
                "payload": stored}
        return atomic_write(self.path_for(key), lambda f: torch.save(blob, f))

    def get_or_compute(self, key: Mapping[str, Any], compute: Callable[[], Mapping[str, Any]],
                       map_location: Union[str, torch.device] = "cpu") -> Payload:
        """The cached payload for ``key`` if valid, else ``compute()``'s result (stored, then returned as is).

        Cached tensors come back on ``map_location``; ndarrays come back as ndarrays.
        """
        cached = self.load(key, map_location)
        if cached is not None:
            return cached
        payload = compute()
        self.save(key, payload)
        return dict(payload)
