"""Building a backbone and finding its weights.

Order: an explicit file; a file with a conventional name in the folder ``$DENSEVIT_WEIGHTS``; timm's hub
download. ``"random"`` builds seeded random weights (tests, smoke runs).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Dict, Iterator, Optional, Union

import torch
from torch import nn

from .backbones import BackboneSpec, get_spec
from .errors import DensevitError, WeightsNotFoundError

WEIGHTS_ENV = "DENSEVIT_WEIGHTS"
_DROP_PREFIXES = ("module.", "backbone.", "encoder.")


def create_model(spec: BackboneSpec) -> nn.Module:
    """An untrained timm VisionTransformer for ``spec`` (no classification head)."""
    import timm

    return timm.create_model(spec.timm_arch, pretrained=False, num_classes=0)


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """Read a checkpoint (``.pth``/``.pt``/``.bin`` torch file or ``.safetensors``) as a flat state dict."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / not a checkpoint
        raise DensevitError(f"cannot read weights file {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(sd, dict):
        raise DensevitError(f"weights file {path} does not hold a state dict")
    for key in ("teacher", "model", "state_dict"):  # DINO full checkpoints keep the teacher as the model
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        for pre in _DROP_PREFIXES:
            if k.startswith(pre):
                k = k[len(pre):]
        out[k] = v
    return out


def _fit_state_dict(sd: Dict[str, torch.Tensor], model: nn.Module, spec: BackboneSpec, source: str) -> Dict[str, torch.Tensor]:
    """Convert official layouts (DINOv2, CLIP) to timm's and check every key and shape, naming the first misfit."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    expected = model.state_dict()
    if "mask_token" in sd or "visual.class_embedding" in sd:
        sd = checkpoint_filter_fn(sd, model)
    for k in list(sd):
        if k.startswith("head") and k not in expected:
            del sd[k]
    for k, v in expected.items():
        if k not in sd:
            raise DensevitError(f"weights {source} do not fit {spec.name}: missing key {k!r}")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise DensevitError(f"weights {source} do not fit {spec.name}: {k!r} has shape {tuple(sd[k].shape)}, "
                                f"the model expects {tuple(v.shape)}")
    extra = [k for k in sd if k not in expected]
    if extra:
        raise DensevitError(f"weights {source} do not fit {spec.name}: unexpected key {extra[0]!r}")
    return sd


def load_weights_file(model: nn.Module, spec: BackboneSpec, path: Union[str, Path]) -> None:
    """Load a checkpoint file into ``model`` (float32 model; fp16 files are upcast)."""
    path = Path(path)
    sd = _fit_state_dict(read_state_dict(path), model, spec, str(path))
    model.load_state_dict(sd, strict=True)


def find_local_weights(spec: BackboneSpec) -> Optional[Path]:
    """A file for ``spec`` in ``$DENSEVIT_WEIGHTS`` under a conventional name, if any."""
    root = os.environ.get(WEIGHTS_ENV)
    if not root:
        return None
    root_path = Path(root)
    candidates = [root_path / f for f in spec.weight_files]
    candidates += [root_path / spec.hub_name / "model.safetensors", root_path / spec.hub_name / "pytorch_model.bin"]
    return next((c for c in candidates if c.is_file()), None)


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the weights hub answers at all (so an offline machine fails at once instead of retrying)."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Make huggingface_hub read only its local cache while inside (no network retries)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm always brings it
        yield
        return
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _load_from_hub(spec: BackboneSpec) -> nn.Module:
    import timm

    try:
        with _hub_offline(not _hub_reachable()):
            return timm.create_model(spec.hub_name, pretrained=True, num_classes=0)
    except Exception as exc:
        where = os.environ.get(WEIGHTS_ENV)
        raise WeightsNotFoundError(
            f"no weights for {spec.name}: "
            + (f"none of {spec.weight_files[0]!r}... in ${WEIGHTS_ENV}={where}, " if where else f"${WEIGHTS_ENV} unset, ")
            + f"and 'timm/{spec.hub_name}' is neither in the local hub cache nor downloadable (offline?); "
            f"pass --weights FILE, put {spec.weight_files[0] if spec.weight_files else spec.name + '.pth'} in a folder "
            f"named by ${WEIGHTS_ENV}, or use --weights random for a smoke run") from exc


def load_backbone(name: str, weights: Union[str, Path, None] = None, seed: int = 0) -> tuple[nn.Module, BackboneSpec]:
    """Build backbone ``name`` in eval mode with weights from ``weights`` (file path or ``"random"``), else from
    ``$DENSEVIT_WEIGHTS``, else timm's hub. Raises :class:`WeightsNotFoundError` with one actionable line."""
    spec = get_spec(name)
    if weights is not None and str(weights) == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = create_model(spec)
    elif weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise DensevitError(f"weights file not found: {path}")
        model = create_model(spec)
        load_weights_file(model, spec, path)
    else:
        local = find_local_weights(spec)
        if local is not None:
            model = create_model(spec)
            load_weights_file(model, spec, local)
        else:
            model = _load_from_hub(spec)
    return model.eval(), spec
