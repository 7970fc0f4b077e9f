"""Moved to :mod:`densevit.apps.discovery`; this alias is kept for one release (see CHANGELOG.md)."""
import sys

from densevit.apps.discovery import core as _moved

sys.modules[__name__] = _moved
