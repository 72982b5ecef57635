"""Subcommands of the later stages (encode, score, export, report), registered on the
parser built in :mod:`histoalign_wsi.cli`."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], reg: Any) -> None:
    return None
