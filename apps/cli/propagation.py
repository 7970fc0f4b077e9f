"""Flags of the label-propagation benchmarks (``benchmarks/jhmdb.py``, ``benchmarks/vip.py``), written once."""
from __future__ import annotations

import argparse

from densevit.cli.common import add_model_flags
from densevit.cli.flags import add_config_flags, config_from_args

from ..propagation import CRWConfig

__all__ = ["add_propagation_flags", "crw_config"]


def add_propagation_flags(p: argparse.ArgumentParser) -> None:
    """``--filelist --out --protocol --recompute --eval-only --quiet``, the :class:`CRWConfig` flags and the
    backbone's."""
    p.add_argument("--filelist", required=True, help="videowalk-format list: one video per line, its frames folder and its labels "
                   "(see the line format below)")
    p.add_argument("--out", required=True, help="results folder (resumed when it holds results of the same settings)")
    p.add_argument("--protocol", default="crw", choices=["crw"],
                   help="propagation protocol (crw: videowalk's test.py, the reference of this benchmark)")
    p.add_argument("--recompute", action="store_true", help="propagate every video again, even finished ones")
    p.add_argument("--eval-only", action="store_true", help="score the results already in --out; run no model")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-video lines")
    add_config_flags(p, CRWConfig, title="propagation (defaults: CRW's test.py)")
    add_model_flags(p, stride="patch")


def crw_config(args: argparse.Namespace) -> CRWConfig:
    """The :class:`CRWConfig` of the parsed flags, checked."""
    cfg = config_from_args(CRWConfig, args)
    cfg.validate()
    return cfg
