"""Command-line tools of densevit."""
