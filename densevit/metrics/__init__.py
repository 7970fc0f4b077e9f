"""Moved to :mod:`densevit.eval.metrics`; this alias is kept for one release (see CHANGELOG.md)."""
import importlib
import pkgutil
import sys

_moved = importlib.import_module("densevit.eval.metrics")
for _m in pkgutil.iter_modules(_moved.__path__):
    sys.modules[f"{__name__}.{_m.name}"] = importlib.import_module(f"densevit.eval.metrics.{_m.name}")
sys.modules[__name__] = _moved
