"""The bounds on resources, one per resource, each stated before the work starts and raised by a named flag
(docs/limits.md lists them all): a command estimates what it will need from the image headers and its flags,
and refuses in one line naming the flag when the estimate is past the bound."""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

from ..errors import DensevitError
from .files import human_bytes

__all__ = ["DEFAULT_MAX_OUTPUT_MIB", "MIB", "check_output_bytes", "check_count"]

MIB = 2 ** 20
DEFAULT_MAX_OUTPUT_MIB = 256
"""densevit-extract -o: the largest descriptor file written (``--max-output-mib``; 0: no bound). A 224-pixel
load size writes about 2 MiB (ViT-S/8, stride 4); ``--upsample`` at load size 512 about 500 MiB."""


class ResourceLimitError(DensevitError):
    """A run whose estimated need is past a bound (the message names the flag that raises it)."""


def check_output_bytes(estimates: Iterable[Tuple[str, int]], limit_mib: Optional[int], flag: str) -> int:
    """Refuse (:class:`ResourceLimitError`) when a file of ``estimates`` (``(name, bytes)``) would be larger than
    ``limit_mib`` MiB (``None`` or 0: no bound), naming the largest and ``flag``; returns the total bytes."""
    est = list(estimates)
    total = sum(b for _, b in est)
    if not limit_mib or not est:
        return total
    name, biggest = max(est, key=lambda e: e[1])
    if biggest > limit_mib * MIB:
        raise ResourceLimitError(f"{name} would write {human_bytes(biggest)}, more than the {limit_mib} MiB allowed "
                                 f"per output file ({flag} N raises it, 0: no bound; a smaller --load-size "
                                 f"shrinks the output)")
    return total


def check_count(flag: str, value: Optional[int], minimum: int = 1, maximum: Optional[int] = None,
                default_hint: bool = True) -> None:
    """A count given by a flag is a whole number in ``[minimum, maximum]``; 0 never silently means the default."""
    if value is None:
        return
    if value < minimum or (maximum is not None and value > maximum):
        rng = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise DensevitError(f"{flag} must be {rng}, got {value}"
                            + (" (leave it out for the default)" if default_hint and value == 0 else ""))
