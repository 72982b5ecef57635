"""The one command-line entry point, ``histoalign-wsi``, with a subcommand per stage."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .config import Config, load_config, parse_overrides
from .errors import HistoAlignError

__all__ = ["build_parser", "main"]

log = logging.getLogger("histoalign_wsi")

Handler = Callable[[argparse.Namespace, Config], int]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="config.yaml (defaults apply without one)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted for nested keys); repeatable",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _cmd_info(a: argparse.Namespace, cfg: Config) -> int:
    from .stages import open_for

    with open_for(a.slide, cfg, mpp=a.mpp) as s:
        print(json.dumps(dataclasses.asdict(s.info()), indent=2))
    return 0


def _cmd_tissue(a: argparse.Namespace, cfg: Config) -> int:
    from .stages import run_tissue

    run_tissue(a.slide, a.out, cfg, mpp=a.mpp)
    return 0


def _cmd_tile(a: argparse.Namespace, cfg: Config) -> int:
    from .stages import run_tile

    run_tile(a.slide, a.out, cfg, tissue_png=a.tissue, slide_id=a.slide_id, mpp=a.mpp)
    return 0


def _cmd_make_demo(a: argparse.Namespace, cfg: Config) -> int:
    from .synthetic import make_demo_cohort

    paths = make_demo_cohort(
        a.outdir,
        n=a.n,
        width=a.width,
        height=a.height,
        seed=a.seed,
        masks_dir=a.truth,
        ome_every=a.ome_every,
    )
    for p in paths:
        print(p)
    return 0


_COMMANDS: dict[str, Handler] = {}


def _register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, handler: Handler, help: str
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    _common(p)
    _COMMANDS[name] = handler
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="histoalign-wsi",
        description="Zero-shot whole-slide histopathology with vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _register(sub, "info", _cmd_info, "print slide metadata as JSON")
    p.add_argument("slide", type=Path)
    p.add_argument("--mpp", type=float, help="level-0 MPP to use instead of the metadata's")

    p = _register(sub, "tissue", _cmd_tissue, "detect tissue: mask PNG (+ JSON with scale, polygons)")
    p.add_argument("slide", type=Path)
    p.add_argument("--out", type=Path, required=True, help="mask PNG path")
    p.add_argument("--mpp", type=float)

    p = _register(sub, "tile", _cmd_tile, "lay nested multi-scale tiles and write the tile store")
    p.add_argument("slide", type=Path)
    p.add_argument("--out", type=Path, required=True, help="tile store (.zarr)")
    p.add_argument("--tissue", type=Path, help="mask PNG from 'tissue' (detected anew if absent)")
    p.add_argument("--slide-id", help="id recorded in the store (default: from the file name)")
    p.add_argument("--mpp", type=float)

    p = _register(
        sub,
        "make-demo-slides",
        _cmd_make_demo,
        "write generated pyramidal slides with planted regions and their masks",
    )
    p.add_argument("outdir", type=Path)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--width", type=int, default=16384)
    p.add_argument("--height", type=int, default=12288)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ome-every", type=int, default=4, help="every Nth slide is OME-TIFF (0: none)")
    p.add_argument("--truth", type=Path, help="folder for masks and labels.csv")

    from . import cli_more

    cli_more.register(sub, _register)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg = load_config(args.config, overrides=parse_overrides(args.overrides))
        return _COMMANDS[args.command](args, cfg)
    except HistoAlignError as exc:
        print(f"histoalign-wsi {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
