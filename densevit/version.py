"""The package version (one place: setup.cfg reads it, ``densevit.__version__`` re-exports it)."""
__version__ = "0.1.0"
