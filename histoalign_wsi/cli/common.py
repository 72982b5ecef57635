"""What every subcommand shares: the common options, the handler signature, argument
types that refuse bad values before any heavy import, and a parser whose errors are one
line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from .._json import finite_json
from ..config import Config

__all__ = [
    "Handler",
    "OneLineParser",
    "Subparsers",
    "add",
    "at_least",
    "existing",
    "existing_dir",
    "mpp_value",
    "opts",
    "print_json",
    "says",
]

Handler = Callable[[argparse.Namespace, Config], int]
Subparsers = argparse._SubParsersAction


class OneLineParser(argparse.ArgumentParser):
    """An argument error is one line, ``histoalign-wsi CMD: error: ...``, exit 2 (the
    usage stays one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def print_json(obj: Any) -> None:
    print(json.dumps(finite_json(obj), indent=2, default=str, ensure_ascii=False, allow_nan=False))


def says(command: str, what: str, where: Path) -> None:
    """The last line of a learning command: what the numbers above are, and where the
    rest is (on stderr, so stdout stays one JSON document)."""
    print(f"{command}: the numbers above are {what}; all metrics in {where}", file=sys.stderr)


def opts(a: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The named arguments as keyword options of a stage."""
    return {n: getattr(a, n) for n in names}


def at_least(low: int) -> Callable[[str], int]:
    """An argument type: a whole number >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} is less than {low}")
        return value

    parse.__name__ = f"whole number >= {low}"
    return parse


def mpp_value(text: str) -> float:
    """An argument type: a finite resolution in micrometres per pixel (0 < mpp <= 1000)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or not 0 < value <= 1000:
        raise argparse.ArgumentTypeError(f"{text} is not a resolution in um/px (0 < mpp <= 1000)")
    return value


def existing(text: str) -> Path:
    """An argument type: a path that exists and can be read."""
    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    if not os.access(p, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be read (permission denied)")
    return p


def existing_dir(text: str) -> Path:
    """An argument type: a folder that exists and can be listed."""
    p = existing(text)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder")
    if not os.access(p, os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be listed (permission denied)")
    return p


def add(sub: Subparsers, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    p.set_defaults(handler=handler)
    p.add_argument("--config", type=existing, help="config.yaml (defaults apply without one)")
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
        type=at_least(1),
        help="CPU threads this stage may use in all (default: every CPU it may run on)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    return p
