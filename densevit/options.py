"""Config fields that carry their own command-line help: :func:`opt` is how every config dataclass (the apps',
the extraction's, the commands' own) declares a parameter once; :mod:`densevit.cli.flags` turns the fields into
flags. Metadata keys are listed there."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

__all__ = ["opt", "zero_is_none"]


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Optional[Callable[[], Any]] = None,
        **meta: Any) -> Any:
    """A dataclass field with its command-line help and flag options (see :mod:`densevit.cli.flags`)."""
    metadata = {"help": help, **meta}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def zero_is_none(value: Optional[int]) -> Optional[int]:
    """``0`` (or less) on the command line means "none" (no resize, no cap)."""
    return None if value is None or value <= 0 else int(value)
