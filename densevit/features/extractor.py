"""Dense descriptors from a ViT: any facet of any layers in one forward pass, with a denser patch stride.

Facets of block ``l`` (0-based):
    ``key`` / ``query`` / ``value``: the attention projections, ``D = heads * head_dim`` with channel index
    ``c * heads + h`` (head-minor, as the reference implementation lays them out). For rotary backbones (DINOv3)
    ``key`` and ``query`` are the projections *before* the rotary embedding (position-free: the natural choice
    for matching across images); ``key_rope`` / ``query_rope`` are them *after* it, as the attention uses them
    (for backbones with learned absolute positions the two are identical). ``value`` is never rotated;
    ``token``: the block output; ``token_norm``: the block output through the model's final norm;
    ``attn``: the attention probabilities, ``B x heads x T x T``.
Descriptors are ``B x T x D`` with ``T = h * w`` patch tokens in row-major grid order (prefix tokens dropped
unless ``include_cls``, which keeps the CLS token first; register tokens are always dropped), or, with
``output_fmt="NCHW"`` (timm's name; ``"NHWC"`` too), ``B x D x h x w`` maps (saliency ``B x h x w``).

Inputs: :meth:`ViTExtractor.preprocess` takes images (a path, a PIL image, an ``HxWx3`` numpy array, a
``3xHxW`` / ``Bx3xHxW`` tensor with floats in ``[0, 1]`` unnormalised RGB or uint8 ``0..255``, or a list of
them; the rules are :mod:`densevit.io.images`'s) and normalises them by the backbone's mean / std.
:meth:`ViTExtractor.extract` takes model input as before (a *floating-point* ``Bx3xHxW`` or ``3xHxW`` tensor,
already normalised, as ``preprocess`` returns it) or any other image or list, preprocessed first at
``load_size``; a list gives one :class:`Features` per item, in input order, the items batched by size.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import DensevitError, InvalidArgumentError
from ..io.images import ImageLike, LoadSize, as_pil, check_min_side, preprocess, split_images
from ..models.families import BlockFamily, make_adapter
from ..models.grid import TokenGrid, grid_shape
from ..models.own import adopt_module
from ..models.posenc import DINO, resample_pos_embed
from ..models.registry import BackboneSpec
from ..models.weights import load_backbone
from ..runtime.device import DeviceLike, parse_dtype, select_device
from ..runtime.threads import prefetch_map
from ..upsample import upsample_token_maps
from .upsampled import input_guide
from .binning import log_bin
from .frames import FrameBatch, InputRule, load_input
from .source import ImageFeatures, ImageInput, image_name

FACETS = ("key", "query", "value", "token", "token_norm", "attn", "key_rope", "query_rope")
OUTPUT_FORMATS = ("NLC", "NCHW", "NHWC")   # timm's names: tokens BxTxD (the default), maps BxDxhxw, BxhxwxD
Images = Union[ImageLike, Sequence[ImageLike]]
LIST_BATCH = 16                            # items of one input size run together when extract is given a list
_QKV_INDEX = {"query": 0, "key": 1, "value": 2, "query_rope": 3, "key_rope": 4}


@dataclass
class Features:
    """Output of :meth:`ViTExtractor.extract`."""

    descriptors: Dict[Tuple[int, str], torch.Tensor]  # (layer, facet) -> BxTxD (attn: BxheadsxTxT)
    grid: TokenGrid
    saliency: Optional[torch.Tensor] = None          # BxT in [0, 1]
    cls: Dict[Tuple[int, str], torch.Tensor] = field(default_factory=dict)  # (layer, facet) -> BxD CLS descriptor


@dataclass
class _Plan:
    """What to record at each block during one forward pass."""

    facets: Dict[int, set] = field(default_factory=dict)
    saliency_layer: Optional[int] = None

    @property
    def last(self) -> int:
        layers = list(self.facets) + ([self.saliency_layer] if self.saliency_layer is not None else [])
        return max(layers)


def _is_model_input(x: object) -> bool:
    """A floating-point ``[B]x3xHxW`` tensor is model input (already normalised); anything else is an image."""
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() in (3, 4)


def _formatted(feats: Features, output_fmt: str) -> Features:
    """``feats`` with its patch descriptors (``BxTxD``) and saliency (``BxT``) laid out as ``output_fmt``."""
    if output_fmt == "NLC":
        return feats
    h, w = feats.grid.shape

    def grid(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(t.shape[0], h, w, t.shape[-1])
        return t if output_fmt == "NHWC" else t.permute(0, 3, 1, 2).contiguous()

    sal = None if feats.saliency is None else feats.saliency.reshape(-1, h, w)
    return replace(feats, descriptors={k: grid(v) for k, v in feats.descriptors.items()}, saliency=sal)


def _batch_slice(feats: Features, start: int, stop: int, grid: TokenGrid) -> Features:
    """Images ``start:stop`` of a batch's :class:`Features`, with their own ``grid``."""
    sal = None if feats.saliency is None else feats.saliency[start:stop]
    return Features({k: v[start:stop] for k, v in feats.descriptors.items()}, grid, sal,
                    {k: v[start:stop] for k, v in feats.cls.items()})


def interpolate_pos_embed(patch_pos: torch.Tensor, grid_hw: Tuple[int, int]) -> torch.Tensor:
    """DINO's resampling of a square ``1xNxC`` patch position embedding to ``grid_hw`` (see :mod:`densevit.models.posenc`)."""
    return resample_pos_embed(patch_pos, grid_hw, DINO)


class ViTExtractor(nn.Module):
    """Dense ViT descriptor extractor.

    Args:
        backbone: densevit backbone name (see :data:`densevit.models.registry.BACKBONES`; default ``dino_vits8``).
        stride: patch-embedding stride; must divide the patch size (default: the patch size).
        weights: checkpoint path, ``"random"``, or ``None`` to search ``$DENSEVIT_WEIGHTS`` then timm's hub.
        device: where to run (``None``: CUDA when available).
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        model: your own module instead of a registry build (:mod:`densevit.models.own`): a timm
            ``VisionTransformer`` / ``Eva`` (used as it is, moved to ``device`` / ``dtype``) or an official DINO /
            DINOv2 / DINOv3 module (converted exactly from its state dict). ``backbone`` then names the registry
            entry whose preprocessing and position rules it follows (default: found from the module).
    """

    def __init__(self, backbone: Optional[str] = None, stride: Optional[int] = None,
                 weights: Union[str, Path, None] = None, device: DeviceLike = None,
                 dtype: Union[str, torch.dtype, None] = torch.float32, model: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.device = select_device(device)
        self.dtype = parse_dtype(dtype)
        self._weights = None if model is None else "module"
        if model is not None:
            if weights is not None:
                raise DensevitError("pass either model= or weights=, not both")
            model, spec = adopt_module(model, backbone)
        else:
            model, spec = load_backbone(backbone or "dino_vits8", weights)
            self._weights = weights
        self.spec: BackboneSpec = spec
        self.model = model
        self.patch_size = spec.patch_size
        self.stride = self.check_stride(self.patch_size if stride is None else stride)
        self.adapter: BlockFamily = make_adapter(spec.family, model, spec.pos, self.patch_size, self.stride)
        self.adapter.to(self.device, self.dtype)

    # ------------------------------------------------------------------ properties
    @property
    def provenance(self) -> Dict[str, Any]:
        """Which weights this extractor runs (:func:`~densevit.models.provenance.weights_provenance`: backbone,
        source, file name, size, SHA-256); a module of your own (``model=``) is ``{"source": "module"}``."""
        if self._weights == "module":
            return {"backbone": self.spec.name, "source": "module", "name": "module", "size": None, "sha256": None}
        from ..models.provenance import weights_provenance

        return weights_provenance(self._weights, self.spec.name)

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def num_heads(self) -> int:
        return self.model.blocks[0].attn.num_heads

    @property
    def num_prefix_tokens(self) -> int:
        """CLS and register / storage tokens before the patch tokens."""
        return self.adapter.num_prefix_tokens

    def check_stride(self, stride: Optional[int] = None) -> int:
        """The stride of a call (default :attr:`stride`); it must divide the patch size (the one place checked)."""
        if stride is None:
            return self.stride
        s = int(stride)
        if s < 1 or self.patch_size % s != 0:
            raise DensevitError(f"stride {stride} does not divide the patch size {self.patch_size} of {self.spec.name}")
        return s

    def grid(self, input_hw: Tuple[int, int], image_hw: Optional[Tuple[int, int]] = None,
             stride: Optional[int] = None) -> TokenGrid:
        """Token grid of an input of ``input_hw`` pixels (resized from ``image_hw``) at ``stride`` (default
        :attr:`stride`)."""
        s = self.check_stride(stride)
        grid_shape(input_hw, self.patch_size, s)  # validates the size
        return TokenGrid(self.patch_size, s, tuple(input_hw), tuple(image_hw) if image_hw else None)

    def preprocess(self, image: Images, load_size: LoadSize = 224, stride: Optional[int] = None
                   ) -> Union[Tuple[torch.Tensor, TokenGrid], List[Tuple[torch.Tensor, TokenGrid]]]:
        """Read/resize/normalise one image for this backbone: ``(x 1x3xHxW on self.device, grid at stride)``; a
        ``Bx3xHxW`` tensor gives ``(x Bx3xHxW, grid)``; a list gives that per item, in order (module doc)."""
        if isinstance(image, (list, tuple)):
            return [self.preprocess(one, load_size, stride) for one in image]
        parts = [self.preprocess_with_image(one, load_size, stride) for one in split_images(image)]
        if not parts:
            raise DensevitError("no images given (an empty batch)")
        return torch.cat([x for x, _, _ in parts]), parts[0][1]

    def preprocess_with_image(self, image: ImageLike, load_size: LoadSize = 224, stride: Optional[int] = None
                              ) -> Tuple[torch.Tensor, TokenGrid, "Image.Image"]:
        """:meth:`preprocess` that also returns the resized RGB image (for drawing or refinement at load size)."""
        x, resized, image_hw = preprocess(image, load_size, self.spec.mean, self.spec.std)
        check_min_side(image if isinstance(image, (str, Path)) else "image", image_hw, self.patch_size,
                       self.spec.name)
        grid = self.grid(tuple(x.shape[-2:]), image_hw, stride)
        return x.unsqueeze(0).to(self.device), grid, resized

    runs_model = True       # FeatureSource: more passes of the model are possible

    def image_features(self, image: ImageInput, load_size: Optional[int], layer: int, facet: str, *,
                       bin: bool = False, saliency: bool = True, include_cls: bool = False,
                       name: Optional[str] = None, pixels: bool = True) -> ImageFeatures:
        """:class:`~densevit.features.source.FeatureSource`: ONE forward pass of ``image`` (a file, decoded once;
        or an image in memory, by the same mode and EXIF rules) for block ``layer``, ``facet`` (the model reads
        the pixels whatever ``pixels`` says)."""
        img = as_pil(image)
        x, grid, resized = self.preprocess_with_image(img, load_size)
        feats = self.extract(x, (layer,), (facet,), bin=bin, saliency=saliency, image_hw=grid.image_hw)
        desc = feats.descriptors[(layer, facet)][0].float().cpu()
        cls = feats.cls[(layer, facet)][0].float().cpu() if include_cls else None
        sal = feats.saliency[0].float().cpu() if saliency and feats.saliency is not None else None
        return ImageFeatures(name or image_name(image, 0), img, resized, grid, desc, sal, cls)

    def frames_features(self, frames: Sequence[ImageInput], rule: InputRule, layers: Sequence[int],
                        facets: Sequence[str], *, batch_size: int = 8, guide: bool = False,
                        saliency: bool = False, attention: bool = False, stride: Optional[int] = None,
                        names: Optional[Sequence[str]] = None,
                        check_grid: Optional[Callable[[TokenGrid], None]] = None) -> Iterator[FrameBatch]:
        """:class:`~densevit.features.source.FeatureSource`: images of one size through ``rule``
        (:mod:`densevit.features.frames`), ``batch_size`` per forward pass (the next ones decoded on worker threads
        meanwhile), every ``(layer, facet)`` in that one pass; ``check_grid`` sees each batch's grid before its
        pass (the attention inputs, asked for, in a pass of their own). Frames that give another input size than the
        first are refused; the grid's ``image_hw`` is the first
        frame's original size (the input size with ``pad``)."""
        mean, std = self.spec.mean, self.spec.std
        loaded = prefetch_map(lambda fr: load_input(fr, rule, mean, std, self.patch_size), frames,
                              ahead=2 * batch_size)
        first_hw = first_in = None
        for s in range(0, len(frames), batch_size):
            xs, resized, hws = [], [], []
            for j, (x, rs, hw) in zip(range(s, min(s + batch_size, len(frames))), loaded):
                first_hw, first_in = first_hw or hw, first_in or tuple(x.shape[-2:])
                if tuple(x.shape[-2:]) != first_in:
                    raise DensevitError(f"frame {j} gives a {x.shape[-1]}x{x.shape[-2]} input but the first frame "
                                        f"{first_in[1]}x{first_in[0]}; all frames must have one size")
                if rule.resize == "short_side" and min(hw) < self.patch_size:
                    name = frames[j] if isinstance(frames[j], (str, Path)) else "image"
                    raise DensevitError(f"{name} is {hw[1]}x{hw[0]} pixels, smaller than the "
                                        f"{self.patch_size}-pixel patch of {self.spec.name}")
                xs.append(x)
                resized.append(rs)
                hws.append(hw)
            batch = torch.stack(xs)
            image_hw = tuple(batch.shape[-2:]) if rule.pad else first_hw
            grid = self.grid(tuple(batch.shape[-2:]), image_hw, stride)
            if check_grid is not None:
                check_grid(grid)
            feats = None
            if facets or saliency:
                feats = self.extract(batch, layers=tuple(layers), facets=tuple(facets), image_hw=image_hw,
                                     saliency=saliency, stride=stride)
            att = self.attention_inputs(batch.to(self.device), layers, stride=stride) if attention else None
            names_b = [names[j] if names is not None else image_name(frames[j], j) for j in range(s, s + len(xs))]
            yield FrameBatch(names_b, hws, resized, feats.grid if feats is not None else grid,
                             feats.descriptors if feats is not None else {},
                             input_guide(batch.to(self.device), self.spec) if guide else None,
                             feats.saliency if saliency else None, att)

    # ------------------------------------------------------------------ internals
    def resolve_layer(self, layer: int) -> int:
        """Block index ``0..depth-1`` of ``layer`` (negative counts from the end); out of range is an error."""
        l = int(layer)
        resolved = l + self.depth if l < 0 else l
        if not 0 <= resolved < self.depth:
            raise DensevitError(f"layer {layer} out of range for {self.spec.name} (0..{self.depth - 1}, or negative)")
        return resolved

    def _block(self, blk: nn.Module, x: torch.Tensor, rope, want: set, saliency: bool,
               out: Optional[Dict[str, torch.Tensor]]) -> torch.Tensor:
        """One transformer block through the family adapter, recording the facets in ``want`` (and the CLS
        attention row if ``saliency``) into ``out``."""
        ad = self.adapter
        q0, k0, v = ad.qkv(blk, blk.norm1(x))                         # each B x heads x N x d, un-rotated
        q, k = ad.position(q0, k0, rope)
        if want:
            for facet, t in zip(("query", "key", "value", "query_rope", "key_rope"), (q0, k0, v, q, k)):
                if facet in want:
                    out[facet] = t
        if "attn" in want:
            probs = ((q * ad.scale(blk)) @ k.transpose(-2, -1)).softmax(dim=-1)
            out["attn"] = probs
            y = probs @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        if saliency:
            cls_row = ((q[:, :, :1] * ad.scale(blk)) @ k.transpose(-2, -1)).float().softmax(dim=-1)
            out["cls_attn"] = cls_row[:, :, 0]                        # B x heads x N
        x = ad.residual(blk, x, ad.attn_out(blk, y))
        if "token" in want:
            out["token"] = x
        if "token_norm" in want:
            out["token_norm"] = self.model.norm(x)
        return x

    def _patch_tokens(self, t: torch.Tensor, include_cls: bool, dim: int = -2) -> torch.Tensor:
        """Select CLS (optionally) and patch tokens along ``dim``, dropping register tokens."""
        P = self.num_prefix_tokens
        patches = t.narrow(dim, P, t.shape[dim] - P)
        if include_cls and self.model.cls_token is not None:
            return torch.cat([t.narrow(dim, 0, 1), patches], dim=dim)
        return patches

    def _layout(self, facet: str, raw: torch.Tensor, include_cls: bool) -> torch.Tensor:
        if facet == "attn":
            return self._patch_tokens(self._patch_tokens(raw, include_cls, -2), include_cls, -1)
        if facet in _QKV_INDEX:                                        # BxheadsxNxd -> BxNx(d*heads)
            raw = raw.permute(0, 2, 3, 1).flatten(2)
        return self._patch_tokens(raw, include_cls)

    # ------------------------------------------------------------------ public API
    def _plan(self, x: torch.Tensor, layers: Sequence[int], facets: Sequence[str], bin: bool, include_cls: bool,
              saliency: bool) -> _Plan:
        if x.dim() != 4 or x.shape[1] != 3:
            raise DensevitError(f"expected a Bx3xHxW batch, got shape {tuple(x.shape)}")
        for f in facets:
            if f not in FACETS:
                raise DensevitError(f"unknown facet {f!r}; choose from {', '.join(FACETS)}")
        if bin and (include_cls or "attn" in facets):
            raise DensevitError("log-binning applies to patch descriptors only (not with include_cls or attn)")
        plan = _Plan()
        for l in layers:
            plan.facets.setdefault(self.resolve_layer(l), set()).update(facets)
        if saliency:
            plan.saliency_layer = self.resolve_layer(self.spec.saliency_layer)
        return plan

    def _forward(self, x: torch.Tensor, plan: _Plan, stride: int) -> Iterator[Tuple[int, Dict[str, torch.Tensor], Tuple[int, int]]]:
        """Run the blocks up to ``plan.last``, yielding ``(block, recorded raw facets, grid_hw)`` at each block
        where something is recorded; nothing recorded is kept after it has been yielded."""
        tokens, grid_hw, rope = self.adapter.embed(x.to(self.device, self.dtype), stride)
        for i, blk in enumerate(self.model.blocks[: plan.last + 1]):
            want = plan.facets.get(i, set())
            sal = plan.saliency_layer == i
            if want or sal:
                recorded: Dict[str, torch.Tensor] = {}
                tokens = self._block(blk, tokens, rope, want, sal, recorded)
                yield i, recorded, grid_hw
            else:
                tokens = self._block(blk, tokens, rope, set(), False, None)

    def _descriptor(self, facet: str, raw: torch.Tensor, bin: bool, include_cls: bool, grid_hw: Tuple[int, int]
                    ) -> torch.Tensor:
        d = self._layout(facet, raw, include_cls)
        if bin:
            B, T, D = d.shape
            d = log_bin(d.transpose(1, 2).reshape(B, D, *grid_hw))
        return d

    def _saliency(self, cls_attn: torch.Tensor) -> torch.Tensor:
        """``BxheadsxN`` CLS attention row -> ``BxT`` saliency (head subset mean, min-max per image)."""
        heads = list(self.spec.saliency_heads) if self.spec.saliency_heads else slice(None)
        m = self._patch_tokens(cls_attn[:, heads], include_cls=False, dim=-1).mean(dim=1)
        lo, hi = m.min(dim=1, keepdim=True).values, m.max(dim=1, keepdim=True).values
        return (m - lo) / (hi - lo).clamp_min(torch.finfo(m.dtype).tiny)

    @torch.inference_mode()
    def iter_extract(self, x: torch.Tensor, layers: Iterable[int] = (11,), facets: Iterable[str] = ("key",),
                     bin: bool = False, include_cls: bool = False, stride: Optional[int] = None
                     ) -> Iterator[Tuple[int, Dict[str, torch.Tensor]]]:
        """Like :meth:`extract` but streaming: one forward pass that yields ``(layer, {facet: descriptors})`` as it
        reaches each requested block (in depth order), so only one layer's outputs (e.g. ``attn``) are alive at a
        time. ``layer`` is the resolved, non-negative block index."""
        facets = tuple(facets)
        plan = self._plan(x, tuple(layers), facets, bin, include_cls, saliency=False)
        for i, rec, grid_hw in self._forward(x, plan, self.check_stride(stride)):
            yield i, {f: self._descriptor(f, rec[f], bin, include_cls, grid_hw) for f in facets}

    @torch.inference_mode()
    def extract(self, x: Union[torch.Tensor, Images], layers: Iterable[int] = (11,), facets: Iterable[str] = ("key",),
                bin: bool = False, include_cls: bool = False, saliency: bool = False,
                image_hw: Optional[Tuple[int, int]] = None, stride: Optional[int] = None,
                load_size: LoadSize = 224, output_fmt: str = "NLC", upsample: Optional[str] = None,
                out_size: Optional[Tuple[int, int]] = None, upsample_options: Optional[Dict[str, object]] = None
                ) -> Union[Features, List[Features]]:
        """Every ``(layer, facet)`` combination asked for, and optionally saliency, in one forward pass that stops
        after the deepest block needed.

        Args:
            x: ``Bx3xHxW`` preprocessed images of one size.
            bin: log-bin the descriptors (17 bins; not with ``include_cls`` nor ``attn``).
            image_hw: original image size, recorded in the returned grid for pixel mapping.
            stride: patch-embedding stride of this call (divides the patch size; default :attr:`stride`); the
                model is not changed.
            load_size: the load size of images that are not model input (module doc).
            output_fmt: ``"NLC"`` (tokens, the default), ``"NCHW"`` or ``"NHWC"`` (maps; not with ``include_cls``
                nor ``attn``).
            upsample: a :data:`densevit.upsample.UPSAMPLERS` method (``bilinear``, ``jbu``, ``anyup``,
                ``upsample_anything``): the descriptors (and saliency) are upsampled, guided by ``x``, to the input
                size or ``out_size`` and the returned grid is :meth:`TokenGrid.pixels` (one token per pixel);
                ``upsample_options`` go to the method. Not with ``attn``.
        Returns:
            :class:`Features` with ``descriptors[(layer, facet)]`` of shape ``BxTxD`` (``attn``: ``BxheadsxTxT``),
            keyed by the layer as given by the caller, and ``cls[(layer, facet)]``: the CLS token's unbinned
            descriptor ``BxD`` (not for ``attn``), whatever ``include_cls`` and ``bin``; for a list, one per item.
        """
        facets, layers = tuple(facets), tuple(layers)
        self._check_output_fmt(output_fmt, facets, include_cls)
        if not _is_model_input(x):
            options = dict(layers=layers, facets=facets, bin=bin, include_cls=include_cls, saliency=saliency,
                           stride=stride, output_fmt=output_fmt, upsample=upsample, out_size=out_size,
                           upsample_options=upsample_options)
            return self._extract_images(x, load_size, options)
        x = x if x.dim() != 3 else x.unsqueeze(0)
        plan = self._plan(x, layers, facets, bin, include_cls, saliency)
        grid = self.grid(tuple(x.shape[-2:]), image_hw, stride)
        by_block: Dict[int, Dict[str, torch.Tensor]] = {}
        cls_block: Dict[int, Dict[str, torch.Tensor]] = {}
        sal_map = None
        for i, rec, grid_hw in self._forward(x, plan, grid.stride):
            wanted = plan.facets.get(i, ())
            by_block[i] = {f: self._descriptor(f, rec[f], bin, include_cls, grid_hw) for f in wanted}
            cls_block[i] = {f: self._cls_descriptor(f, rec[f]) for f in wanted if f != "attn"}
            if i == plan.saliency_layer:
                sal_map = self._saliency(rec["cls_attn"])
        descriptors = {(l, f): by_block[self.resolve_layer(l)][f] for l in layers for f in facets}
        cls = {(l, f): cls_block[self.resolve_layer(l)][f] for l in layers for f in facets
               if f in cls_block[self.resolve_layer(l)] and self.model.cls_token is not None}
        out = Features(descriptors, grid, sal_map, cls)
        if upsample is not None:
            out = _upsampled(out, x, self.spec, upsample, out_size, dict(upsample_options or {}))
        return _formatted(out, output_fmt)

    forward = extract     # the module's call is :meth:`extract`

    # ------------------------------------------------------------------ inputs, formats, placement
    @staticmethod
    def _check_output_fmt(output_fmt: str, facets: Sequence[str], include_cls: bool) -> None:
        if output_fmt not in OUTPUT_FORMATS:
            raise DensevitError(f"unknown output_fmt {output_fmt!r}; choose from {', '.join(OUTPUT_FORMATS)}")
        if output_fmt != "NLC" and (include_cls or "attn" in facets):
            raise DensevitError(f"output_fmt {output_fmt!r} lays out patch descriptors on their grid "
                                f"(not with include_cls nor attn)")

    def _extract_images(self, images: Images, load_size: LoadSize, options: dict
                        ) -> Union[Features, List[Features]]:
        """:meth:`extract` of images (module doc): each item preprocessed, the items of one input size run together
        (:data:`LIST_BATCH` at a time), the results returned per item in input order (one :class:`Features` for a
        single image)."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        prepared = []
        for item in items:
            if _is_model_input(item):
                t = (item if item.dim() != 3 else item.unsqueeze(0)).to(self.device)
                prepared.append((t, self.grid(tuple(t.shape[-2:]), None, options["stride"])))
            else:
                prepared.append(self.preprocess(item, load_size, options["stride"]))
        by_size: Dict[Tuple[int, int], List[int]] = {}
        for i, (t, _) in enumerate(prepared):
            by_size.setdefault(tuple(t.shape[-2:]), []).append(i)
        out: List[Optional[Features]] = [None] * len(prepared)
        chunks = [idx[k:k + LIST_BATCH] for idx in by_size.values() for k in range(0, len(idx), LIST_BATCH)]
        for idx in chunks:
            feats = self.extract(torch.cat([prepared[i][0] for i in idx]), **options)
            start = 0
            for i in idx:
                t, grid = prepared[i]
                out[i] = _batch_slice(feats, start, start + t.shape[0], grid)
                start += t.shape[0]
        return out if isinstance(images, (list, tuple)) else out[0]

    def _placement(self) -> None:
        """:attr:`device` and :attr:`dtype` read back from the backbone's parameters."""
        p = next(self.model.parameters())
        self.device, self.dtype = p.device, p.dtype

    def to(self, *args, **kwargs) -> "ViTExtractor":
        """``nn.Module.to``: the backbone moved / cast through its adapter (which keeps what must stay exact, e.g.
        DINOv3's RoPE periods in float32); :attr:`device` and :attr:`dtype` follow."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        device = self.device if device is None else select_device(str(device))
        dtype = self.dtype if dtype is None else parse_dtype(dtype)
        self.adapter.to(device, dtype)
        for child in self.children():
            if child is not self.model:
                child.to(device, dtype)
        self._placement()
        return self

    def _apply(self, fn, *args, **kwargs):
        """``.cuda()``, ``.cpu()``, ``.half()``, ``.bfloat16()``, ``.float()``...: where ``fn`` sends a floating
        tensor of the current placement is where :meth:`to` sends the extractor."""
        probe = fn(torch.zeros((), dtype=self.dtype, device=self.device))
        return self.to(probe.device, probe.dtype)

    @torch.inference_mode()
    def attention_inputs(self, x: torch.Tensor, layers: Iterable[int], stride: Optional[int] = None) -> Dict[int, Tuple[torch.Tensor, torch.Tensor, float]]:
        """Per block (keyed as given): ``(query, key, scale)`` exactly as its attention uses them, i.e. after the
        positional encoding (rotary backbones), over all ``N`` tokens it attends over, prefix tokens (CLS, then
        registers) first: ``BxNxD`` with the descriptors' channel layout ``c * heads + h``. The attention of token
        ``i`` is ``softmax(scale * q_i . k)`` per head (:func:`densevit.features.similarity.query_attention`)."""
        layers = tuple(layers)
        plan = self._plan(x, layers, ("query_rope", "key_rope"), False, True, saliency=False)
        scales = {i: float(self.adapter.scale(blk)) for i, blk in enumerate(self.model.blocks)}
        flat = lambda t: t.permute(0, 2, 3, 1).flatten(2)                 # BxheadsxNxd -> BxNx(d*heads)
        got = {i: (flat(rec["query_rope"]), flat(rec["key_rope"]), scales[i]) for i, rec, _ in self._forward(x, plan, self.check_stride(stride))}
        return {l: got[self.resolve_layer(l)] for l in layers}

    def _cls_descriptor(self, facet: str, raw: torch.Tensor) -> torch.Tensor:
        """The CLS token's descriptor ``BxD`` of a facet (same channel layout as the patch descriptors)."""
        if facet in _QKV_INDEX:
            raw = raw.permute(0, 2, 3, 1).flatten(2)
        return raw[:, 0]

    def extract_descriptors(self, x: torch.Tensor, layer: int = 11, facet: str = "key", bin: bool = False,
                            include_cls: bool = False, stride: Optional[int] = None) -> torch.Tensor:
        """Descriptors of one facet of one layer: ``BxTxD`` (reference-compatible signature)."""
        return self.extract(x, (layer,), (facet,), bin=bin, include_cls=include_cls, stride=stride).descriptors[(layer, facet)]

    def reference_saliency(self, image: Image.Image, grid: TokenGrid, load_size: Optional[int]) -> torch.Tensor:
        """The reference co-segmentation's default saliency of ``image`` (original RGB) for descriptors on ``grid``:
        ``T`` float32 (a second pass of the model; sources that run it, :attr:`runs_model`, give it).

        The original image is resized (Lanczos) to half the network input, ``(H // 2, W // 2)`` (the input itself
        when ``load_size`` is None, as the reference), run at stride = patch size (the same weights), and its
        saliency map resized to the descriptor grid with PIL's nearest filter, as ``cosegmentation.py`` does."""
        H, W = grid.input_hw
        low_hw = (H // 2, W // 2) if load_size is not None else (H, W)
        p = self.patch_size
        if min(low_hw) < p:
            raise DensevitError(f"the reference's low-resolution saliency pass needs an input of at least {2 * p} "
                                f"pixels on the short side (got {min(H, W)}): use a larger load size or the saliency "
                                f"source 'same-pass'")
        x, _, _ = self.preprocess_with_image(image, low_hw, stride=p)
        sal = self.extract_saliency_maps(x, stride=p)[0].float().cpu().numpy()
        hl, wl = grid_shape(low_hw, p, p)
        h, w = grid.shape
        up = Image.fromarray(np.ascontiguousarray(sal.reshape(hl, wl), dtype=np.float32)).resize((w, h), Image.NEAREST)
        return torch.from_numpy(np.asarray(up, dtype=np.float32).reshape(-1).copy())

    def extract_saliency_maps(self, x: torch.Tensor, stride: Optional[int] = None) -> torch.Tensor:
        """CLS-attention saliency of the last layer (the backbone's head subset, min-max normalised): ``BxT``."""
        return self.extract(x, (self.spec.saliency_layer,), (), saliency=True, stride=stride).saliency

    @torch.inference_mode()
    def forward_until(self, x: torch.Tensor, layer: int, stride: Optional[int] = None) -> torch.Tensor:
        """The bare forward pass through block ``layer`` (no facet recording); for timing the overhead."""
        tokens, _, rope = self.adapter.embed(x.to(self.device, self.dtype), self.check_stride(stride))
        for blk in self.model.blocks[: self.resolve_layer(layer) + 1]:
            tokens = self._block(blk, tokens, rope, set(), False, None)
        return tokens


def _upsampled(feats: Features, x: torch.Tensor, spec: BackboneSpec, method: str,
               out_size: Optional[Tuple[int, int]], options: Dict[str, object]) -> Features:
    """``feats`` upsampled onto the pixel grid of ``x`` (or ``out_size``): :func:`densevit.upsample.upsample_tokens`
    guided by ``x`` brought back to RGB in ``[0, 1]``."""
    if any(f == "attn" for _, f in feats.descriptors):
        raise InvalidArgumentError("the attn facet cannot be upsampled; ask for key, query, value or token facets")
    keys = list(feats.descriptors)
    maps = [feats.descriptors[k] for k in keys]
    if feats.saliency is not None:
        maps.append(feats.saliency[..., None])
    up, grid = upsample_token_maps(maps, feats.grid, input_guide(x, spec), method, out_size, **options)
    saliency = up.pop()[..., 0] if feats.saliency is not None else None
    return Features(dict(zip(keys, up)), grid, saliency, feats.cls)
