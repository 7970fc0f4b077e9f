"""Backbones: the registry, weights (find, read, convert, fit, fingerprint), positional encodings, block families, and the token grid they run on."""
