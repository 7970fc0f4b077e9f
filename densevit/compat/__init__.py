"""Drop-in replacements for the extractors of other projects, on densevit's extractor (:mod:`densevit.compat.dvf`:
dino-vit-features)."""
