"""Image reading and preprocessing: the one place images become model input.

Every image file densevit reads is opened by :func:`open_image`, which applies the one size rule: an image of
more than :func:`max_pixels` pixels (``$DENSEVIT_MAX_PIXELS``, default 178,956,970: PIL's own refusal
threshold, about 13,377 x 13,377) is refused with :class:`UnreadableImageError` before any pixel is decoded,
and commands skip it like any other unreadable image.

Images in memory follow the same rules as files (:func:`as_pil`): a PIL image has its EXIF orientation applied
and any mode made 8-bit RGB; a numpy array is ``HxW`` / ``HxWx1`` / ``HxWx3`` / ``HxWx4`` (channels last, RGB
order, as PIL and imageio give it; OpenCV's BGR must be flipped first), a torch tensor ``3xHxW`` (channels
first, as torchvision gives it); integer values are ``0..255`` (``uint16``: ``0..65535``), floating-point ones
``[0, 1]`` unnormalised RGB, rounded to 8 bits like a decoded file. The backbone's mean / std normalisation is
applied by :func:`preprocess`, never expected from the caller."""
from __future__ import annotations

import os
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DensevitError, InvalidArgumentError
from .files import PathLike

ImageLike = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]
"""One image: a file path, a PIL image, an ``HxW[xC]`` numpy array or a ``3xHxW`` tensor (see the module doc)."""

MAX_PIXELS_ENV = "DENSEVIT_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 2 * 89_478_485       # PIL's default refusal threshold (2 x Image.MAX_IMAGE_PIXELS)
_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_OPEN_LOCK = threading.Lock()             # PIL's limit and the warning filters are process-wide


class UnreadableImageError(DensevitError):
    """An image file that cannot be read: missing, not an image, truncated, or larger than :func:`max_pixels`."""


def max_pixels() -> Optional[int]:
    """The largest image read, in pixels (width x height): ``$DENSEVIT_MAX_PIXELS`` when set (0: no limit),
    else :data:`DEFAULT_MAX_PIXELS`. A 12000 x 12000 image (144 Mpixels) is under the default."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        raise DensevitError(f"${MAX_PIXELS_ENV} must be a whole number of pixels (0: no limit), "
                            f"got {text!r}") from None
    return None if value <= 0 else value


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


@contextmanager
def open_image(path: Union[str, Path]) -> Iterator[Image.Image]:
    """``with open_image(path) as img``: the file opened by PIL (header read, no pixels decoded), refused with
    :class:`UnreadableImageError` when it is missing, not an image, or more than :func:`max_pixels` pixels.
    Errors while the caller decodes it inside the ``with`` become :class:`UnreadableImageError` too. This is
    the size rule for every image densevit reads (PIL's own decompression-bomb check and warning are
    replaced by it)."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableImageError(f"no such image file: {path}")
    limit = max_pixels()
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            before, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                img = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = before
    except _READ_ERRORS as exc:
        raise UnreadableImageError(f"cannot read image {path}: {_reason(exc)}") from exc
    with img:
        w, h = img.size
        if limit is not None and w * h > limit:
            raise UnreadableImageError(f"cannot read image {path}: {w}x{h} is {w * h:,} pixels, more than the "
                                       f"{limit:,} allowed (${MAX_PIXELS_ENV} raises the limit)")
        try:
            yield img
        except UnreadableImageError:
            raise
        except _READ_ERRORS as exc:
            raise UnreadableImageError(f"cannot read image {path}: {_reason(exc)}") from exc


def _to_8bit_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (16-bit, palette, RGBA, greyscale, CMYK...) -> 8-bit RGB (alpha dropped, as the reference)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


_DECODED = threading.local()      # decode_once(): {file identity: decoded image} of this thread's scope


@contextmanager
def decode_once() -> Iterator[None]:
    """``with decode_once():`` every :func:`load_image` (and :func:`check_readable`) of an unchanged file inside
    decodes it once: checking an input and extracting it read the same decoded image (the scope holds the decoded
    images until it ends; nested scopes share the outer one)."""
    outer = getattr(_DECODED, "cache", None)
    if outer is None:
        _DECODED.cache = {}
    try:
        yield
    finally:
        if outer is None:
            _DECODED.cache = None


def _identity(path: Path) -> Optional[Tuple[str, int, int]]:
    try:
        st = path.stat()
    except OSError:
        return None
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def load_image(path: Union[str, Path]) -> Image.Image:
    """Read an image file as 8-bit RGB, applying its EXIF orientation (inside :func:`decode_once`, once)."""
    cache = getattr(_DECODED, "cache", None)
    key = _identity(Path(path)) if cache is not None else None
    if key is not None and key in cache:
        return cache[key]
    with open_image(path) as img:
        img.load()
        img = _to_8bit_rgb(ImageOps.exif_transpose(img))
    if key is not None:
        cache[key] = img
    return img


LoadSize = Union[int, Tuple[int, int], None]


def resized_hw(image_hw: Tuple[int, int], load_size: LoadSize) -> Tuple[int, int]:
    """Size after resizing the shorter side to ``load_size`` (the longer side floored), as torchvision's Resize;
    a pair ``(h, w)`` is that size exactly (torchvision's rule too)."""
    h, w = image_hw
    if load_size is None:
        return h, w
    if isinstance(load_size, (tuple, list)):
        return int(load_size[0]), int(load_size[1])
    if h <= w:
        return load_size, int(load_size * w / h)
    return int(load_size * h / w), load_size


def check_load_size(load_size: LoadSize) -> None:
    """A load size is ``None``, a positive side or a pair of positive sides ``(h, w)``."""
    pair = isinstance(load_size, (tuple, list))
    sides = tuple(load_size) if pair else (load_size,)
    if load_size is not None and ((pair and len(sides) != 2) or min(sides) < 1):
        raise InvalidArgumentError(f"load size must be positive, got {load_size}")


def resize_short_side(img: Image.Image, load_size: LoadSize) -> Image.Image:
    """Resize so the shorter side is ``load_size`` (or to ``(h, w)`` exactly) with PIL's Lanczos filter (as the
    reference extractor)."""
    if load_size is None:
        return img
    check_load_size(load_size)
    h, w = resized_hw((img.height, img.width), load_size)
    if (h, w) == (img.height, img.width):
        return img
    return img.resize((w, h), Image.LANCZOS)


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``3xHxW`` uint8 tensor (what data-loader workers pass on: 4x less than float)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[B]x3xHxW`` (any device) -> normalised float32, ``(x / 255 - mean) / std`` per channel."""
    x = x.float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised ``[B]x3xHxW`` (what :func:`normalize` gives) -> RGB float32 in ``[0, 1]`` (e.g. the guide image
    of an upsampler)."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x.float() * s + m).clamp(0, 1)


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image -> normalised float tensor ``3xHxW``."""
    return normalize(to_uint8_tensor(img), mean, std)


_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that transpose the image


def image_size(path: Union[str, Path]) -> Tuple[int, int]:
    """``(H, W)`` of an image file after its EXIF orientation, from the header only (no pixel decoding)."""
    with open_image(path) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (w, h) if orientation in _SWAPPING_ORIENTATIONS else (h, w)


def load_resized(path: Union[str, Path], load_size: LoadSize, fast_jpeg: bool = False
                 ) -> Tuple[Image.Image, Tuple[int, int]]:
    """Read an image and resize its shorter side to ``load_size``: ``(resized RGB image, original (H0, W0))``.

    The default is the exact reference path (full decode, Lanczos). ``fast_jpeg=True`` lets libjpeg decode a JPEG
    at 1/2, 1/4 or 1/8 scale (PIL's draft mode) while keeping at least twice the target size, then resizes
    with Lanczos to exactly the size the exact path gives: photographs many times larger than the load size
    decode several times faster, with nearly identical descriptors (see README).
    """
    if not fast_jpeg or load_size is None or isinstance(load_size, (tuple, list)):
        img = load_image(path)
        return resize_short_side(img, load_size), (img.height, img.width)
    with open_image(path) as img:
        w0, h0 = img.size
        if img.format == "JPEG":
            side = 2 * load_size
            img.draft("RGB", (side, side))  # largest reduction keeping both sides >= 2 x load size
        img.load()
        orientation = img.getexif().get(0x0112, 1)
        img = _to_8bit_rgb(ImageOps.exif_transpose(img))
    original_hw = (w0, h0) if orientation in _SWAPPING_ORIENTATIONS else (h0, w0)
    check_load_size(load_size)
    h, w = resized_hw(original_hw, load_size)
    if (img.height, img.width) != (h, w):
        img = img.resize((w, h), Image.LANCZOS)
    return img, original_hw


_FLOAT_SLACK = 1.0 / 512      # float images may overshoot [0, 1] by round-off (half a uint8 step, at most)


def _array_to_pil(a: np.ndarray) -> Image.Image:
    """``HxW`` / ``HxWx{1,3,4}`` array (channels last) -> PIL image, floats in [0, 1] rounded to 8 bits."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise InvalidArgumentError(f"an image array must be HxW, HxWx1, HxWx3 or HxWx4 (channels last), "
                            f"got shape {a.shape}")
    if a.dtype.kind == "f":
        if a.size and (not np.isfinite(a).all() or a.min() < -_FLOAT_SLACK or a.max() > 1 + _FLOAT_SLACK):
            raise InvalidArgumentError(f"a floating-point image must be RGB in [0, 1] (values from {a.min():.3g} to "
                                f"{a.max():.3g}); a normalised tensor is model input: give it to extract")
        a = np.clip(np.asarray(a, np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8 and not (a.dtype == np.uint16 and a.ndim == 2):   # uint16 greyscale: PIL's I;16
        raise InvalidArgumentError(f"an image array must be uint8 (0..255), uint16 greyscale or float in [0, 1], "
                            f"got {a.dtype}")
    return Image.fromarray(np.ascontiguousarray(a))


def as_pil(image: ImageLike) -> Image.Image:
    """One image in memory or on disk -> 8-bit RGB PIL image, by the rules of files: EXIF orientation applied,
    any mode converted as :func:`load_image` does. Tensors are ``3xHxW`` (or ``1x3xHxW``), arrays channels
    last (module doc)."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return _to_8bit_rgb(ImageOps.exif_transpose(image))
    if isinstance(image, torch.Tensor):
        t = image.detach()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise InvalidArgumentError(f"an image tensor must be 3xHxW or 1x3xHxW (channels first), got shape "
                                f"{tuple(image.shape)}")
        return _to_8bit_rgb(_array_to_pil(t.permute(1, 2, 0).cpu().float().numpy() if t.is_floating_point()
                                          else t.permute(1, 2, 0).cpu().numpy()))
    if isinstance(image, np.ndarray):
        return _to_8bit_rgb(_array_to_pil(image))
    raise InvalidArgumentError(f"not an image: {type(image).__name__} (give a path, a PIL image, an HxWx3 array or a "
                        f"3xHxW tensor)")


def split_images(images: Union[ImageLike, Sequence[ImageLike]]) -> List[ImageLike]:
    """The single images of ``images``: a list or tuple is its items, a ``Bx3xHxW`` tensor its ``B`` images,
    anything else one image."""
    if isinstance(images, (list, tuple)):
        return [one for item in images for one in split_images(item)]
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return list(images.unbind(0))
    return [images]


def preprocess(image: ImageLike, load_size: LoadSize, mean: Sequence[float], std: Sequence[float]
               ) -> Tuple[torch.Tensor, Image.Image, Tuple[int, int]]:
    """Read (if a path) or take one image (:func:`as_pil`), resize the shorter side and normalise.

    Returns ``(x 3xHxW, resized PIL image, original (H0, W0))``.
    """
    img = as_pil(image)
    original_hw = (img.height, img.width)
    resized = resize_short_side(img, load_size)
    return to_tensor(resized, mean, std), resized, original_hw


# ------------------------------------------------------------------------------------------------ inputs
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
"""File name suffixes read as images when a folder is given."""


def not_a_file_or_folder(p: Path) -> str:
    """The one line for an input that is neither a regular file nor a folder: missing, or a FIFO, socket or
    device (never read: reading a FIFO would wait for a writer)."""
    if not p.exists() and not p.is_symlink():
        return f"no such file or folder: {p}"
    if p.is_symlink() and not p.exists():
        return f"{p} is a broken symbolic link"
    import stat

    mode = p.stat().st_mode
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    return f"{p} is {kind}, not an image file or a folder"


def gather_images(inputs: Iterable[str]) -> List[Path]:
    """Expand files and folders (non-recursive, sorted) into a list of image paths; missing paths are errors."""
    out: List[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DensevitError(f"no images found in folder {p}")
            out.extend(files)
        elif p.is_file():
            out.append(p)
        else:
            raise DensevitError(not_a_file_or_folder(p))
    if not out:
        raise DensevitError("no input images given")
    return out


def gather_sets(inputs: Sequence[str]) -> List[tuple[str, List[Path]]]:
    """Inputs -> named image sets: a folder whose sub-folders hold images is a folder of sets (one per
    sub-folder, as the reference tools take); otherwise all files/folders given form one set."""
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        root = Path(inputs[0])
        subdirs = sorted(d for d in root.iterdir() if d.is_dir())
        if subdirs:
            return [(d.name, sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
                    for d in subdirs]
        return [(root.name, gather_images(inputs))]
    return [("set", gather_images(inputs))]


# ------------------------------------------------------------------------------------------------ unreadable images
MAX_LISTED = 10     # names shown in the closing line of unreadable images


def skip_unreadable(prog: str, reason: object, where: str = "") -> None:
    """The one line for an input image left out because it cannot be read (every command, every mode):
    ``prog: [where: ]skipping unreadable image: reason``, written above any progress bar."""
    from tqdm import tqdm

    tqdm.write(f"{prog}: {where + ': ' if where else ''}skipping unreadable image: {reason}", file=sys.stderr)


class TooSmallImageError(UnreadableImageError):
    """An image smaller than the patch of the model that reads it: left out like an unreadable one."""


def check_min_side(name: object, image_hw: Tuple[int, int], patch_size: Optional[int], model: str = "") -> None:
    """The one rule for images too small for a model: a side under ``patch_size`` pixels (the original image's,
    before resizing) raises :class:`TooSmallImageError` naming the image, so every command skips it in one line."""
    if patch_size and min(image_hw) < patch_size:
        raise TooSmallImageError(f"{name} is {image_hw[1]}x{image_hw[0]} pixels, smaller than the "
                                 f"{patch_size}-pixel patch" + (f" of {model}" if model else ""))


def check_readable(path: Path, min_side: Optional[int] = None) -> None:
    """Raise :class:`UnreadableImageError` with one line if ``path`` cannot be decoded as an
    image. Decodes the whole file (JPEGs at reduced scale, which still reads every byte), so truncated and
    garbage files are caught, and images over the size limit (:func:`max_pixels`). Inside :func:`decode_once`
    the file is decoded in full, once, for the work that follows. ``min_side``: the patch size of the model
    that will read it (:func:`check_min_side`)."""
    if getattr(_DECODED, "cache", None) is not None:
        img = load_image(path)
        hw = (img.height, img.width)
    else:
        _, hw = load_resized(path, 16, fast_jpeg=True)
    check_min_side(path, hw, min_side)


def drop_unreadable(prog: str, images: Sequence[Path], where: str = "", min_side: Optional[int] = None
                    ) -> Tuple[List[Path], List[Path]]:
    """The rule every command follows for bad input images, checked before the work: each unreadable image
    (or one with a side under ``min_side`` pixels, the model's patch) is reported in one line
    (:func:`skip_unreadable`) and left out. Returns ``(readable, unreadable)``; callers process the readable ones
    and close with :func:`report_unreadable` (exit code 1)."""
    good: List[Path] = []
    bad: List[Path] = []
    for p in images:
        try:
            check_readable(p, min_side)
            good.append(p)
        except UnreadableImageError as exc:
            bad.append(p)
            skip_unreadable(prog, exc, where)
    return good, bad


def report_unreadable(prog: str, unreadable: Sequence[PathLike]) -> int:
    """The one closing line for images left out by :func:`skip_unreadable` (``prog: N unreadable image(s) left
    out: names``, sorted, the first :data:`MAX_LISTED` named); returns the exit code: 1 if any, else 0."""
    if not unreadable:
        return 0
    names = sorted(Path(p).name if isinstance(p, Path) else str(p) for p in unreadable)
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    print(f"{prog}: {len(names)} unreadable image(s) left out: {', '.join(names[:MAX_LISTED])}{more}",
          file=sys.stderr)
    return 1
