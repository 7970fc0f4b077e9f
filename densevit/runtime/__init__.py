"""Where and how work runs: device choice, torch.distributed sessions, background threads."""
from .device import parse_dtype, select_device, synchronize
from .dist import DistContext, deal, main_with_session, session
from .threads import BackgroundWriter, default_workers, prefetch_map

__all__ = [
    "select_device", "parse_dtype", "synchronize",
    "DistContext", "deal", "session", "main_with_session",
    "BackgroundWriter", "default_workers", "prefetch_map",
]
