"""Moved to :mod:`densevit.apps.cli.explore`; this alias is kept for one release (see CHANGELOG.md)."""
import sys

from densevit.apps.cli import explore as _moved

if __name__ == "__main__" and hasattr(_moved, "entry"):  # python -m <old name>
    sys.exit(_moved.entry())
sys.modules[__name__] = _moved
