"""Subcommands of the later stages (encode, score, export, report), registered on the
parser built in :mod:`histoalign_wsi.cli`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .config import Config

__all__ = ["register"]


def _cmd_encode(a: argparse.Namespace, cfg: Config) -> int:
    from .stages import run_encode

    run_encode(a.tiles, a.slide, a.out, cfg)
    return 0


def _cmd_encoders(a: argparse.Namespace, cfg: Config) -> int:
    from .encoders import availability, load_registry

    reg = load_registry(cfg.encoder_registry)
    rows = [
        {
            "name": e.name,
            "kind": e.kind,
            "source": dict(e.weights) or "built in",
            "embed_dim": e.embed_dim,
            "status": availability(e, offline=cfg.offline),
            "description": e.description,
        }
        for e in reg.values()
    ]
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:<16} {r['kind']:<10} dim={r['embed_dim']:<5} {r['status']}")
    return 0


def _cmd_inspect(a: argparse.Namespace, cfg: Config) -> int:
    from .store import open_store

    summary = open_store(a.store).summary()
    print(json.dumps(summary, indent=2, default=str))
    return 1 if summary["problems"] else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], reg: Any) -> None:
    p = reg(sub, "encode", _cmd_encode, "encode tiles at every scale with every configured encoder")
    p.add_argument("tiles", type=Path, help="tile store from 'tile'")
    p.add_argument("--slide", type=Path, required=True, help="the slide the tiles came from")
    p.add_argument("--out", type=Path, required=True, help="feature store (.zarr)")

    p = reg(sub, "encoders", _cmd_encoders, "list the encoder registry and what is available here")
    p.add_argument("--json", action="store_true")

    p = reg(sub, "inspect", _cmd_inspect, "validate a feature store against the schema and summarise it")
    p.add_argument("store", type=Path)

    from . import cli_score

    cli_score.register(sub, reg)
