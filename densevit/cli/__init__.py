"""Command-line tools of densevit: :data:`COMMANDS` (every command, once), the command base (:func:`run_cli`:
one-line errors and exit codes) and the flags generated from config dataclasses (:mod:`.flags`)."""
from typing import Dict

from .common import ModelOptions, OutputOptions, run_cli
from .flags import add_config_flags, config_from_args, make_parser

COMMANDS: Dict[str, str] = {
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
    "index": "densevit.cli.index",
}
"""Command name -> its module (whose ``entry(argv)`` runs it): the console script ``densevit-<name>``
(setup.cfg), ``python -m densevit <name>``; tests read this table."""

__all__ = ["COMMANDS", "run_cli", "ModelOptions", "OutputOptions", "add_config_flags", "config_from_args",
           "make_parser"]
