"""The cohort report: one HTML page that stays small and fast at 10,000 slides. The slide
table is compact JSON, shown in pages by a little script that sorts and filters across
every slide (state in the URL, so a view can be linked); each row links its heatmaps by
relative path (the page sits in the results folder) and shows the small argmax thumbnail
the heatmap stage writes. Metrics, encoders and what was learned from reports are plain
HTML. ``embed=True`` inlines the images instead, for sending a small cohort as one file."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from collections.abc import Callable, Collection, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd
from PIL import Image

from .._atomic import atomic_file
from .._json import finite_json
from ..zeroshot.prediction import Prediction
from .heatmaps import FORMATS, class_files
from .report_failed import failed_section, failed_summary
from .report_heads import head_predictions, heads_section
from .report_sites import ci_cell, per_site_table, site_signature_section

log = logging.getLogger(__name__)
#: an embedded report larger than this is warned about (images inline grow with the cohort)
EMBED_WARN_BYTES = 10_000_000

__all__ = ["PAGE_SIZE", "write_report"]

#: slides per page of the table
PAGE_SIZE = 50


def _asset(name: str) -> str:
    """The page's stylesheet and script, kept as files (``data/report.css``, ``.js``). The
    script draws the table from ``DATA.rows`` ([id, label, predicted, status, n_tiles,
    probs, areas, images]); sorting and filtering run over every row, drawing over one
    page, and text goes in through ``textContent`` (never ``innerHTML``)."""
    return resources.files("histoalign_wsi").joinpath("data", name).read_text(encoding="utf-8")


def _href(target: Path, base: Path) -> str:
    """``target`` relative to the folder ``base``, as a URL path (every part quoted, so a
    slide id with spaces, ``#`` or non-ASCII letters stays one link)."""
    rel = os.path.relpath(target, base)
    return "/".join(quote(part) for part in Path(rel).parts)


def _inline(path: Path, width: int) -> str:
    """A data URI of the image at ``path``, at most ``width`` px wide."""
    im = Image.open(path).convert("RGB")
    if im.width > width:
        im = im.resize((width, max(1, round(im.height * width / im.width))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="WEBP", quality=80)
    return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode()


def _find(folder: Path, stem: str) -> Path | None:
    """``folder/stem.{webp,jpg,png}``, whichever format the heatmap stage wrote."""
    for ext, _, _ in FORMATS.values():
        if (p := folder / f"{stem}.{ext}").is_file():
            return p
    return None


def _images(hm: Path, pred: Prediction | None, base: Path, *, embed: bool) -> dict[str, str]:
    """The links (or, with ``embed``, data URIs) of a slide's argmax map, its thumbnail
    and the predicted class's heatmap."""
    out: dict[str, str] = {}
    argmax = _find(hm, "argmax")
    thumb = _find(hm, "argmax_thumb") or argmax
    cls = None
    if pred is not None and pred.predicted_class in pred.classes:
        stem = Path(class_files(list(pred.classes))[pred.predicted_class]).stem
        cls = _find(hm, stem)
    attention = _find(hm, "attention")
    for name, path, width in (
        ("thumb", thumb, 192),
        ("argmax", argmax, 640),
        ("predicted", cls, 640),
        ("attention", attention, 640),
    ):
        if path is not None:
            out[name] = _inline(path, width) if embed else _href(path, base)
    return out


def _number(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


def _rows(
    table: pd.DataFrame,
    preds: Mapping[str, Path],
    res: Path,
    base: Path,
    *,
    embed: bool,
    heads: Mapping[str, Mapping[str, list[Any]]],
) -> Iterator[tuple[list[Any], Prediction | None]]:
    """One compact row per slide (predictions read one at a time: memory stays flat)."""
    for r in table.itertuples(index=False):
        sid = str(r.slide_id)
        path = preds.get(sid)
        p = Prediction.read(path) if path is not None else None
        probs = [round(float(p.probabilities[c]), 4) for c in p.classes] if p and p.probabilities else None
        areas = {
            str(k): round(float(v), 4)
            for k, v in ((p.extra.get("region_area_mm2") if p else None) or {}).items()
        }
        label = _number(getattr(r, "label", None))
        tiles = _number(getattr(r, "n_tiles", None))
        yield (
            [
                sid,
                "" if label is None else str(label),
                str(r.predicted_class),
                str(r.status),
                None if tiles is None else int(tiles),
                probs,
                areas,
                _images(res / "heatmaps" / sid, p, base, embed=embed),
                dict(heads.get(sid, {})),
            ],
            p,
        )


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v if v is not None else "–"))


def _learned_from_reports(res: Path, show: Callable[[str], bool]) -> str:
    """Short tables of ``reports/metrics.json`` (slide-report models: held-out retrieval
    beside chance, zero-shot diagnosis, linear probe) and ``distill/metrics.json``
    (distilled classifier against no pairing), when those runs exist."""
    out = []
    rp = res / "reports" / "metrics.json"
    if show("reports") and rp.is_file():
        m = json.loads(rp.read_text(encoding="utf-8"))
        out.append(
            "<h2>Learned from reports</h2><div class='scroll'><table id='report-models'><tr><th>model</th>"
            "<th>slide→report R@1 / R@5 / R@10</th><th>report→slide R@1</th><th>chance R@1 / R@5</th>"
            "<th>zero-shot AUC</th><th>zero-shot bal. acc.</th><th>probe bal. acc. (test slides)</th></tr>"
        )
        for name, r in m["models"].items():
            s2r, ch = r["retrieval"]["slide_to_report"], r["retrieval"]["chance"]
            zs, probe = r.get("zero_shot", {}), r.get("linear_probe", {}).get("mean", {})
            out.append(
                f"<tr><td>{html.escape(name)}</td>"
                f"<td>{_fmt(s2r['R@1'])} / {_fmt(s2r['R@5'])} / {_fmt(s2r['R@10'])}</td>"
                f"<td>{_fmt(r['retrieval']['report_to_slide']['R@1'])}</td>"
                f"<td>{_fmt(ch['R@1'])} / {_fmt(ch['R@5'])}</td>"
                f"<td>{_fmt(zs.get('auc_macro_ovr'))}</td><td>{_fmt(zs.get('balanced_accuracy'))}</td>"
                f"<td>{_fmt(probe.get('balanced_accuracy'))}</td></tr>"
            )
        out.append(
            f"</table></div><p>{r['retrieval']['n']} held-out slides; {m['reports']['n_truncated']} of "
            f"{m['reports']['n_texts']} reports truncated by the text tower.</p>"
        )
    dp = res / "distill" / "metrics.json"
    if show("distill") and dp.is_file():
        m = json.loads(dp.read_text(encoding="utf-8"))
        out.append(
            "<h2>Distilled from paired reports</h2><div class='scroll'><table id='distill'><tr>"
            "<th>classifier</th><th>balanced accuracy</th><th>macro F1</th><th>AUC</th></tr>"
        )
        for name, r in m["metrics"].items():
            out.append(
                f"<tr><td>{html.escape(name)}</td><td>{_fmt(r.get('balanced_accuracy'))}</td>"
                f"<td>{_fmt(r.get('macro_f1'))}</td><td>{_fmt(r.get('auc_macro_ovr'))}</td></tr>"
            )
        out.append(f"</table></div><p>{m['n_test']} held-out items, same split and seed for each.</p>")
    return "".join(out)


def _metrics(res: Path, base: Path, *, embed: bool) -> str:
    path = res / "metrics.json"
    if not path.is_file():
        return ""
    from .metrics import HEADLINE  # only when there are metrics to show

    m = json.loads(path.read_text(encoding="utf-8"))
    cis = m.get("ci") or {}
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>"
        f"{ci_cell(m, k) if k in cis else html.escape(str(m.get(k)))}</td></tr>"
        for k in ("n", *HEADLINE, "n_auc", "classes_absent", "n_without_tiles")
    )
    boot = m.get("bootstrap")
    if isinstance(boot, Mapping):
        rows += (
            f"<tr><th>intervals</th><td>95 % {html.escape(str(boot.get('method')))}, "
            f"{html.escape(str(boot.get('resamples')))} resamples of {html.escape(str(boot.get('n_units')))} "
            f"{html.escape(str(boot.get('unit')))}s, seed {html.escape(str(boot.get('seed')))}</td></tr>"
        )
    qwk = m.get("quadratic_weighted_kappa")
    if isinstance(qwk, Mapping):  # an ordered bag (grades)
        rows += (
            f"<tr><th>quadratic_weighted_kappa</th><td>{html.escape(str(qwk.get('value')))} "
            f"({html.escape(str(qwk.get('n')))} slides graded)</td></tr>"
        )
    cm = res / "confusion_matrix.png"
    img = ""
    if cm.is_file():
        src = _inline(cm, 480) if embed else _href(cm, base)
        img = f"<img alt='confusion matrix' style='max-width:480px' src='{html.escape(src, quote=True)}'>"
    sites = per_site_table(m.get("per_site"), "Zero-shot per site")
    return f"<h2>Metrics</h2><div class='scroll'><table>{rows}</table></div>{img}{sites}{_topj(m)}"


def _topj(m: Mapping[str, Any]) -> str:
    """The CONCH protocol's metrics at every j, marked as not held out."""
    t = m.get("topj")
    if not isinstance(t, Mapping):
        return ""
    e = html.escape
    head = "<tr><th>j</th><th>balanced accuracy</th><th>kappa</th><th>macro F1</th><th>AUC</th></tr>"
    rows = "".join(
        f"<tr><td>{e(str(j))}{' (the prediction)' if str(j) == str(t.get('configured_j')) else ''}</td>"
        f"<td>{_fmt(r.get('balanced_accuracy'))}</td><td>{_fmt(r.get('kappa'))}</td>"
        f"<td>{_fmt(r.get('macro_f1'))}</td><td>{_fmt(r.get('auc_macro_ovr'))}</td></tr>"
        for j, r in t.get("by_j", {}).items()
    )
    return (
        "<h3>CONCH top-j pooling, every j</h3>"
        f"<div class='scroll'><table id='topj'>{head}{rows}</table></div>"
        f"<p>{e(str(t.get('note', '')))}.</p>"
    )


def _made_from(table: pd.DataFrame, run: Path | None = None, base: Path | None = None) -> str:
    """What the page was made from: the package version and the digest of the slides'
    provenance records (the cohort table's ``provenance`` column), and the run record."""
    from .. import __version__
    from ..provenance import digest

    col = table["provenance"].fillna("").astype(str).tolist() if "provenance" in table else []
    made = f"predictions <code>{digest(col)}</code>" if any(col) else "a cohort table without provenance"
    version = html.escape(__version__)
    link = ""
    if run is not None and run.is_file() and base is not None:
        href = html.escape(_href(run, base), quote=True)
        link = (
            f" Everything that reproduces these figures (versions, weights, every prompt, every "
            f"setting, the slides' fingerprints, the splits): <a href='{href}'>run.json</a>."
        )
    return f"<p class='made-from' id='made-from'>Made by histoalign-wsi {version} from {made}.{link}</p>"


def _script_json(obj: Any) -> str:
    """JSON safe inside ``<script>``: no ``<`` can close the element or open a comment."""
    text = json.dumps(finite_json(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c")


def write_report(
    predictions_csv: str | Path,
    out: str | Path,
    *,
    results: str | Path | None = None,
    embed: bool = False,
    page_size: int = PAGE_SIZE,
    show: Collection[str] | None = None,
) -> Path:
    """Write the HTML report. ``results`` (default: the folder holding
    ``predictions.csv``) holds ``predictions/``, ``heatmaps/`` and the metrics; images are
    linked relative to ``out``'s folder, or inlined with ``embed``. ``show`` names the
    sections beyond the slides that this run made (``metrics``, ``heads``, ``reports``,
    ``distill``): a file an earlier run left is not shown as this run's. ``None`` shows
    every one that exists (the command run by hand)."""

    def shown(section: str) -> bool:
        return show is None or section in show

    res = Path(results) if results else Path(predictions_csv).parent
    base = Path(out).resolve().parent
    res_abs = res.resolve()
    table = pd.read_csv(predictions_csv, dtype={"slide_id": str, "label": str})
    preds = _prediction_files(res / "predictions", table["slide_id"].astype(str).tolist())
    rows: list[list[Any]] = []
    first: Prediction | None = None
    head_names, by_head = head_predictions(res) if shown("heads") else ([], {})
    for row, p in _rows(table, preds, res_abs, base, embed=embed, heads=by_head):
        rows.append(row)
        if first is None and p is not None:
            first = p
    classes: list[str] = list(first.classes) if first else []
    colors = [list(first.colors[c]) for c in classes] if first else []
    untrained = bool(table["untrained"].any()) if "untrained" in table and len(table) else False
    e = html.escape
    legend = "".join(
        f"<span><span class='sw' style='background:rgb({','.join(map(str, col))})'></span>{e(c)}</span>"
        for c, col in zip(classes, colors, strict=True)
    )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>histoalign-wsi report</title><style>{_asset('report.css')}</style></head><body>"
        "<h1>histoalign-wsi report</h1>"
    ]
    if untrained:
        parts.append(
            "<div class='warn' id='untrained-warning'>WARNING: these results were produced with the "
            "untrained demo encoder (random weights). Predictions and heatmaps are meaningless; "
            "configure real encoder weights for real results.</div>"
        )
    bag = first.prompt_bag if first else {}
    parts.append(
        f"<p>{len(table)} slides{failed_summary(table)}; prompt bag <b>{e(str(bag.get('name', '')))}</b> "
        f"(<code>{e(str(bag.get('hash', '')))}</code>); classes: <span class='legend'>{legend}</span></p>"
    )
    parts.append(
        "<h2>Encoders</h2><div class='scroll'><table><tr><th>encoder</th><th>weights sha256</th>"
        "<th>weight</th><th>untrained</th></tr>"
    )
    for en in first.encoders if first else []:
        parts.append(
            f"<tr><td>{e(str(en['name']))}</td><td><code>{e(str(en['weights_sha256']))}</code></td>"
            f"<td>{e(str(en.get('weight')))}</td><td>{e(str(en.get('untrained')))}</td></tr>"
        )
    head = [("", None), ("slide", "slide"), ("label", "label"), ("predicted", "predicted")]
    head += [("probabilities", "probability"), ("status", "status"), ("tiles", "tiles")]
    head += [("regions (mm²)", "regions"), *((f"head: {h}", None) for h in head_names)]
    ths = "".join(f"<th data-key='{k}'>{e(h)}</th>" if k else f"<th>{e(h)}</th>" for h, k in head)
    parts.append(
        "</table></div><h2>Slides</h2>"
        "<div class='pager'><input id='q' type='search' placeholder='filter: slide, label, class, status'>"
        "<button id='prev'>previous</button><button id='next'>next</button><span id='count'></span></div>"
        "<noscript><p>The slide table needs JavaScript; every value is also in "
        "<code>predictions.csv</code>.</p></noscript>"
        f"<div class='scroll'><table id='slides'><thead><tr>{ths}</tr></thead><tbody></tbody></table></div>"
        "<div id='detail' hidden><h3 id='detail-title'></h3><p>predicted: <b id='detail-pred'></b></p>"
        "<div class='figs'><figure><img id='detail-argmax' alt=''><figcaption>Most probable class per "
        f"tile (argmax), over tissue.<div class='legend'>{legend}</div></figcaption></figure>"
        "<figure id='fig-class'><img id='detail-class' alt=''><figcaption>P(<span id='detail-cls'></span>) "
        "per tile, the predicted class: 0 <span class='cbar'></span> 1 (inferno)</figcaption></figure>"
        "<figure id='fig-attention'><img id='detail-attention' alt=''><figcaption>Where the abmil "
        "head looked: its attention per tile (a slide-level head trained on the labels)</figcaption>"
        "</figure></div></div>"
    )
    parts.append(failed_section(table))
    parts.append(_metrics(res, base, embed=embed) if shown("metrics") else "")
    parts.append(heads_section(res) if shown("heads") else "")
    parts.append(site_signature_section(res) if shown("sites") else "")
    parts.append(_learned_from_reports(res, shown))
    parts.append(_made_from(table, res / "run.json", base))
    data = {"classes": classes, "colors": colors, "rows": rows, "page_size": page_size, "heads": head_names}
    parts.append(
        f"<script type='application/json' id='report-data'>{_script_json(data)}</script>"
        f"<script>{_asset('report.js')}</script></body></html>"
    )
    page = "".join(parts)
    size = len(page.encode("utf-8"))
    if embed and size > EMBED_WARN_BYTES:
        log.warning(
            "report.html with embedded images is %.1f MB (%d slides): browsers and mail slow down past "
            "about %d MB; set report.embed: false to link the images instead",
            size / 1e6,
            len(rows),
            EMBED_WARN_BYTES // 1_000_000,
        )
    with atomic_file(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return Path(out)


def _prediction_files(folder: Path, slide_ids: list[str]) -> dict[str, Path]:
    """slide id -> its prediction JSON: ``{id}.json`` as the workflow names it; only when
    some are not found that way are the files' own ids read (a hand-named folder)."""
    out = {s: p for s in slide_ids if (p := folder / f"{s}.json").is_file()}
    if len(out) == len(slide_ids) or not folder.is_dir():
        return out
    for f in sorted(folder.glob("*.json")):
        try:
            sid = json.loads(f.read_text(encoding="utf-8")).get("slide_id")
        except (OSError, ValueError):
            continue
        if isinstance(sid, str) and sid not in out:
            out[sid] = f
    return out
