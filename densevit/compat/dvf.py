"""A drop-in for dino-vit-features' extractor (ShirAmir/dino-vit-features, ``extractor.ViTExtractor``).

Its scripts and the code written against it run with one line changed::

    from densevit.compat.dvf import ViTExtractor      # was: from extractor import ViTExtractor

The same constructor (``model_type, stride, model, device``), ``preprocess(image_path, load_size)`` returning
``(batch 1x3xHxW on the CPU, resized PIL image)``, ``extract_descriptors(batch, layer, facet, bin, include_cls)``
returning ``Bx1xTxD``, ``extract_saliency_maps(batch)`` returning ``BxT``, and the attributes ``model_type``,
``model``, ``device``, ``p`` (patch size), ``stride`` (a pair), ``mean``, ``std``, ``load_size`` and
``num_patches`` (``(H, W)`` and ``(h, w)`` of the last extraction, ``None`` before the first). The values are
the original's (densevit's extractor reproduces it to float32 round-off; tests/test_compat_dvf.py).

What differs: the weights come through densevit's loader (``weights=`` as in :class:`densevit.ViTExtractor`;
by default densevit's search, never a download by torch.hub), ``model`` is the timm module densevit runs, and
images are read by densevit's reader (EXIF orientation applied, 16-bit and palette images converted; the
original ignores EXIF). Extras: any densevit backbone name as ``model_type``, densevit's other facets
(``token_norm``, ``key_rope``...), negative layers, saliency for every backbone (the original's only for
``dino_vits8``), inputs other than paths (:mod:`densevit.io.images`), and ``dtype=``. The returned tensors
are ordinary tensors (not inference-mode ones), so the scripts' in-place edits work.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from PIL import Image
from torch import nn

from ..errors import InvalidArgumentError
from ..features.extractor import Features
from ..features.extractor import ViTExtractor as DensevitExtractor
from ..io.images import ImageLike, LoadSize, preprocess
from ..models.registry import IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, get_spec

__all__ = ["ViTExtractor", "MODEL_TYPES", "backbone_of"]

MODEL_TYPES: Dict[str, str] = {
    "dino_vits8": "dino_vits8",
    "dino_vits16": "dino_vits16",
    "dino_vitb8": "dino_vitb8",
    "dino_vitb16": "dino_vitb16",
    # the original loads timm's default pretrained weights of these into DINO's ViT
    "vit_small_patch8_224": "dino_vits8",          # timm's only weights of this architecture are DINO's
    "vit_small_patch16_224": "sup_vits16",         # timm's default: augreg_in21k_ft_in1k
    "vit_base_patch16_224": "sup_vitb16",          # timm's default: augreg2_in21k_ft_in1k
}
"""dino-vit-features' ``model_type`` names -> densevit backbones (any densevit backbone name is accepted too)."""


def backbone_of(model_type: str) -> str:
    """The densevit backbone of a dino-vit-features ``model_type`` (or of a densevit backbone name)."""
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    if model_type == "vit_base_patch8_224":
        raise InvalidArgumentError("model_type 'vit_base_patch8_224' (timm's supervised ViT-B/8) has no densevit "
                                   "backbone; choose one of: " + ", ".join(MODEL_TYPES))
    return get_spec(model_type).name


class ViTExtractor:
    """dino-vit-features' ``ViTExtractor`` on densevit's extractor (module doc).

    Args:
        model_type: a dino-vit-features name (:data:`MODEL_TYPES`) or a densevit backbone name.
        stride: patch-embedding stride (divides the patch size).
        model: a module to extract from instead of building one (passed to densevit's extractor as ``model=``).
        device: where to run, as the original (``'cuda'`` by default).
        weights: checkpoint path or ``"random"``; ``None`` searches where densevit looks (README, weights).
        dtype: ``float32`` (the original's), ``float16`` or ``bfloat16``.
    """

    def __init__(self, model_type: str = "dino_vits8", stride: int = 4, model: Optional[nn.Module] = None,
                 device: Union[str, torch.device] = "cuda", *, weights: Union[str, Path, None] = None,
                 dtype: Union[str, torch.dtype, None] = torch.float32) -> None:
        self.model_type = model_type
        self.device = device
        given = {} if model is None else {"model": model}
        self.extractor = DensevitExtractor(backbone_of(model_type), stride=stride, weights=weights, device=device,
                                           dtype=dtype, **given)
        self.p: int = self.extractor.patch_size
        self.stride: Tuple[int, int] = (self.extractor.stride, self.extractor.stride)
        if model_type in MODEL_TYPES:       # the original's rule: ImageNet statistics for names with "dino"
            dino = "dino" in model_type
            self.mean, self.std = (IMAGENET_MEAN, IMAGENET_STD) if dino else (INCEPTION_MEAN, INCEPTION_STD)
        else:
            self.mean, self.std = self.extractor.spec.mean, self.extractor.spec.std
        self.load_size: Optional[Tuple[int, int]] = None
        self.num_patches: Optional[Tuple[int, int]] = None

    @property
    def model(self) -> nn.Module:
        """The backbone module densevit runs (timm's)."""
        return self.extractor.model

    def preprocess(self, image_path: ImageLike, load_size: LoadSize = None) -> Tuple[torch.Tensor, Image.Image]:
        """``(batch 1x3xHxW on the CPU, the resized RGB image)``: the shorter side resized to ``load_size`` (a
        pair: that size) with Lanczos, normalised by :attr:`mean` / :attr:`std`."""
        x, resized, _ = preprocess(image_path, load_size, self.mean, self.std)
        return x[None], resized

    def _record(self, feats: Features) -> None:
        self.load_size = tuple(feats.grid.input_hw)
        self.num_patches = tuple(feats.grid.shape)

    def extract_descriptors(self, batch: torch.Tensor, layer: int = 11, facet: str = "key", bin: bool = False,
                            include_cls: bool = False) -> torch.Tensor:
        """Descriptors of one facet of one block: ``Bx1xTxD`` (``T`` patch tokens, the CLS token first with
        ``include_cls``; log-binned with ``bin``)."""
        if facet == "attn":
            raise InvalidArgumentError("'attn' is not a descriptor facet; choose key, query, value or token")
        feats = self.extractor.extract(batch, (layer,), (facet,), bin=bin, include_cls=include_cls)
        self._record(feats)
        return feats.descriptors[(layer, facet)].unsqueeze(1).clone()

    def extract_saliency_maps(self, batch: torch.Tensor) -> torch.Tensor:
        """CLS-attention saliency of the last block (ViT-S/8: heads 0, 2, 4, 5), min-max normalised: ``BxT``."""
        feats = self.extractor.extract(batch, (self.extractor.spec.saliency_layer,), (), saliency=True)
        self._record(feats)
        return feats.saliency.clone()
