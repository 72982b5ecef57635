"""The one command-line entry point, ``histoalign-wsi``: builds the parser. Each
subcommand's handler (``set_defaults(handler=...)``) turns its arguments into one call of
a ``stages.run_*`` function and holds no pipeline logic."""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__, stages
from ._cli_common import add as _add
from ._cli_common import opts as _opts
from ._cli_common import print_json as _print_json
from ._logging import setup_logging
from ._threads import apply_thread_budget
from .batches import expand_inputs
from .cli_learn import learn_commands, report_commands
from .config import Config, load_config, parse_overrides
from .errors import HistoAlignError

__all__ = ["build_parser", "main"]

# --- handlers: arguments in, one stage call, exit status out ----------------------------


def _info(a: argparse.Namespace, cfg: Config) -> int:
    _print_json(stages.run_info(a.slide, cfg, mpp=a.mpp))
    return 0


def _make_demo(a: argparse.Namespace, cfg: Config) -> int:
    paths = stages.run_make_demo_slides(
        a.outdir, truth=a.truth, n=a.n, width=a.width, height=a.height, seed=a.seed, ome_every=a.ome_every
    )
    print("\n".join(map(str, paths)))
    return 0


def _tissue(a: argparse.Namespace, cfg: Config) -> int:
    stages.run_tissue(a.slide, a.out, cfg, mpp=a.mpp)
    return 0


def _tile(a: argparse.Namespace, cfg: Config) -> int:
    stages.run_tile(a.slide, a.out, cfg, tissue_png=a.tissue, slide_id=a.slide_id, mpp=a.mpp)
    return 0


def _encode(a: argparse.Namespace, cfg: Config) -> int:
    stages.run_encode(a.tiles, a.slide, a.out, cfg, threads=a.threads)
    return 0


def _batch(a: argparse.Namespace, cfg: Config) -> int:
    from .batches import FAILED, parse_spec

    if a.stage == "pick":
        stages.pick_slides(parse_spec(a.spec), a.upstream, a.out)
        return 0

    state = {"text": a.text, "calibration": a.calibration, "attention": a.attention, "threads": a.threads}
    rows = stages.run_batch(
        a.stage, parse_spec(a.spec), a.results, a.out, cfg, upstream=a.upstream, token=a.token, **state
    )
    for r in rows:
        if r.status == FAILED:
            print(f"histoalign-wsi batch {a.stage}: slide {r.slide_id!r} failed: {r.error}", file=sys.stderr)
    return 0


def _encoders(a: argparse.Namespace, cfg: Config) -> int:
    rows = stages.run_encoders(cfg)
    if a.json:
        _print_json(rows)
    else:
        for r in rows:
            print(f"{r['name']:<16} {r['kind']:<10} dim={r['embed_dim']:<5} {r['status']}")
    return 0


def _inspect(a: argparse.Namespace, cfg: Config) -> int:
    summary = stages.run_inspect(a.store)
    _print_json(summary)
    return 1 if summary["problems"] else 0


def _embed_prompts(a: argparse.Namespace, cfg: Config) -> int:
    stages.run_embed_prompts(a.out, cfg, cache=a.cache)
    return 0


def _calibrate(a: argparse.Namespace, cfg: Config) -> int:
    stages.run_calibrate(a.stores, a.text, a.out, cfg)
    return 0


def _score(a: argparse.Namespace, cfg: Config) -> int:
    opts = _opts(a, "out", "prediction", "tile_scores", "calibration", "labels")
    stages.run_score(a.stores, cfg, text_path=a.text, **opts)
    return 0


def _summarize(a: argparse.Namespace, cfg: Config) -> int:
    stages.run_summarize(a.predictions, a.out, labels=a.labels, metrics=a.metrics, confusion=a.confusion)
    return 0


def _classify_patches(a: argparse.Namespace, cfg: Config) -> int:
    m = stages.run_classify_patches(a.dir, a.out, cfg, text_path=a.text, mapping=a.mapping)
    keys = ("n", "accuracy", "balanced_accuracy", "macro_f1", "auc_macro_ovr", "untrained")
    _print_json({k: m[k] for k in keys})
    return 0


def _heatmap(a: argparse.Namespace, cfg: Config) -> int:
    stages.run_heatmap(a.tile_scores, a.prediction, a.slide, a.out, cfg, attention=a.attention)
    return 0


def _export(a: argparse.Namespace, cfg: Config) -> int:
    dims = tuple(a.dims) if a.dims else None
    opts = _opts(a, "store", "tissue", "gzip", "attention")
    stages.run_export_geojson(a.tile_scores, a.prediction, a.out, cfg, dims=dims, **opts)
    return 0


def _evaluate_seg(a: argparse.Namespace, cfg: Config) -> int:
    dims = tuple(a.dims) if a.dims else None
    _print_json(
        stages.run_evaluate_segmentation(a.tile_scores, a.truth, cfg, mode=a.mode, dims=dims, out=a.out)
    )
    return 0


def _unlock(a: argparse.Namespace, cfg: Config) -> int:
    info = stages.run_unlock(a.results, force=a.force)
    print(f"removed the lock of {info}" if info else f"{a.results} was not locked")
    return 0


def _report(a: argparse.Namespace, cfg: Config) -> int:
    stages.run_report(a.predictions, a.out, cfg, results=a.results, embed=a.embed)
    return 0


# --- the parser -------------------------------------------------------------------------


def _slide_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _add(sub, "info", _info, "print slide metadata as JSON")
    p.add_argument("slide", type=Path)
    p.add_argument("--mpp", type=float, help="level-0 MPP to use instead of the metadata's")

    p = _add(
        sub, "make-demo-slides", _make_demo, "write generated pyramidal slides with planted regions and masks"
    )
    p.add_argument("outdir", type=Path)
    p.add_argument("--n", type=int, default=2, help="number of slides (they alternate TUM/STR-dominant)")
    p.add_argument("--width", type=int, default=8192, help="level-0 width at 0.25 µm/px")
    p.add_argument("--height", type=int, default=6144)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ome-every", type=int, default=2, help="every Nth slide is OME-TIFF (0: none)")
    p.add_argument("--truth", type=Path, help="folder for masks and labels.csv")

    p = _add(sub, "tissue", _tissue, "detect tissue: mask PNG (+ JSON with scale, polygons)")
    p.add_argument("slide", type=Path)
    p.add_argument("--out", type=Path, required=True, help="mask PNG path")
    p.add_argument("--mpp", type=float)

    p = _add(sub, "tile", _tile, "lay nested multi-scale tiles and write the tile store")
    p.add_argument("slide", type=Path)
    p.add_argument("--out", type=Path, required=True, help="tile store (.zarr)")
    p.add_argument("--tissue", type=Path, help="mask PNG from 'tissue' (detected anew if absent)")
    p.add_argument("--slide-id", help="id recorded in the store (default: from the file name)")
    p.add_argument("--mpp", type=float)


def _feature_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _add(sub, "batch", _batch, "run a per-slide stage over a batch of slides (what the workflow calls)")
    p.add_argument(
        "stage",
        choices=("prepare", "encode", "finish", "pick"),
        help="tissue+tile, encode, score+outputs; pick: these slides' manifest rows (fails if one failed)",
    )
    p.add_argument("--spec", required=True, help="the batch's slides as JSON [[slide_id, path, mpp], ...]")
    p.add_argument("--results", type=Path, required=True, help="results folder (per-slide files go there)")
    p.add_argument("--out", type=Path, required=True, help="the batch manifest (.tsv) to write")
    p.add_argument("--upstream", type=Path, help="the previous stage's manifest of this batch")
    p.add_argument("--token", default="", help="the workflow's retry token (recorded in the manifest)")
    p.add_argument("--text", type=Path, help="finish: text embeddings (.npz)")
    p.add_argument("--calibration", type=Path, help="finish: calibration offsets")
    p.add_argument("--attention", action="store_true", help="finish: add the abmil head's attention")

    p = _add(sub, "encode", _encode, "encode tiles at every scale with every configured encoder")
    p.add_argument("tiles", type=Path, help="tile store from 'tile'")
    p.add_argument("--slide", type=Path, required=True, help="the slide the tiles came from")
    p.add_argument("--out", type=Path, required=True, help="feature store (.zarr)")

    p = _add(sub, "encoders", _encoders, "list the encoder registry and what is available here")
    p.add_argument("--json", action="store_true")

    p = _add(sub, "inspect", _inspect, "validate a feature store against the schema and summarise it")
    p.add_argument("store", type=Path)


def _zeroshot_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _add(sub, "embed-prompts", _embed_prompts, "embed the prompt bag with each encoder's text tower")
    p.add_argument("--out", type=Path, required=True, help="text embeddings (.npz)")
    p.add_argument("--cache", type=Path, help="cache folder (default {results}/cache/text)")

    p = _add(sub, "calibrate", _calibrate, "per-class mean tile logit over the cohort (dask, out of core)")
    p.add_argument("stores", type=Path, nargs="+")
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="calibration JSON")

    p = _add(sub, "score", _score, "score feature stores: per-slide predictions and tile scores")
    p.add_argument("stores", type=Path, nargs="+")
    p.add_argument("--text", type=Path, help="text embeddings from embed-prompts (made now if absent)")
    p.add_argument("--out", type=Path, help="results folder: predictions/, tile_scores/, predictions.csv")
    p.add_argument("--prediction", type=Path, help="one slide's prediction JSON")
    p.add_argument("--tile-scores", type=Path, help="one slide's tile-score table (.parquet)")
    p.add_argument("--calibration", type=Path, help="calibration JSON from 'calibrate'")
    p.add_argument("--labels", type=Path, help="label sheet slide_id,label (metrics)")

    p = _add(
        sub, "classify-patches", _classify_patches, "zero-shot on a folder of patches (class = sub-folder)"
    )
    p.add_argument("dir", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--mapping", type=Path, help="folder -> class (YAML mapping or CSV folder,class)")
    p.add_argument("--text", type=Path)


def _output_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _add(sub, "summarize", _summarize, "cohort predictions.csv, and metrics when labels are given")
    p.add_argument("predictions", type=Path, nargs="+", help="prediction JSONs")
    p.add_argument("--out", type=Path, required=True, help="predictions.csv")
    p.add_argument("--labels", type=Path)
    p.add_argument("--metrics", type=Path, help="metrics.json (needs --labels)")
    p.add_argument("--confusion", type=Path, help="confusion-matrix PNG (needs --labels)")

    p = _add(sub, "heatmap", _heatmap, "per-class probability heatmaps and an argmax map (PNG)")
    p.add_argument("tile_scores", type=Path)
    p.add_argument("--prediction", type=Path, required=True, help="the slide's prediction JSON (colours)")
    p.add_argument("--slide", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--attention", type=Path, help="a head's per-tile attention (.parquet): adds attention.png"
    )

    p = _add(sub, "export-geojson", _export, "QuPath GeoJSON: tiles, class regions, tissue")
    p.add_argument("tile_scores", type=Path)
    p.add_argument("--prediction", type=Path, required=True, help="the slide's prediction JSON (colours)")
    p.add_argument("--store", type=Path, help="feature store (for the slide's dimensions)")
    p.add_argument("--dims", type=int, nargs=2, metavar=("W", "H"), help="level-0 size if no --store")
    p.add_argument("--tissue", type=Path, help="tissue JSON from 'tissue' (exported as annotation)")
    p.add_argument("--gzip", action="store_true", help="write gzip (also implied by a .gz name)")
    p.add_argument(
        "--attention", type=Path, help="a head's per-tile attention (.parquet): an 'attention' measurement"
    )
    p.add_argument("--out", type=Path, required=True)

    p = _add(sub, "evaluate-segmentation", _evaluate_seg, "Dice and IoU per class against ground truth")
    p.add_argument("tile_scores", type=Path)
    p.add_argument(
        "--truth", type=Path, required=True, help="masks.json (PNG masks at a stated scale) or a GeoJSON"
    )
    p.add_argument(
        "--mode",
        choices=("argmax", "threshold"),
        default="argmax",
        help="argmax map or p >= geojson.threshold",
    )
    p.add_argument("--dims", type=int, nargs=2, metavar=("W", "H"), help="level-0 size (GeoJSON truth)")
    p.add_argument("--out", type=Path)

    p = _add(sub, "unlock", _unlock, "clear the results-folder lock a killed workflow run left")
    p.add_argument("results", type=Path, help="the results folder")
    p.add_argument("--force", action="store_true", help="even if its pid now belongs to a live process")

    p = _add(sub, "report", _report, "the cohort's HTML report (heatmaps linked, or inlined with --embed)")
    p.add_argument("predictions", type=Path, help="predictions.csv")
    p.add_argument("--results", type=Path, help="results folder (default: the CSV's folder)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--embed",
        action="store_true",
        default=None,
        help="inline every image: one file to send (a small cohort); default: config report.embed",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="histoalign-wsi",
        description="Zero-shot whole-slide histopathology with vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _slide_commands(sub)
    _feature_commands(sub)
    _zeroshot_commands(sub)
    learn_commands(sub)
    report_commands(sub)
    _output_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Errors are one line on stderr naming the slide or file and
    the problem (exit 2 for bad input, 1 for anything unexpected); ``-v`` adds the
    traceback."""
    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose)
    apply_thread_budget(args.threads)
    prefix = f"histoalign-wsi {args.command}: error:"
    try:
        cfg = load_config(args.config, overrides=parse_overrides(args.overrides))
        for name in ("stores", "inputs", "predictions"):  # batch manifests stand for their slides
            if isinstance(getattr(args, name, None), list):
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


if __name__ == "__main__":
    raise SystemExit(main())
