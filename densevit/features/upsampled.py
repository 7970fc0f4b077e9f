"""Pixel-dense features without the stride trick: a :class:`~densevit.features.source.FeatureSource` that takes
another source's patch-stride features (the model's, or a feature store's: stores keep raw maps, upsampled at
read time like binning) and upsamples them guided by the image (:mod:`densevit.upsample`), so every app runs on
a one-token-per-pixel grid of the network input."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from PIL import Image

from ..errors import DensevitError, InvalidArgumentError
from ..io.images import denormalize, to_uint8_tensor
from ..options import opt
from ..upsample import UPSAMPLERS, check_method, upsample_token_maps
from ..upsample.memory import parse_bytes
from .source import FeatureSource, ImageFeatures, ImageInput

__all__ = ["UpsampleOptions", "UpsampledSource", "upsampled", "input_guide", "image_guide"]


def input_guide(x: torch.Tensor, spec: Any) -> torch.Tensor:
    """The upsamplers' guide of network inputs ``x`` (``B x 3 x H x W``, normalised with ``spec.mean`` /
    ``spec.std``): the RGB images in ``[0, 1]``. Every upsampling of extractor features is guided by it."""
    return denormalize(x, spec.mean, spec.std)


def image_guide(resized: Image.Image) -> torch.Tensor:
    """The guide of a network input known only as a picture (a store's features): ``1 x 3 x H x W`` in ``[0, 1]``."""
    return to_uint8_tensor(resized)[None].float() / 255


@dataclass(frozen=True)
class UpsampleOptions:
    """How pixel-dense features are made (the flags of every command that takes ``--upsample``)."""

    upsample: Optional[str] = opt(None, "pixel-dense features: extract at the patch stride (unless --stride is "
                                        "given), then upsample the maps to the network input's pixels, guided by the "
                                        "image, with this method instead of the stride trick",
                                  choices=tuple(UPSAMPLERS))
    upsample_weights: Optional[str] = opt(None, "AnyUp checkpoint (anyup_paper.pth, anyup_multi_backbone.pth or "
                                                "'random'); default: searched in $DENSEVIT_WEIGHTS and torch.hub's "
                                                "checkpoint folder")
    upsample_max_bytes: Optional[int] = opt(None, "bound on the memory one upsampling call allocates (its output "
                                                  "and working chunks), e.g. 2G, 512M; the chunks are sized from it "
                                                  "and an output that cannot fit is an error (default: no bound)",
                                            type=str, metavar="SIZE", parse=parse_bytes)

    def options(self) -> Dict[str, Any]:
        """Keyword arguments of the method, checked before any work: ``--upsample-weights`` only with
        ``--upsample anyup`` (never ignored), and AnyUp's weights found and read once, up front (a missing or bad
        file is one line naming it); ``--upsample-max-bytes`` as ``max_bytes``."""
        if self.upsample_weights is not None and self.upsample != "anyup":
            raise InvalidArgumentError(f"--upsample-weights applies to --upsample anyup only (got --upsample "
                                       f"{self.upsample}); leave it out")
        opts: Dict[str, Any] = {"max_bytes": self.upsample_max_bytes} if self.upsample_max_bytes else {}
        if self.upsample == "anyup":
            from ..upsample.anyup import resolve_weights

            opts["weights"] = resolve_weights(self.upsample_weights)
        return opts


class UpsampledSource:
    """``inner``'s features upsampled with ``method`` (:data:`densevit.upsample.UPSAMPLERS`) onto the pixels of the
    network input. Every other attribute is ``inner``'s (so the reference's low-resolution saliency pass still runs
    on the model)."""

    def __init__(self, inner: FeatureSource, method: str, options: Optional[Dict[str, Any]] = None) -> None:
        check_method(method)
        self.inner, self.method, self.options = inner, method, dict(options or {})

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)

    def resolve_layer(self, layer: int) -> int:
        return self.inner.resolve_layer(layer)

    def image_features(self, image: ImageInput, load_size: Optional[int], layer: int, facet: str, *,
                       bin: bool = False, saliency: bool = True, include_cls: bool = False,
                       name: Optional[str] = None) -> ImageFeatures:
        """``inner``'s features of ``image``, descriptors and saliency upsampled (``T = H x W`` of the input)."""
        f = self.inner.image_features(image, load_size, layer, facet, bin=bin, saliency=saliency,
                                      include_cls=include_cls, name=name)
        guide = image_guide(f.resized)
        maps = [f.descriptors[None].float()] + ([f.saliency.reshape(1, -1, 1).float()] if f.saliency is not None
                                                 else [])
        up, grid = upsample_token_maps(maps, f.grid, guide, self.method, **self.options)
        sal = up[1][0, :, 0] if f.saliency is not None else None
        return ImageFeatures(f.name, f.image, f.resized, grid, up[0][0], sal, f.cls)

    def frames_features(self, *args: Any, **kwargs: Any) -> Any:
        """Refused: the apps that read batches of frames upsample with their own guide (give them ``inner`` and
        their ``upsample`` option)."""
        raise DensevitError("an upsampled feature source serves single images; give video propagation and object "
                            "discovery the plain source and their own upsample option")


def upsampled(source: FeatureSource, opts: UpsampleOptions) -> FeatureSource:
    """``source`` itself without ``--upsample``, else an :class:`UpsampledSource` of it."""
    return UpsampledSource(source, opts.upsample, opts.options()) if opts.upsample else source

