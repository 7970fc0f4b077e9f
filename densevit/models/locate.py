"""Where users keep checkpoint files: the one search every loader (backbones, upsamplers) calls.

Places, in order (after an explicit file): ``$DENSEVIT_WEIGHTS`` (a folder of checkpoints), torch.hub's
checkpoint folder (``torch.hub.get_dir()/checkpoints``, i.e. ``$TORCH_HOME/hub/checkpoints``, where
``torch.hub.load`` and ``load_state_dict_from_url`` keep the official files), then the Hugging Face cache
(``$HF_HUB_CACHE``, ``$HF_HOME/hub``; read through huggingface_hub's own cache API, never the network).
Whether a download may be tried is :func:`hub_online`, decided without a fixed wait."""
from __future__ import annotations

import os
import socket
import threading
import urllib.request
from pathlib import Path
from typing import List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

__all__ = ["WEIGHTS_ENV", "checkpoint_dirs", "find_checkpoint", "describe_search", "hf_cache_dir", "find_in_hf_cache",
           "hub_endpoint", "hub_offline_reason", "probe_target", "hub_online", "PROBE_TIMEOUT"]

WEIGHTS_ENV = "DENSEVIT_WEIGHTS"
# what a Hub repo of timm or transformers holds (an index: a sharded checkpoint, read as its snapshot folder)
HF_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
PROBE_TIMEOUT = 0.5                                      # seconds: one connection attempt to the hub (or proxy)
_TRUE = {"1", "on", "yes", "true"}


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


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def find_in_hf_cache(repo_ids: Sequence[str], file_names: Sequence[str] = HF_FILES) -> Optional[Path]:
    """The first of ``file_names`` cached (any revision the cache's ``main`` ref points at) for the first repo of
    ``repo_ids`` that has one, through ``huggingface_hub.try_to_load_from_cache`` (no network); for a sharded
    checkpoint's index, the snapshot folder that holds it and its shards."""
    from huggingface_hub import try_to_load_from_cache

    cache = str(hf_cache_dir())
    for repo in repo_ids:
        for name in file_names:
            got = try_to_load_from_cache(repo, name, cache_dir=cache)
            if isinstance(got, str) and Path(got).is_file():
                return Path(got).parent if name.endswith(".index.json") else Path(got)
    return None


def hub_endpoint() -> str:
    """The Hub's URL: ``$HF_ENDPOINT`` (a mirror), else huggingface_hub's (``https://huggingface.co``)."""
    env = os.environ.get("HF_ENDPOINT")
    if env:
        return env.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def hub_offline_reason() -> Optional[str]:
    """Why no download may be tried without asking the network (``HF_HUB_OFFLINE`` set), else ``None``."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return "HF_HUB_OFFLINE=1"
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else None


def probe_target() -> Optional[Tuple[str, int]]:
    """The ``(host, port)`` a download would connect to first: the proxy for the endpoint's scheme when one is set
    (``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY``, not for hosts in ``NO_PROXY``), else the endpoint's own host.
    ``None`` when the hub is offline by setting: then nothing is probed."""
    if hub_offline_reason():
        return None
    url = urlsplit(hub_endpoint())
    scheme, host = url.scheme or "https", url.hostname or "huggingface.co"
    port = url.port or (443 if scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if p.hostname:
            return p.hostname, p.port or (443 if p.scheme == "https" else 80)
    return host, port


def _connects(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds, name resolution included (run
    in a daemon thread so a slow resolver cannot stretch the wait)."""
    ok: List[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok and ok[0])


def hub_online(timeout: float = PROBE_TIMEOUT) -> Tuple[bool, str]:
    """``(online, where)``: whether a download may be tried, and the phrase saying what was decided on. No
    connection is attempted under ``HF_HUB_OFFLINE``; otherwise one connection to :func:`probe_target`, at most
    ``timeout`` seconds."""
    reason = hub_offline_reason()
    target = probe_target()
    if target is None:
        return False, f"{hub_endpoint()} (not tried: {reason})"
    host, port = target
    via = "" if host == urlsplit(hub_endpoint()).hostname else f" via proxy {host}:{port}"
    if _connects(host, port, timeout):
        return True, f"{hub_endpoint()}{via}"
    return False, f"{hub_endpoint()}{via} (unreachable)"
