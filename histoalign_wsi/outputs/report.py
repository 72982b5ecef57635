"""The cohort report: one self-contained HTML page (images inlined), with a sortable
table of slides, heatmaps, metrics, encoders and a warning for untrained results."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from .._atomic import atomic_file
from ..zeroshot.prediction import load_predictions
from .heatmaps import safe_filename

__all__ = ["write_report"]

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:12px 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#eee;cursor:pointer}.warn{background:#fde2e1;border:2px solid #c0392b;padding:12px;
font-weight:bold;margin:12px 0}.slide{display:inline-block;margin:8px;vertical-align:top;width:400px}
.slide img{max-width:390px;border:1px solid #999}
.sw{display:inline-block;width:12px;height:12px;margin-right:4px}
code{font-size:90%}
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


def _img(path: Path, width: int = 390) -> str:
    if not path.is_file():
        return "<em>missing</em>"
    im = Image.open(path).convert("RGB")
    if im.width > width:
        im = im.resize((width, max(1, round(im.height * width / im.width))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    alt = html.escape(path.stem)
    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


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
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>histoalign-wsi report</title>"
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
        "<h2>Encoders</h2><table><tr><th>encoder</th><th>weights sha256</th>"
        "<th>weight</th><th>untrained</th></tr>"
    )
    for en in encs:
        parts.append(
            f"<tr><td>{e(en['name'])}</td><td><code>{e(en['weights_sha256'])}</code></td>"
            f"<td>{en['weight']}</td><td>{en['untrained']}</td></tr>"
        )
    parts.append("</table><h2>Slides</h2><table class='sortable' id='slides'><thead><tr>")
    cols = [c for c in table.columns]
    parts.append("".join(f"<th>{e(str(c))}</th>" for c in cols) + "</tr></thead><tbody>")
    for _, row in table.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            shown = f"{v:.3f}" if isinstance(v, float) else str(v)
            cells.append(f"<td data-v='{e(str(v), quote=True)}'>{e(shown)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    metrics_path = res / "metrics.json"
    if metrics_path.is_file():
        m = json.loads(metrics_path.read_text())
        parts.append("<h2>Metrics</h2><table>")
        for key in ("n", "accuracy", "balanced_accuracy", "macro_f1", "auc_macro_ovr"):
            parts.append(f"<tr><th>{e(key)}</th><td>{e(str(m.get(key)))}</td></tr>")
        parts.append("</table>" + _img(res / "confusion_matrix.png", 480))
    parts.append("<h2>Heatmaps</h2>")
    for sid in table["slide_id"] if len(table) else []:
        p = by_id.get(sid)
        hm = res / "heatmaps" / str(sid)
        pc = p.predicted_class if p else ""
        parts.append(
            f"<div class='slide'><h3>{e(str(sid))}</h3><p>predicted: <b>{e(str(pc))}</b></p>"
            f"{_img(hm / 'argmax.png')}"
            f"{_img(hm / (safe_filename(pc) + '.png')) if pc in classes else ''}</div>"
        )
    parts.append(f"<script>{_JS}</script></body></html>")
    with atomic_file(out) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return Path(out)
