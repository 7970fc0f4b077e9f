"""Device selection: the one place that decides where computation runs."""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..errors import DensevitError

DeviceLike = Union[str, torch.device, None]


def select_device(device: DeviceLike = None) -> torch.device:
    """Return the torch device to use.

    ``None`` or ``"auto"`` picks CUDA when available, else the CPU; anything else is parsed by torch and
    checked for availability.
    """
    if device is None or (isinstance(device, str) and device.lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DensevitError(f"unknown device {device!r} (use 'cpu', 'cuda', 'cuda:N' or 'auto')") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DensevitError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(dtype: Union[str, torch.dtype, None]) -> torch.dtype:
    """Parse ``'float32' | 'float16' | 'bfloat16'`` (or a torch dtype) into a torch dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise DensevitError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise DensevitError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16") from None


def synchronize(device: Optional[torch.device]) -> None:
    """Wait for queued work on ``device`` (no-op on the CPU); used by timing code."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
