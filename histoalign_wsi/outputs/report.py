"""The cohort report: one self-contained HTML page (images inlined), with a sortable
table of slides, heatmaps, metrics, encoders and a warning for untrained results."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from .._atomic import atomic_file
from ..zeroshot.prediction import Prediction, load_predictions
from .heatmaps import class_files

__all__ = ["write_report"]

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1,h2,h3{margin:.6em 0 .3em}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#eee;cursor:pointer;white-space:nowrap}
.warn{background:#fde2e1;border:2px solid #c0392b;padding:12px;font-weight:bold;margin:12px 0}
.probs{min-width:180px}.bar{display:flex;align-items:center;gap:4px;font-size:12px;line-height:14px}
.bar span.fill{display:inline-block;height:10px;border-radius:2px}
.bar span.lab{white-space:nowrap;overflow:hidden;text-overflow:ellipsis;max-width:140px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;width:calc(50% - 30px);
min-width:300px;box-sizing:border-box}
.card .figs{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;flex:1 1 260px;min-width:0}figure img{width:100%;height:auto;border:1px solid #999}
figcaption{font-size:13px;color:#333;margin-top:2px}
.legend{font-size:13px;margin:4px 0}.legend span{display:inline-block;margin-right:10px;white-space:nowrap}
.sw{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle;border:1px solid #555}
.cbar{display:inline-block;width:140px;height:10px;vertical-align:middle;margin:0 4px;
background:linear-gradient(to right,#000004,#420a68,#932667,#dd513a,#fca50a,#fcffa4)}
code{font-size:90%;word-break:break-all}
"""

_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, i){
  th.addEventListener('click', function(){
    var tb = th.closest('table').tBodies[0], rows = Array.from(tb.rows);
    var asc = th.dataset.asc !== 'true'; th.dataset.asc = asc;
    rows.sort(function(a, b){
      var x = a.cells[i].dataset.v || a.cells[i].textContent;
      var y = b.cells[i].dataset.v || b.cells[i].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function(r){ tb.appendChild(r); });
  });
});
"""


def _img(path: Path, width: int = 640) -> str:
    if not path.is_file():
        return "<em>missing</em>"
    im = Image.open(path).convert("RGB")
    if im.width > width:
        im = im.resize((width, max(1, round(im.height * width / im.width))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    alt = html.escape(path.stem)
    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _cell(value: Any) -> str:
    """A table cell; missing values (an unlabelled slide) are empty, not ``nan``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "<td data-v=''></td>"
    shown = f"{value:.3f}" if isinstance(value, float) else str(value)
    return f"<td data-v='{html.escape(str(value), quote=True)}'>{html.escape(shown)}</td>"


def _prob_bars(p: Prediction | None, colors: dict[str, Any]) -> str:
    """All class probabilities folded into one compact cell of bars, largest first."""
    if p is None or not p.probabilities:
        return "<td class='probs' data-v='-1'></td>"
    items = sorted(p.probabilities.items(), key=lambda kv: -kv[1])
    bars = "".join(
        f"<div class='bar'><span class='fill' style='width:{max(1, round(80 * v))}px;"
        f"background:rgb{tuple(colors[c])}'></span><span class='lab'>{html.escape(c)} {v:.2f}</span></div>"
        for c, v in items
    )
    return f"<td class='probs' data-v='{items[0][1]:.4f}'>{bars}</td>"


def _areas(p: Prediction | None) -> str:
    areas = (p.extra.get("region_area_mm2") if p else None) or {}
    if not areas:
        return "<td data-v='0'></td>"
    shown = "<br>".join(f"{html.escape(c)} {a:.2f}" for c, a in sorted(areas.items(), key=lambda kv: -kv[1]))
    return f"<td data-v='{sum(areas.values()):.4f}'>{shown}</td>"


def _slides_table(table: pd.DataFrame, by_id: dict[str, Prediction], colors: dict[str, Any]) -> str:
    head = ["slide", "label", "predicted", "probabilities", "status", "tiles", "regions (mm²)"]
    rows = []
    for _, r in table.iterrows():
        p = by_id.get(str(r["slide_id"]))
        rows.append(
            "<tr>"
            + _cell(r["slide_id"])
            + _cell(r.get("label"))
            + _cell(r["predicted_class"])
            + _prob_bars(p, colors)
            + _cell(r["status"])
            + _cell(r.get("n_tiles"))
            + _areas(p)
            + "</tr>"
        )
    return (
        "<div class='scroll'><table class='sortable' id='slides'><thead><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div>"
    )


def _heatmap_card(
    sid: str, p: Prediction | None, hm: Path, classes: list[str], colors: dict[str, Any]
) -> str:
    e = html.escape
    pc = p.predicted_class if p else ""
    legend = "".join(
        f"<span><span class='sw' style='background:rgb{tuple(colors[c])}'></span>{e(c)}</span>"
        for c in classes
    )
    figs = (
        f"<figure>{_img(hm / 'argmax.png')}<figcaption>Most probable class per tile (argmax), over "
        f"tissue.<div class='legend'>{legend}</div></figcaption></figure>"
    )
    if pc in classes:
        figs += (
            f"<figure>{_img(hm / class_files(classes)[pc])}<figcaption>P({e(pc)}) per tile, the predicted "
            f"class: 0 <span class='cbar'></span> 1 (inferno)</figcaption></figure>"
        )
    return (
        f"<div class='card'><h3>{e(sid)}</h3><p>predicted: <b>{e(str(pc))}</b></p>"
        f"<div class='figs'>{figs}</div></div>"
    )


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v if v is not None else "–"))


def _learned_from_reports(res: Path) -> str:
    """Short tables of ``reports/metrics.json`` (slide-report models: held-out retrieval
    beside chance, zero-shot diagnosis, linear probe) and ``distill/metrics.json``
    (distilled classifier against no pairing), when those runs exist."""
    out = []
    rp = res / "reports" / "metrics.json"
    if rp.is_file():
        m = json.loads(rp.read_text(encoding="utf-8"))
        out.append(
            "<h2>Learned from reports</h2><div class='scroll'><table id='report-models'><tr><th>model</th>"
            "<th>slide→report R@1 / R@5 / R@10</th><th>report→slide R@1</th><th>chance R@1 / R@5</th>"
            "<th>zero-shot AUC</th><th>zero-shot bal. acc.</th><th>probe bal. acc.</th></tr>"
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
    if dp.is_file():
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


def write_report(predictions_csv: str | Path, out: str | Path, *, results: str | Path | None = None) -> Path:
    """Write the HTML report; ``results`` defaults to the folder holding ``predictions.csv``."""
    res = Path(results) if results else Path(predictions_csv).parent
    table = pd.read_csv(predictions_csv)
    preds = (
        load_predictions(sorted((res / "predictions").glob("*.json")))
        if (res / "predictions").is_dir()
        else []
    )
    by_id = {p.slide_id: p for p in preds}
    classes: list[str] = list(preds[0].classes) if preds else []
    colors: dict[str, Any] = dict(preds[0].colors) if preds else {}
    untrained = bool(table["untrained"].any()) if "untrained" in table and len(table) else False
    e = html.escape
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>histoalign-wsi report</title>"
        f"<style>{_CSS}</style></head><body><h1>histoalign-wsi report</h1>"
    ]
    if untrained:
        parts.append(
            "<div class='warn' id='untrained-warning'>WARNING: these results were produced with the "
            "untrained demo encoder (random weights). Predictions and heatmaps are meaningless; "
            "configure real encoder weights for real results.</div>"
        )
    bag = preds[0].prompt_bag if preds else {}
    parts.append(
        f"<p>{len(table)} slides; prompt bag <b>{e(str(bag.get('name', '')))}</b> "
        f"(<code>{e(str(bag.get('hash', '')))}</code>); classes: "
        + " ".join(
            f"<span class='sw' style='background:rgb{tuple(colors[c])}'></span>{e(c)}" for c in classes
        )
        + "</p>"
    )
    encs = preds[0].encoders if preds else []
    parts.append(
        "<h2>Encoders</h2><div class='scroll'><table><tr><th>encoder</th><th>weights sha256</th>"
        "<th>weight</th><th>untrained</th></tr>"
    )
    for en in encs:
        parts.append(
            f"<tr><td>{e(en['name'])}</td><td><code>{e(en['weights_sha256'])}</code></td>"
            f"<td>{en['weight']}</td><td>{en['untrained']}</td></tr>"
        )
    parts.append("</table></div><h2>Slides</h2>" + _slides_table(table, by_id, colors))
    metrics_path = res / "metrics.json"
    if metrics_path.is_file():
        m = json.loads(metrics_path.read_text())
        parts.append("<h2>Metrics</h2><div class='scroll'><table>")
        keys = (
            "n",
            "accuracy",
            "balanced_accuracy",
            "macro_f1",
            "weighted_f1",
            "auc_macro_ovr",
            "auc_macro_ovo",
        )
        for key in (*keys, "classes_absent", "n_without_tiles"):
            parts.append(f"<tr><th>{e(key)}</th><td>{e(str(m.get(key)))}</td></tr>")
        parts.append("</table></div>" + _img(res / "confusion_matrix.png", 480))
    parts.append(_learned_from_reports(res))
    parts.append("<h2>Heatmaps</h2><div class='cards'>")
    for sid in table["slide_id"].astype(str) if len(table) else []:
        parts.append(_heatmap_card(sid, by_id.get(sid), res / "heatmaps" / sid, classes, colors))
    parts.append(f"</div><script>{_JS}</script></body></html>")
    with atomic_file(out) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return Path(out)
