"""Subcommands of the outputs (heatmap, export-geojson, report), registered by :mod:`cli_score`."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], reg: Any) -> None:
    return None
