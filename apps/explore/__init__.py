"""The browser explorer: the session (images, settings, similarity and attention on click) and its web layer."""
from .session import *  # noqa: F401,F403
from .session import __all__  # noqa: F401
