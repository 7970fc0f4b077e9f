"""Building a backbone and finding its weights.

Order: an explicit file or transformers folder; the local places of :mod:`densevit.models.locate`
(``$DENSEVIT_WEIGHTS``, torch.hub's checkpoint folder, the Hugging Face cache: timm's repository, then the
official transformers one); a download from timm's Hub repository, tried only when the Hub is reachable.
``"random"`` builds seeded random weights (tests, smoke runs).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from ..errors import DensevitError, RandomWeightsWarning, WeightsNotFoundError
from . import convert_hf
from .layouts import Converted, get_layout, transformers_layout
from .locate import WEIGHTS_ENV, find_checkpoint, find_in_hf_cache, hf_cache_dir, hub_online, torch_hub_checkpoints
from .posenc import DINOV2_REG
from .registry import BACKBONES, HF_REPOS, BackboneSpec, get_spec

_DROP_PREFIXES = ("module.", "backbone.", "encoder.")


def create_model(spec: BackboneSpec, device: Union[str, torch.device, None] = None) -> nn.Module:
    """An untrained timm VisionTransformer for ``spec`` (no classification head), randomly initialised by timm.

    ``device="meta"`` builds the modules without allocating or initialising any tensor (for a model whose weights
    are loaded next, see :func:`load_weights_file`)."""
    import timm

    if device is None:
        return timm.create_model(spec.timm_arch, pretrained=False, num_classes=0)
    with torch.device(device):
        return timm.create_model(spec.timm_arch, pretrained=False, num_classes=0)


def _meta_tensors(model: nn.Module) -> list:
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]


def _materialize_buffers(model: nn.Module) -> None:
    """Give the non-persistent buffers of a model built on the meta device (RoPE periods, Eva's zero key bias:
    computed from the configuration, never in a checkpoint) real storage on the CPU and compute them, through
    the modules' own ``init_non_persistent_buffers`` (timm's protocol for exactly this)."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                module.register_buffer(name, torch.empty(buf.shape, dtype=buf.dtype, device="cpu"),
                                       persistent=name not in module._non_persistent_buffers_set)
    for module in model.modules():
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()


_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _why(exc: BaseException) -> str:
    """``"Type: first line"`` of an exception (``"Type"`` alone when its message is empty)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:120]}" if lines else type(exc).__name__


def read_checkpoint(path: Union[str, Path], what: str = "weights") -> Any:
    """The object a checkpoint file holds (``torch.load(weights_only=True)``, or safetensors' by suffix), for every
    loader of weights (backbones, upsamplers). A missing, empty, text, pickled-code or otherwise unreadable file is
    one :class:`~densevit.errors.DensevitError` line naming it (``what``: the kind of weights, for the message)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DensevitError(f"cannot read {what} file {path}: {exc.strerror or _why(exc)}") from None
    if not path.is_file():
        raise DensevitError(f"{what} file {path} is not a regular file")
    if size == 0:
        raise DensevitError(f"cannot read {what} file {path}: it is empty (0 bytes)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / not a checkpoint / code that weights_only refuses to run
        text = str(exc).lower()
        if "weights only load failed" in text and ("global" in text or "allowlist" in text):
            why = "it pickles objects other than tensors, which are never loaded (no code from a file runs)"
        elif path.suffix == ".safetensors":
            why = f"not a safetensors file ({_why(exc)})"
        else:
            why = "not a PyTorch (.pth/.pt/.bin) or safetensors checkpoint"
        raise DensevitError(f"cannot read {what} file {path}: {why}") from None


def check_finite(state: Dict[str, Any], source: str) -> None:
    """Refuse weights holding NaN or infinity (they give NaN descriptors): one line naming ``source`` (``"weights
    FILE"``) and the first such tensor."""
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.is_meta and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise DensevitError(f"{source} hold non-finite values (NaN or infinity): {bad} in {k!r}")


def _read_file(path: Path) -> Dict[str, Any]:
    return read_checkpoint(path)


def _folder_files(path: Path) -> List[Path]:
    """The checkpoint file(s) of a ``save_pretrained`` folder: one file, or the shards its index names."""
    for name in _FOLDER_FILES:
        if (path / name).is_file():
            return [path / name]
    for name in _INDEX_FILES:
        if (path / name).is_file():
            shards = sorted(set(json.loads((path / name).read_text())["weight_map"].values()))
            return [path / s for s in shards]
    raise DensevitError(f"weights folder {path} holds none of {', '.join(_FOLDER_FILES + _INDEX_FILES)}")


def weights_files(path: Union[str, Path]) -> List[Path]:
    """The file(s) whose bytes are the weights ``path`` names: the file itself, or a folder's checkpoint(s)."""
    path = Path(path)
    return _folder_files(path) if path.is_dir() else [path]


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """Read a checkpoint (``.pth``/``.pt``/``.bin`` torch file, ``.safetensors``, or a transformers
    ``save_pretrained`` folder, sharded or not) as a flat state dict."""
    path = Path(path)
    sd: Dict[str, Any] = {}
    for f in weights_files(path):
        part = _read_file(f)
        if not isinstance(part, dict):
            raise DensevitError(f"weights file {f} does not hold a state dict")
        sd.update(part)
    for key in ("teacher", "model", "state_dict"):  # DINO full checkpoints keep the teacher as the model
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    out = {}
    keep = convert_hf.detect(sd) is not None    # transformers' own "encoder." is part of its layout
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        for pre in () if keep else _DROP_PREFIXES:
            if k.startswith(pre):
                k = k[len(pre):]
        out[k] = v
    return out


def read_hf_config(path: Path) -> Dict[str, Any]:
    """The transformers ``config.json`` of a folder (or next to a file in one), ``{}`` without one."""
    path = Path(path)
    cfg = (path if path.is_dir() else path.parent) / "config.json"
    try:
        data = json.loads(cfg.read_text()) if cfg.is_file() else {}
    except (OSError, ValueError) as exc:
        raise DensevitError(f"cannot read {cfg}: {exc}") from exc
    return data if isinstance(data, dict) and "model_type" in data else {}


def _from_transformers(sd: Dict[str, torch.Tensor], model: nn.Module, spec: BackboneSpec, source: str,
                       config: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """A transformers checkpoint (recognised by its keys) in the official layout of ``spec``; any other layout
    unchanged. A transformers class that is not ``spec``'s is an error naming the backbones that fit it."""
    kind = convert_hf.detect(sd)
    if kind is None:
        return sd
    layout = transformers_layout(kind)

    def fits(s: BackboneSpec) -> bool:
        return s.layout == layout.name and (s.pos == DINOV2_REG) == (kind == convert_hf.DINOV2_REG)

    if not fits(spec):
        dim = sd["embeddings.cls_token"].shape[-1]
        names = [n for n, s in BACKBONES.items() if fits(s) and s.embed_dim == dim]
        raise DensevitError(f"weights {source} are a transformers {kind} checkpoint, not one of {spec.name}"
                            + (f"; use backbone {' or '.join(names)}" if names else ""))
    eps = config.get("layer_norm_eps")
    if eps is not None and abs(float(eps) - float(model.norm.eps)) > 1e-12:
        raise DensevitError(f"weights {source}: config.json has layer_norm_eps={eps}, {spec.name} uses {model.norm.eps}")
    return layout.transformers[kind](sd, config)


def _suggest(sd: Dict[str, torch.Tensor], spec: BackboneSpec) -> str:
    """``"; they fit backbone dino_vits8"``: the registered backbones of ``spec``'s checkpoint layout
    whose patch size, width and depth are the file's (converted to timm's keys), for a misfit's message."""
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.dim() != 4:
        return ""
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    names = [s.name for s in BACKBONES.values() if s.layout == spec.layout and s.name != spec.name
             and (s.patch_size, s.embed_dim, s.depth) == (w.shape[-1], w.shape[0], depth)]
    return f"; they fit backbone {' or '.join(names)}" if names else ""


def _fit_state_dict(sd: Dict[str, torch.Tensor], model: nn.Module, spec: BackboneSpec, source: str,
                    config: Optional[Dict[str, Any]] = None) -> Converted:
    """Convert a transformers or official layout to timm's and check every key and shape, naming the first misfit.

    Nothing is dropped silently: a tensor of the file that the model has no place for is an error unless it is
    exactly zero (or a classification head, which a backbone has not), and every tensor of the model must come
    from the file."""
    expected = model.state_dict()
    sd = _from_transformers(sd, model, spec, source, config or {})
    sd, extras = get_layout(spec.layout).official(sd, model)
    for k, v in expected.items():
        if k not in sd:
            raise DensevitError(f"weights {source} do not fit {spec.name}: missing key {k!r}{_suggest(sd, spec)}")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise DensevitError(f"weights {source} do not fit {spec.name}: {k!r} has shape {tuple(sd[k].shape)}, "
                                f"the model expects {tuple(v.shape)}{_suggest(sd, spec)}")
    extra = [k for k in sd if k not in expected and not k.startswith("head") and torch.count_nonzero(sd[k])]
    if extra:
        raise DensevitError(f"weights {source} do not fit {spec.name}: unexpected key {extra[0]!r}")
    return {k: v for k, v in sd.items() if k in expected}, extras


def _set_extras(model: nn.Module, extras: Dict[str, torch.Tensor], spec: BackboneSpec, source: str) -> None:
    """Load tensors that timm keeps outside the state dict (DINOv3's RoPE periods), checking their shapes."""
    for name, value in extras.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        current = getattr(owner, attr)
        if tuple(value.shape) != tuple(current.shape):
            raise DensevitError(f"weights {source} do not fit {spec.name}: {name!r} has shape {tuple(value.shape)}, "
                                f"the model expects {tuple(current.shape)}")
        setattr(owner, attr, value.detach().to(device=current.device, dtype=torch.float32).clone())


def load_weights_file(model: nn.Module, spec: BackboneSpec, path: Union[str, Path]) -> None:
    """Load a checkpoint file or transformers folder into ``model`` (float32 model; fp16 files are upcast).

    A model built on the meta device (``create_model(spec, "meta")``) takes the file's tensors as its own
    (``assign=True``: nothing is initialised and then overwritten), and its non-persistent buffers are computed
    afterwards; the result equals loading into a randomly initialised model."""
    path = Path(path)
    load_state(model, spec, read_state_dict(path), str(path), read_hf_config(path))


def load_state(model: nn.Module, spec: BackboneSpec, state: Dict[str, torch.Tensor], source: str,
               hf_config: Optional[Dict[str, Any]] = None) -> None:
    """:func:`load_weights_file` for a state dict already in memory (``source`` names it in errors; ``hf_config``:
    a transformers checkpoint's ``config.json``)."""
    sd, extras = _fit_state_dict(state, model, spec, source, hf_config)
    check_finite({**sd, **extras}, f"weights {source}")
    meta = bool(_meta_tensors(model))
    if meta:
        expected = model.state_dict()
        sd = {k: v.to(dtype=expected[k].dtype).contiguous() for k, v in sd.items()}
        model.load_state_dict(sd, strict=True, assign=True)
        _materialize_buffers(model)
    else:
        model.load_state_dict(sd, strict=True)
    _set_extras(model, extras, spec, source)
    left = _meta_tensors(model)
    if left:
        raise DensevitError(f"weights {source} leave {spec.name} without values for {left[0]!r}")


def _hf_repos(spec: BackboneSpec) -> List[str]:
    """The Hub repositories whose cached files fit ``spec``: timm's, then the official transformers one."""
    return [f"timm/{spec.hub_name}"] + ([HF_REPOS[spec.name]] if spec.name in HF_REPOS else [])


def find_local_weights(spec: BackboneSpec) -> Optional[Path]:
    """A local file for ``spec``: under a conventional name in ``$DENSEVIT_WEIGHTS`` or torch.hub's checkpoint
    folder, else in the Hugging Face cache (timm's repository, then the transformers one), if any."""
    names = list(spec.weight_files) + [f"{spec.hub_name}/{f}" for f in _FOLDER_FILES]
    return find_checkpoint(names) or find_in_hf_cache(_hf_repos(spec))


def _places(spec: BackboneSpec) -> List[str]:
    """Every local place :func:`find_local_weights` looks in, in order, one phrase each."""
    env = os.environ.get(WEIGHTS_ENV)
    first = spec.weight_files[0] if spec.weight_files else f"{spec.name}.pth"
    return [f"${WEIGHTS_ENV}={env}" if env else f"${WEIGHTS_ENV} (unset)", f"{torch_hub_checkpoints()}/{first}",
            f"Hugging Face cache {hf_cache_dir()} ({', '.join(_hf_repos(spec))})"]


def _smoke_weights(spec: BackboneSpec) -> str:
    """The shared golden ViT-S/8 weights (fixed random weights, official DINO layout) when they exist beside the
    clone and fit ``spec``, relative to the working folder where that is shorter; else ``""``."""
    from ..io.paths import golden_weights

    golden = golden_weights()
    if spec.name != "dino_vits8" or not golden.is_file():
        return ""
    try:
        rel = os.path.relpath(golden)
    except ValueError:              # another drive (Windows)
        return str(golden)
    return rel if len(rel) < len(str(golden)) else str(golden)


def _not_found(spec: BackboneSpec, download: str) -> WeightsNotFoundError:
    """The one-line error listing every place looked in, with its advice worded for Python and for the CLI (the
    shared golden weights named for a smoke run where they exist)."""
    first = spec.weight_files[0] if spec.weight_files else f"{spec.name}.pth"
    looked = "; ".join(f"{i}) {p}" for i, p in enumerate(_places(spec) + [f"download from {download}"], 1))
    head = f"no weights for {spec.name}; looked in {looked}. "
    where = f"put {first} in ${WEIGHTS_ENV} or torch.hub's checkpoint folder"
    golden = _smoke_weights(spec)
    py = f"weights='{golden}' (fixed random weights) or weights='random'" if golden else "weights='random'"
    cli = f"--weights {golden} (fixed random weights) or --weights random" if golden else "--weights random"
    return WeightsNotFoundError(
        head + f"Pass weights='FILE' (a checkpoint, transformers folder or model.safetensors), {where}, "
        f"or use {py} for a smoke run",
        head + f"Pass --weights FILE (a checkpoint, transformers folder or model.safetensors), {where}, "
        f"or use {cli} for a smoke run")


def _load_from_hub(spec: BackboneSpec) -> nn.Module:
    """timm's pretrained model from the Hub, tried only when :func:`hub_online` says so (no fixed wait)."""
    import timm

    online, where = hub_online()
    if not online:
        raise _not_found(spec, where)
    try:
        return timm.create_model(spec.hub_name, pretrained=True, num_classes=0)
    except Exception as exc:
        raise _not_found(spec, f"{where} (failed: {type(exc).__name__})") from exc


def load_backbone(name: str, weights: Union[str, Path, None] = None, seed: int = 0) -> tuple[nn.Module, BackboneSpec]:
    """Build backbone ``name`` (registry name or Hub id) in eval mode with weights from ``weights`` (a checkpoint
    file, a transformers folder, or ``"random"``), else from the first local place of :func:`find_local_weights`,
    else a download. Raises :class:`WeightsNotFoundError` with one line listing where it looked."""
    spec = get_spec(name)
    if weights is not None and str(weights) == "random":
        warnings.warn(f"{spec.name} runs with random weights: the outputs are not meaningful features (smoke runs "
                      f"only; give --weights FILE for real ones)", RandomWeightsWarning, stacklevel=2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = create_model(spec)
    elif weights is not None:
        path = Path(weights)
        if not path.exists():
            raise DensevitError(f"weights file not found: {path}")
        model = create_model(spec, "meta")
        load_weights_file(model, spec, path)
    else:
        local = find_local_weights(spec)
        if local is not None:
            model = create_model(spec, "meta")
            load_weights_file(model, spec, local)
        else:
            model = _load_from_hub(spec)
    return model.eval(), spec
