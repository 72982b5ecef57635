"""The one command-line entry point, ``histoalign-wsi``: the parser, built from one
module per group of subcommands, and :func:`main`. Each subcommand's handler turns its
arguments into one call of a ``stages.run_*`` function and holds no pipeline logic."""

from __future__ import annotations

import argparse
import errno
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from .._logging import setup_logging
from .._threads import apply_thread_budget
from ..batches import expand_inputs, failed_rows
from ..config import load_config, parse_overrides
from ..errors import HistoAlignError
from .common import OneLineParser
from .features import feature_commands
from .learn import learn_commands
from .outputs import output_commands
from .reports import report_commands
from .slides import slide_commands
from .zeroshot import zeroshot_commands

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="histoalign-wsi",
        description="Zero-shot whole-slide histopathology with vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    slide_commands(sub)
    feature_commands(sub)
    zeroshot_commands(sub)
    learn_commands(sub)
    report_commands(sub)
    output_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Errors are one line on stderr naming the slide or file and
    the problem (exit 2 for bad input, 1 for anything unexpected); ``-v`` adds the
    traceback. A command that fails leaves no output folder (nor cache) it made."""
    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose)
    apply_thread_budget(args.threads)
    made = _new_paths(args)
    code = _run(args)
    if code != 0:
        for p in made:
            shutil.rmtree(p, ignore_errors=True)
    return code


def _new_paths(args: argparse.Namespace) -> list[Path]:
    """The output folder and its cache, where they do not exist yet (the batch stage's
    manifests are the workflow's, and record failures: they stay)."""
    out = getattr(args, "out", None)
    if not isinstance(out, Path) or args.command == "batch":
        return []
    return [p for p in (out, out / "cache") if not p.exists()]


def _run(args: argparse.Namespace) -> int:
    prefix = f"histoalign-wsi {args.command}: error:"
    try:
        cfg = load_config(args.config, overrides=parse_overrides(args.overrides))
        for name in ("stores", "inputs", "predictions"):  # batch manifests stand for their slides
            if isinstance(getattr(args, name, None), list):
                if name == "predictions":  # the slides that failed are named in the cohort table
                    args.failed = failed_rows(getattr(args, name))
                setattr(args, name, expand_inputs(getattr(args, name)))
        code: int = args.handler(args, cfg)
        return code
    except HistoAlignError as exc:
        if args.verbose:
            raise
        print(f"{prefix} {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        if args.verbose:
            raise
        where = exc.filename or getattr(args, "out", None) or "the output"
        if exc.errno == errno.ENOSPC:
            print(f"{prefix} no space left on device while writing {where}", file=sys.stderr)
        else:
            print(f"{prefix} {exc.strerror or exc} ({where})", file=sys.stderr)
        return 1
    except Exception as exc:
        if args.verbose:
            raise
        print(
            f"{prefix} unexpected {type(exc).__name__}: {exc} (run with -v for the traceback)",
            file=sys.stderr,
        )
        return 1
