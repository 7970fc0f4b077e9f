"""Which weights made an output: the one place that names them and hashes their file.

Every output of densevit (a ``.npz`` of descriptors, a feature store's manifest, an application's
``summary.json``, a benchmark's settings) records :func:`weights_provenance`: the backbone, the weights' source
(a file name, ``random``, or the Hub) and the SHA-256 of the file, so a reader can tell real features from random
ones and two runs' weights apart. The hash of a file is computed once per process (:func:`_cached_sha256`).
Random weights also raise a :class:`~densevit.errors.RandomWeightsWarning` (from
:func:`densevit.models.weights.load_backbone`),
which every command prints as one line on stderr.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Dict, Union

from ..io.files import file_sha256

__all__ = ["weights_provenance", "provenance_fields", "describe", "from_fingerprint"]


@functools.lru_cache(maxsize=32)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def _sha256(path: Path) -> str:
    st = path.stat()
    return _cached_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


def weights_provenance(weights: Union[str, Path, None], backbone: str) -> Dict[str, Any]:
    """What identifies the weights of ``backbone`` given as ``weights`` (a file or folder, ``"random"``, or None:
    the first local file found, else the Hub): ``{"backbone", "source", "name", "size", "sha256"}`` where
    ``source`` is ``"file"``, ``"random"`` or ``"timm-hub"``; ``name`` the file (or folder) name, ``random`` or
    the Hub id; ``size``/``sha256`` those of the file(s) (None without a file; several files: their digests
    joined by commas)."""
    from .registry import get_spec
    from .weights import find_local_weights, weights_files

    spec = get_spec(backbone)
    if weights is None:
        local = find_local_weights(spec)
        if local is None:
            return {"backbone": spec.name, "source": "timm-hub", "name": spec.hub_name, "size": None, "sha256": None}
        weights = local
    if str(weights) == "random":
        return {"backbone": spec.name, "source": "random", "name": "random", "size": None, "sha256": None}
    p, files = Path(weights), weights_files(weights)   # a transformers folder: its checkpoint file(s)
    digest = ",".join(_sha256(f) for f in files)
    return {"backbone": spec.name, "source": "file", "name": p.name, "size": sum(f.stat().st_size for f in files),
            "sha256": digest}


def from_fingerprint(fingerprint: Dict[str, Any], backbone: str) -> Dict[str, Any]:
    """The provenance recorded in a feature store's manifest (its ``weights`` fingerprint) in the form of
    :func:`weights_provenance`."""
    source = fingerprint.get("source", "file")
    name = fingerprint.get("name") or ("random" if source == "random" else source)
    return {"backbone": backbone, "source": source, "name": name, "size": fingerprint.get("size"),
            "sha256": fingerprint.get("sha256")}


def provenance_fields(prov: Dict[str, Any]) -> Dict[str, str]:
    """The flat string fields a ``.npz`` or a CSV column set holds: ``backbone``, ``weights`` (file name,
    ``random`` or the Hub id), ``weights_sha256`` (empty without a file)."""
    return {"backbone": str(prov["backbone"]), "weights": str(prov["name"]), "weights_sha256": prov["sha256"] or ""}


def describe(prov: Dict[str, Any]) -> str:
    """One phrase: ``dino_vits8, weights x.pth (sha256 1a2b3c4d...)``."""
    if prov["source"] == "random":
        return f"{prov['backbone']}, random weights"
    sha = f" (sha256 {prov['sha256'][:12]}...)" if prov.get("sha256") else ""
    return f"{prov['backbone']}, weights {prov['name']}{sha}"

