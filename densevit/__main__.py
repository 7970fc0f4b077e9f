"""``python -m densevit <command> [flags]``: every densevit command without its console script
(``python -m densevit coseg IMAGES -o OUT`` = ``densevit-coseg IMAGES -o OUT``)."""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

from .version import __version__

COMMANDS = {
    "extract": "densevit.cli.extract",
    "analyze": "densevit.cli.analyze",
    "segment": "densevit.cli.segment",
    "coseg": "densevit.apps.cli.coseg",
    "partseg": "densevit.apps.cli.partseg",
    "match": "densevit.apps.cli.match",
    "pca": "densevit.apps.cli.pca",
    "discover": "densevit.apps.cli.discover",
    "vos": "densevit.apps.cli.vos",
    "explore": "densevit.apps.cli.explore",
    "index": "densevit.apps.cli.index",
}
USAGE = f"usage: python -m densevit {{{','.join(COMMANDS)}}} [flags]   (python -m densevit COMMAND --help)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``densevit-<command>`` with the remaining arguments; returns its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] == "--version":
        print(f"densevit {__version__}")
        return 0
    name = args[0].removeprefix("densevit-")
    if name not in COMMANDS:
        print(f"densevit: error: unknown command {args[0]!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[name]).entry(args[1:])


if __name__ == "__main__":
    sys.exit(main())
