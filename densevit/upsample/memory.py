"""The memory bound of one upsampling call (``max_bytes``): what the call allocates (its output, the buffers it
must hold whole, and the working set of its chunks), not its inputs or a model's weights.

Every upsampler takes ``max_bytes``. ``None``: no bound, each method's own default chunks (AnyUp and bilinear
:data:`DEFAULT_WORKING_BYTES`; JBU and Upsample Anything's application gathers of at most 64 M elements, about
0.5 GB; Upsample Anything's fit chunks of at most 4 M (pixel, window cell) pairs, about 3 GB with its autograd
graph). The output and the buffers a method must hold whole are fixed; what is left of ``max_bytes`` is the
working budget from which the chunk sizes are derived (per-element costs calibrated on measured peaks). When the fixed part plus :data:`MIN_WORKING_BYTES` does not fit, the
call fails at once with a one-line :class:`~densevit.errors.InvalidArgumentError` (nothing is computed).
"""
from __future__ import annotations

import re
from typing import Optional, Union

from ..errors import InvalidArgumentError

#: Working budget of the chunks when no bound is given (what the chunked paths used before the bound existed).
DEFAULT_WORKING_BYTES = 256 * 2 ** 20
#: The least working budget a bounded call needs (one chunk of a few output rows).
MIN_WORKING_BYTES = 16 * 2 ** 20
FLOAT = 4  # bytes of a float32 element

_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "kb": 10 ** 3, "kib": 2 ** 10, "m": 2 ** 20, "mb": 10 ** 6, "mib": 2 ** 20,
          "g": 2 ** 30, "gb": 10 ** 9, "gib": 2 ** 30, "t": 2 ** 40, "tb": 10 ** 12, "tib": 2 ** 40}


def parse_bytes(text: Union[str, int, None]) -> Optional[int]:
    """``"512M"``, ``"4G"``, ``"4GiB"``, ``"2.5GB"``, ``"1000000"`` -> bytes (``K/M/G/T`` and ``KiB...`` are
    powers of 1024, ``KB/MB/GB/TB`` of 1000); ``None``, ``""``, ``"0"`` or ``"none"`` -> ``None`` (no bound)."""
    if text is None or isinstance(text, int):
        return None if not text else int(text)
    s = str(text).strip().lower()
    if s in ("", "0", "none"):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", s)
    if not m or m.group(2) not in _UNITS:
        raise InvalidArgumentError(f"not a memory size: {text!r} (e.g. 512M, 4G, 2.5GB)")
    n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n <= 0:
        raise InvalidArgumentError(f"a memory bound must be positive, got {text!r}")
    return n


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def working_budget(method: str, output_bytes: int, max_bytes: Optional[int], fixed_bytes: int = 0) -> int:
    """Bytes left for the chunks of a ``method`` call whose output takes ``output_bytes`` and which must hold
    ``fixed_bytes`` more whole, under ``max_bytes`` (``None``: :data:`DEFAULT_WORKING_BYTES`). Raises a one-line
    :class:`InvalidArgumentError` when they do not fit with at least :data:`MIN_WORKING_BYTES` to work in."""
    if max_bytes is None:
        return DEFAULT_WORKING_BYTES
    max_bytes = int(max_bytes)
    if max_bytes <= 0:
        raise InvalidArgumentError(f"max_bytes must be positive, got {max_bytes}")
    need = output_bytes + fixed_bytes + MIN_WORKING_BYTES
    if need > max_bytes:
        what = f"the output alone takes {format_bytes(output_bytes)}" if output_bytes > max_bytes else \
            f"the output ({format_bytes(output_bytes)}) and the buffers {method} holds whole " \
            f"({format_bytes(fixed_bytes)}) need {format_bytes(need)} with the least working space"
        raise InvalidArgumentError(f"{method} cannot upsample within max_bytes={format_bytes(max_bytes)}: {what}; "
                                   f"raise the bound or ask for a smaller output")
    return max_bytes - output_bytes - fixed_bytes
