"""Subcommands of scoring and outputs, registered by :mod:`histoalign_wsi.cli_more`."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], reg: Any) -> None:
    return None
