"""Drop-in replacements for the extractors of other projects, on densevit's extractor (:mod:`densevit.compat.dvf`:
dino-vit-features; import its ``ViTExtractor`` from there, it is not densevit's)."""
from . import dvf

__all__ = ["dvf"]
