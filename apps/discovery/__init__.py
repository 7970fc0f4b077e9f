"""Object discovery without labels: TokenCut and LOST (see :mod:`.core`)."""
from .core import *  # noqa: F401,F403
from .core import __all__  # noqa: F401
