"""The descriptor explorer's session: images, one extractor for every stride, cached extraction, and the answers to a
click (similarity maps + top-k + best buddies, or the attention of the clicked token), the CLS saliency and the
PCA of all images. Usable from Python and notebooks; ``densevit-explore`` serves it as a web page.

    ex = Explorer("dino_vits8", weights=None, stride=4, load_size=224)
    ex.add_image("cat.jpg"); ex.add_image("ibex.jpg")
    res = ex.similarity(0, x=120.0, y=80.0, settings=Settings(layer=9, bin=True), k=5)
    res.maps[1].topk[0]        # best match in image 1: Match(token, x, y, score), original-image pixels

Caching: one forward pass per (image, stride, load size, facet) records every layer of the facet (and the
saliency); the L2-normalised (optionally log-binned) descriptors of a layer are cached per image and settings,
so a click is one matrix-vector product per image. Caches are bounded (least recently used dropped first).
"""
from __future__ import annotations

import dataclasses
import io
import re
import threading
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

from densevit.errors import DensevitError
from densevit.features import similarity as sim
from densevit.features.binning import log_bin
from densevit.features.frames import InputRule
from densevit.io.images import as_pil, image_size, load_image
from densevit.models.grid import TokenGrid
from densevit.upsample import check_method, upsample_tokens

__all__ = ["Settings", "ExploreImage", "ImageMap", "SimilarityResult", "AttentionResult", "Explorer",
           "DESCRIPTOR_FACETS", "MAX_SIDE", "MAX_LOAD_SIZE", "MAX_TOKENS", "MAX_NAME", "MAX_IMAGES",
           "MAX_UPLOAD_PIXELS"]

DESCRIPTOR_FACETS = ("key", "query", "value", "token")
MAX_SIDE = 4096
"""Images with a longer side are resized to this on loading (a note says so); coordinates stay in the file's
original pixels."""
MAX_LOAD_SIZE = 1024
"""The largest load size the explorer extracts at (``densevit-explore --load-size`` and the page alike)."""
MAX_TOKENS = 1 << 17
"""The most patch tokens of one image the explorer extracts (131072: a 1024-pixel load size at stride 4 of a
ViT-S/8 up to a 2:1 aspect; about 2.4 GB of descriptors per image and facet for ViT-S, twice that for ViT-B)."""
MAX_NAME = 255
"""The longest image name accepted (characters), as most file systems' file name limit."""
MAX_IMAGES = 64
"""The most images the explorer keeps (``densevit-explore --max-images``): each keeps up to about 50 MB (a
4096-pixel side) plus its cached descriptors."""
MAX_UPLOAD_PIXELS = 40_000_000
"""The largest uploaded image, in pixels (``--max-upload-pixels``), read from its header before it is decoded."""


@dataclass(frozen=True)
class Settings:
    """What the descriptors are: block ``layer`` (0-based), ``facet``, log-binning, patch ``stride``, the
    ``load_size`` the shorter image side is resized to (None: original size), and ``upsample``: a
    :data:`densevit.upsample.UPSAMPLERS` method giving pixel-dense descriptors from the patch stride (None: the
    token grid)."""

    layer: int = 11
    facet: str = "key"
    bin: bool = False
    stride: int = 4
    load_size: Optional[int] = 224
    upsample: Optional[str] = None

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ExploreImage:
    """One loaded image: ``image`` as processed (resized when huge), ``original_hw`` of the file, a ``note``."""

    name: str
    image: Image.Image
    original_hw: Tuple[int, int]
    source: str = ""
    note: Optional[str] = None


@dataclass
class ImageMap:
    """A per-token map over one image (``values``: ``T`` float32 on its ``grid``) with its marked tokens."""

    image: int
    grid: TokenGrid
    values: torch.Tensor
    topk: List[sim.Match] = field(default_factory=list)
    best_buddy: Optional[sim.Match] = None

    @property
    def extent(self) -> Tuple[float, float, float, float]:
        return sim.grid_extent(self.grid)

    def upsampled(self) -> torch.Tensor:
        """The map at the image's original size (bilinear between token centres)."""
        return sim.upsample_map(self.values, self.grid)


@dataclass
class SimilarityResult:
    """Cosine-similarity maps of the clicked token over every image (the clicked one included)."""

    source: int
    clicked: sim.Match           # the clicked token (its centre), score 1
    settings: Settings
    maps: List[ImageMap]
    seconds: float = 0.0


@dataclass
class AttentionResult:
    """Attention of the clicked token over the patch tokens of its image (layer, head or head mean);
    ``cls_share``: the attention it gives the CLS token."""

    source: int
    clicked: sim.Match
    settings: Settings
    head: Optional[int]
    map: ImageMap
    cls_share: float
    seconds: float = 0.0


class _LRU:
    """Tensors (or tuples of them) by key, evicting least recently used entries above ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used = int(budget), 0
        self._d: "OrderedDict[Any, Tuple[Any, int]]" = OrderedDict()

    @staticmethod
    def _size(v: Any) -> int:
        if isinstance(v, torch.Tensor):
            return v.numel() * v.element_size()
        if isinstance(v, (tuple, list)):
            return sum(_LRU._size(x) for x in v)
        if isinstance(v, dict):
            return sum(_LRU._size(x) for x in v.values())
        return 0

    def get(self, key: Any) -> Any:
        if key not in self._d:
            return None
        self._d.move_to_end(key)
        return self._d[key][0]

    def put(self, key: Any, value: Any) -> Any:
        n = self._size(value)
        if key in self._d:
            self.used -= self._d.pop(key)[1]
        while self._d and self.used + n > self.budget:
            self.used -= self._d.popitem(last=False)[1][1]
        self._d[key] = (value, n)
        self.used += n
        return value

    def drop(self, pred: Callable[[Any], bool]) -> None:
        for k in [k for k in self._d if pred(k)]:
            self.used -= self._d.pop(k)[1]


class Explorer:
    """Images and cached descriptors for interactive exploration (thread-safe: one computation at a time).

    Args:
        backbone, weights, device, dtype: as :class:`densevit.ViTExtractor`.
        stride, load_size: the default :class:`Settings`.
        cache_gb: memory for cached descriptors (all layers of a facet, normalised layers, attention inputs).
        max_side: images with a longer side are resized to it when loaded.
        max_tokens: refuse settings that give an image more patch tokens than this (memory and time grow with it).
        extractor: an existing :class:`densevit.ViTExtractor` to use (its backbone, device, dtype and default
            stride are taken; it serves every stride: one model per backbone).
    """

    def __init__(self, backbone: str = "dino_vits8", weights: Union[str, Path, None] = None, device=None,
                 dtype: str = "float32", stride: Optional[int] = None, load_size: Optional[int] = 224, cache_gb: float = 6.0,
                 max_side: int = MAX_SIDE, max_tokens: int = MAX_TOKENS, extractor=None,
                 max_images: int = MAX_IMAGES, max_upload_pixels: int = MAX_UPLOAD_PIXELS,
                 upsample_weights: Optional[str] = None) -> None:
        from densevit.features.extractor import ViTExtractor

        if extractor is not None:
            backbone, device, dtype = extractor.spec.name, extractor.device, extractor.dtype
        self.backbone, self.weights, self.device, self.dtype = backbone, weights, device, dtype
        self.max_side, self.max_tokens = max_side, max_tokens
        self.max_images, self.max_upload_pixels = max_images, max_upload_pixels
        self.upsample_weights = upsample_weights
        if stride is None and extractor is None:
            from densevit.models.registry import get_spec

            stride = get_spec(backbone).fine_stride        # half the patch: valid on every backbone
        self._ext = extractor or ViTExtractor(backbone, stride=stride, weights=weights, device=device, dtype=dtype)
        self.defaults = Settings(layer=self._ext.depth - 1, stride=self._ext.stride, load_size=load_size)
        self.images: List[ExploreImage] = []
        self._ids: List[int] = []            # stable cache ids (images can be removed)
        self._next_id = 0
        self._cache = _LRU(int(cache_gb * (1 << 30)))
        self._lock = threading.RLock()
        self.progress: Dict[str, Any] = {"busy": False, "message": "", "done": 0, "total": 0}
        self.check(self.defaults)

    # ------------------------------------------------------------------ model facts
    @property
    def patch_size(self) -> int:
        return self._ext.patch_size

    @property
    def depth(self) -> int:
        return self._ext.depth

    @property
    def num_heads(self) -> int:
        return self._ext.num_heads

    @property
    def strides(self) -> List[int]:
        """Strides offered: divisors of the patch size down to a quarter of it (denser grids cost ~16x more)."""
        return [s for s in range(1, self.patch_size + 1) if self.patch_size % s == 0 and 4 * s >= self.patch_size]

    def extractor(self, stride: int):
        """The one extractor of the backbone (every stride is an argument of its calls), after checking that
        ``stride`` is offered."""
        if stride not in self.strides:
            raise DensevitError(f"stride {stride} is not offered for patch size {self.patch_size}; "
                                f"choose from {', '.join(map(str, self.strides))}")
        return self._ext

    # ------------------------------------------------------------------ images
    def add_image(self, image: Union[str, Path, Image.Image, bytes], name: Optional[str] = None) -> ExploreImage:
        """Load an image (path, PIL image, or encoded bytes); returns it (``note`` says if it was resized).
        An unreadable file raises :class:`DensevitError`."""
        source = str(image) if isinstance(image, (str, Path)) else ""
        if name is not None:
            check_name(name)
        if self.max_images and len(self.images) >= self.max_images:
            raise DensevitError(f"the explorer keeps at most {self.max_images} images: remove one first "
                                f"(densevit-explore --max-images N raises the bound)")
        if isinstance(image, bytes):
            import tempfile

            with tempfile.NamedTemporaryFile(suffix=_safe_suffix(name or "upload")) as f:
                f.write(image)
                f.flush()
                self._check_upload_pixels(f.name, name or "upload")
                img = self._read(f.name, name or "upload")
        elif isinstance(image, Image.Image):
            img = as_pil(image)
        else:
            img = self._read(image, Path(image).name)
        name = name or (Path(image).name if source else f"image{len(self.images)}")
        original_hw = (img.height, img.width)
        note = None
        if max(original_hw) > self.max_side:
            s = self.max_side / max(original_hw)
            img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.LANCZOS)
            note = (f"{name} is {original_hw[1]}x{original_hw[0]} pixels: resized to {img.width}x{img.height} "
                    f"(coordinates stay in original pixels)")
        if min(img.height, img.width) < self.patch_size:
            raise DensevitError(f"{name} is {img.width}x{img.height} pixels, smaller than the "
                                f"{self.patch_size}-pixel patch")
        item = ExploreImage(name, img, original_hw, source, note)
        with self._lock:
            self.images.append(item)
            self._ids.append(self._next_id)
            self._next_id += 1
        return item

    def _upsample_options(self, method: str) -> Dict[str, Any]:
        """Keyword arguments of ``method``: AnyUp's weights (``--upsample-weights``, else searched; found and
        read once, a missing file is one line naming the flag)."""
        if method != "anyup":
            return {}
        from densevit.upsample.anyup import resolve_weights

        return {"weights": resolve_weights(self.upsample_weights)}

    def _check_upload_pixels(self, path: str, name: str) -> None:
        """An upload larger than :attr:`max_upload_pixels` is refused from its header, before any decoding."""
        try:
            h, w = image_size(path)
        except DensevitError:
            return                                  # unreadable: _read names it
        if self.max_upload_pixels and h * w > self.max_upload_pixels:
            raise DensevitError(f"{name} is {w}x{h} = {w * h:,} pixels, more than the {self.max_upload_pixels:,} "
                                f"an upload may have (densevit-explore --max-upload-pixels N raises it)")

    @staticmethod
    def _read(path: Union[str, Path], name: str) -> Image.Image:
        try:
            return load_image(path)
        except Image.DecompressionBombError as exc:
            raise DensevitError(f"{name} is too large to open safely ({exc})") from exc
        except DensevitError as exc:
            msg = str(exc).replace(str(path), name)
            raise DensevitError(msg) from None

    def check_tokens(self, index: int, s: Settings) -> None:
        """Refuse settings that give image ``index`` more than :attr:`max_tokens` patch tokens."""
        g = self.grid(index, s)
        if g.num_tokens > self.max_tokens:
            h, w = g.shape
            raise DensevitError(f"{self.images[index].name} at load size {s.load_size or 'original'} and stride "
                                f"{s.stride} is {h}x{w} = {g.num_tokens} tokens, more than the {self.max_tokens} "
                                f"the explorer extracts; choose a smaller load size or a larger stride")

    def remove_image(self, index: int) -> None:
        with self._lock:
            self._check_index(index)
            cid = self._ids.pop(index)
            self.images.pop(index)
            self._cache.drop(lambda k: k[1] == cid)

    def _check_index(self, index: int) -> None:
        if not 0 <= int(index) < len(self.images):
            raise DensevitError(f"no image {index} (there are {len(self.images)})")

    # ------------------------------------------------------------------ extraction (cached)
    def settings(self, **changes) -> Settings:
        """The default settings with ``changes`` applied and checked."""
        s = dataclasses.replace(self.defaults, **changes)
        return self.check(s)

    def check(self, s: Settings) -> Settings:
        """``s`` with its layer resolved, or :class:`DensevitError` naming what is out of bounds: the facet, the
        stride (one of :attr:`strides`), the layer and the load size (the patch size to :data:`MAX_LOAD_SIZE`
        pixels, or None for the original size)."""
        if s.facet not in DESCRIPTOR_FACETS:
            raise DensevitError(f"unknown facet {s.facet!r}; choose from {', '.join(DESCRIPTOR_FACETS)}")
        if s.upsample is not None:
            check_method(s.upsample)
            self._upsample_options(s.upsample)      # AnyUp without weights: one line now, not after the model
            if s.bin:
                raise DensevitError("log-binning and upsampling do not combine (17 x D channels per pixel); "
                                    "turn one off")
            s = dataclasses.replace(s, stride=self.patch_size)     # upsampled from the patch stride
        if s.stride not in self.strides:
            raise DensevitError(f"stride {s.stride} is not offered for patch size {self.patch_size}; "
                                f"choose from {', '.join(map(str, self.strides))}")
        layer = self.extractor(s.stride).resolve_layer(s.layer)
        if s.load_size is not None and not self.patch_size <= s.load_size <= MAX_LOAD_SIZE:
            raise DensevitError(f"load size {s.load_size} is out of range: {self.patch_size} to {MAX_LOAD_SIZE} "
                                f"pixels (or the original size)")
        return dataclasses.replace(s, layer=layer)

    def _set_progress(self, busy: bool, message: str = "", done: int = 0, total: int = 0) -> None:
        self.progress = {"busy": busy, "message": message, "done": done, "total": total}

    def _stack(self, index: int, s: Settings) -> Dict[str, Any]:
        """All layers of ``s.facet`` for image ``index`` (one forward pass): ``{"raw": L x T x D, "grid",
        "saliency": T}`` (cached)."""
        key = ("stack", self._ids[index], s.stride, s.load_size, s.facet)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        self.check_tokens(index, s)
        ext, item = self.extractor(s.stride), self.images[index]
        layers = tuple(range(ext.depth))
        b = next(iter(ext.frames_features([item.image], InputRule("short_side", s.load_size), layers, (s.facet,),
                                          batch_size=1, guide=True, saliency=True, stride=s.stride)))
        grid = dataclasses.replace(b.grid, image_hw=item.original_hw)
        raw = torch.stack([b.descriptors[(l, s.facet)][0] for l in layers]).float().cpu()
        entry = {"raw": raw, "grid": grid, "saliency": b.saliency[0].float().cpu(),
                 "guide": b.guide.cpu()}                          # for upsampling
        return self._cache.put(key, entry)

    def _attn_inputs(self, index: int, s: Settings) -> Dict[str, Any]:
        """``query`` and ``key`` of every layer with the CLS token first (``L x N x D``), for attention rows."""
        key = ("qk", self._ids[index], s.stride, s.load_size)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        self.check_tokens(index, s)
        ext, item = self.extractor(s.stride), self.images[index]
        layers = tuple(range(ext.depth))
        b = next(iter(ext.frames_features([item.image], InputRule("short_side", s.load_size), layers, (),
                                          batch_size=1, attention=True, stride=s.stride)))
        grid, qks = dataclasses.replace(b.grid, image_hw=item.original_hw), b.attention
        q = torch.stack([qks[l][0][0] for l in layers]).float().cpu()
        k = torch.stack([qks[l][1][0] for l in layers]).float().cpu()
        return self._cache.put(key, {"query": q, "key": k, "grid": grid, "scale": torch.tensor(qks[0][2]),
                                     "prefix": ext.num_prefix_tokens})

    def grid(self, index: int, settings: Optional[Settings] = None) -> TokenGrid:
        """The token grid of image ``index`` at ``settings`` (one token per input pixel when upsampled)."""
        s = settings or self.defaults
        ext = self.extractor(s.stride)
        item = self.images[index]
        from densevit.io.images import resized_hw

        hw = resized_hw((item.image.height, item.image.width), s.load_size)
        if s.upsample is not None:
            return TokenGrid.pixels(hw, item.original_hw)
        return ext.grid(hw, item.original_hw, stride=s.stride)

    def descriptors(self, index: int, settings: Optional[Settings] = None) -> torch.Tensor:
        """L2-normalised descriptors ``TxD`` of image ``index`` (log-binned with ``settings.bin``), cached."""
        s = self.check(settings or self.defaults)
        with self._lock:
            self._check_index(index)
            key = ("norm", self._ids[index], s)
            hit = self._cache.get(key)
            if hit is not None:
                return hit
            st = self._stack(index, s)
            d = st["raw"][s.layer]
            if s.upsample is not None:        # pixel-dense, guided by the image (densevit.upsample)
                d = upsample_tokens(d[None], st["grid"], st["guide"], s.upsample,
                                    **self._upsample_options(s.upsample))[0][0]
            if s.bin:
                h, w = st["grid"].shape
                d = log_bin(d.T.reshape(1, d.shape[1], h, w))[0]
            return self._cache.put(key, sim.normalize(d))

    def prepare(self, settings: Optional[Settings] = None, attention: bool = False) -> float:
        """Extract (or find cached) what ``settings`` need for every image, updating :attr:`progress`;
        returns the seconds spent."""
        s = self.check(settings or self.defaults)
        t0 = time.perf_counter()
        with self._lock:
            n = len(self.images)
            for i in range(n):                      # refuse before extracting anything
                self.check_tokens(i, s)
            try:
                for i in range(n):
                    self._set_progress(True, f"extracting {self.images[i].name} ({i + 1}/{n}): {s.facet}, "
                                       f"stride {s.stride}, load size {s.load_size or 'original'}", i, n)
                    self.descriptors(i, s)
                    if attention:
                        self._attn_inputs(i, s)
            finally:
                self._set_progress(False, "", n, n)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ what a click shows
    def _match(self, grid: TokenGrid, token: int, score: float) -> sim.Match:
        xy = grid.tokens_to_pixels(torch.tensor([token]))[0]
        return sim.Match(int(token), float(xy[0]), float(xy[1]), float(score))

    def similarity(self, source: int, x: float, y: float, settings: Optional[Settings] = None, k: int = 5,
                   buddies: bool = True) -> SimilarityResult:
        """Click at original-image pixel ``(x, y)`` of image ``source``: the cosine-similarity map of that token
        over every image, its ``k`` best matches per image (in its own image, the tokens whose patches overlap
        the clicked one are left out) and its best buddy in each other image (None when it has none)."""
        s = self.check(settings or self.defaults)
        with self._lock:
            self._check_index(source)
            self.prepare(s)
            t0 = time.perf_counter()
            descs = [self.descriptors(i, s) for i in range(len(self.images))]
            grids = [self.grid(i, s) for i in range(len(self.images))]
            token = sim.token_at(grids[source], x, y)
            maps = sim.similarity_maps(token, descs[source], descs)
            others = [i for i in range(len(descs)) if i != source] if buddies else []
            found = dict(zip(others, sim.best_buddies_of(token, descs[source], [descs[i] for i in others],
                                                         [maps[i] for i in others])))
            out = []
            for i, (m, g) in enumerate(zip(maps, grids)):
                v, idx = sim.topk_tokens(m, k, exclude=sim.overlapping_tokens(g, token) if i == source else None)
                top = [self._match(g, int(j), float(val)) for val, j in zip(v, idx)]
                j = found.get(i)
                bb = None if j is None else self._match(g, j, float(m[j]))
                out.append(ImageMap(i, g, m, top, bb))
            clicked = self._match(grids[source], token, 1.0)
            return SimilarityResult(source, clicked, s, out, time.perf_counter() - t0)

    def attention(self, source: int, x: float, y: float, settings: Optional[Settings] = None,
                  head: Optional[int] = None, k: int = 5) -> AttentionResult:
        """Attention of the token at ``(x, y)`` of image ``source`` over its image's patch tokens in layer
        ``settings.layer``: head ``head`` or the mean over heads (None); ``k`` most attended tokens marked."""
        s = self.check(settings or self.defaults)
        if head is not None and not 0 <= int(head) < self.num_heads:
            raise DensevitError(f"head {head} out of range (0..{self.num_heads - 1})")
        with self._lock:
            self._check_index(source)
            if self._cache.get(("qk", self._ids[source], s.stride, s.load_size)) is None:
                self._set_progress(True, f"extracting attention inputs of {self.images[source].name}", 0, 1)
            try:
                qk = self._attn_inputs(source, s)
            finally:
                self._set_progress(False)
            t0 = time.perf_counter()
            grid = qk["grid"]
            token = sim.token_at(grid, x, y)
            skip = qk["prefix"]                                  # CLS (and registers) first
            probs = sim.query_attention(qk["query"][s.layer, skip + token], qk["key"][s.layer], self.num_heads,
                                        float(qk["scale"]))
            row = probs.mean(0) if head is None else probs[int(head)]
            cls_share = float(row[0]) if skip else 0.0
            values = row[skip:].contiguous()
            v, idx = sim.topk_tokens(values, k)
            top = [self._match(grid, int(j), float(val)) for val, j in zip(v, idx)]
            m = ImageMap(source, grid, values, top)
            return AttentionResult(source, self._match(grid, token, float(values[token])), s,
                                   None if head is None else int(head), m, cls_share, time.perf_counter() - t0)

    def saliency(self, index: int, settings: Optional[Settings] = None) -> ImageMap:
        """CLS-attention saliency of image ``index`` (last layer, the backbone's heads, min-max to [0, 1])."""
        s = self.check(settings or self.defaults)
        with self._lock:
            self._check_index(index)
            st = self._stack(index, s)
            return ImageMap(index, st["grid"], st["saliency"])

    def pca(self, settings: Optional[Settings] = None, max_side: int = 1024) -> List[np.ndarray]:
        """The 3-component PCA of the descriptors of all images (fitted together, as ``densevit-pca``) as RGB
        pictures ``HxWx3`` uint8, fit to ``max_side``."""
        from ..draw import pca_rgb
        from ..pca import pca_features

        s = self.check(settings or self.defaults)
        with self._lock:
            if not self.images:
                raise DensevitError("no images loaded")
            key = ("pca", tuple(self._ids), s, max_side)
            hit = self._cache.get(key)
            if hit is not None:
                return [t.numpy() for t in hit]
            self.prepare(s)
            descs = []
            for i in range(len(self.images)):
                st = self._stack(i, s)
                d = st["raw"][s.layer]
                if s.bin:
                    h, w = st["grid"].shape
                    d = log_bin(d.T.reshape(1, d.shape[1], h, w))[0]
                descs.append(d)
            grids = [self.grid(i, s) for i in range(len(self.images))]
            res = pca_features(descs, grids, [im.name for im in self.images], n_components=3)
            pics = [pca_rgb(r.components, r.grid, rgb=(0, 1, 2), max_side=max_side) for r in res]
            self._cache.put(key, [torch.from_numpy(np.ascontiguousarray(p)) for p in pics])
            return pics

    # ------------------------------------------------------------------ saving a finding
    def finding(self, result: Union[SimilarityResult, AttentionResult]) -> Dict[str, Any]:
        """A JSON-able record of a result: images, settings, clicked point and marked tokens (original pixels)."""
        def m(x: Optional[sim.Match]):
            return None if x is None else {"x": round(x.x, 2), "y": round(x.y, 2), "token": x.token,
                                           "score": round(x.score, 6)}

        def img(i: int) -> Dict[str, Any]:
            it = self.images[i]
            return {"index": i, "name": it.name, "path": it.source, "width": it.original_hw[1],
                    "height": it.original_hw[0]}

        base = {"backbone": self.backbone, "weights": None if self.weights is None else str(self.weights),
                "images": [img(i) for i in range(len(self.images))]}
        if isinstance(result, SimilarityResult):
            return {**base, "mode": "similarity", "settings": result.settings.as_dict(),
                    "clicked": {"image": result.source, **m(result.clicked)},
                    "matches": [{"image": mp.image, "topk": [m(t) for t in mp.topk],
                                 "best_buddy": m(mp.best_buddy)} for mp in result.maps]}
        return {**base, "mode": "attention", "settings": result.settings.as_dict(),
                "head": result.head, "clicked": {"image": result.source, **m(result.clicked)},
                "cls_share": round(result.cls_share, 6),
                "matches": [{"image": result.source, "topk": [m(t) for t in result.map.topk]}]}


def check_name(name: str) -> None:
    """Refuse an image name with a control character (NUL, newline...) or longer than :data:`MAX_NAME`."""
    bad = next((c for c in name if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise DensevitError(f"file name {name[:60]!r} holds a control character ({bad!r})")
    if len(name) > MAX_NAME:
        raise DensevitError(f"file name {name[:40]!r}... is {len(name)} characters long (at most {MAX_NAME})")


def _safe_suffix(name: str) -> str:
    """The name's suffix for a temporary file when it is a plain one (``.jpg``), else none (PIL reads the bytes)."""
    suffix = Path(name).suffix
    return suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,10}", suffix) else ""


def encode_png(rgb: np.ndarray) -> bytes:
    """``HxWx3`` uint8 -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
