"""What every subcommand shares: the common options, the handler signature, and the
helpers handlers use. (The parser is built in :mod:`histoalign_wsi.cli`.)"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import Config

__all__ = ["Handler", "add", "opts", "print_json"]

Handler = Callable[[argparse.Namespace, Config], int]


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str, ensure_ascii=False))


def opts(a: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The named arguments as keyword options of a stage."""
    return {n: getattr(a, n) for n in names}


def add(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, handler: Handler, help: str
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(handler=handler)
    p.add_argument("--config", type=Path, help="config.yaml (defaults apply without one)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted for nested keys); repeatable",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads this stage may use in all (default: every CPU it may run on)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    return p
