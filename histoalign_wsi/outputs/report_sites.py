"""What the report shows of sites and intervals: a metric with its 95 % interval, the
per-site table (zero-shot or a head), and the site signature (can a probe tell the
hospital from the features?)."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .intervals import format_ci

__all__ = ["ci_cell", "per_site_table", "site_signature_section"]

_SITE_METRICS = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("macro_f1", "macro F1"),
    ("auc_macro_ovr", "AUC"),
)


def ci_cell(m: Mapping[str, Any], key: str) -> str:
    """``value [low, high]`` of metric ``key`` of a metrics mapping with a ``ci`` member."""
    v = m.get(key)
    ci = (m.get("ci") or {}).get(key)
    return html.escape(format_ci(v, ci) if isinstance(v, (int, float)) or v is None else str(v))


def per_site_table(per_site: Mapping[str, Any] | None, title: str) -> str:
    """One row per site: slides, the metrics with intervals, and why a cell is empty."""
    if not isinstance(per_site, Mapping):
        return ""
    sites = per_site.get("sites", per_site)
    e = html.escape
    ths = "".join(f"<th>{e(label)}</th>" for _, label in _SITE_METRICS)
    rows = []
    for site, r in sites.items():
        tds = "".join(f"<td>{ci_cell(r, k) if k in r else '–'}</td>" for k, _ in _SITE_METRICS)
        note = f"<td>{e(str(r.get('note', '')))}</td>"
        rows.append(f"<tr><td>{e(str(site))}</td><td>{int(r.get('n', 0))}</td>{tds}{note}</tr>")
    by = f" Sites from {e(str(per_site['by']))}." if "by" in per_site else ""
    return (
        f"<h3>{e(title)}</h3><div class='scroll'><table class='per-site'><tr><th>site</th><th>slides</th>"
        f"{ths}<th>note</th></tr>{''.join(rows)}</table></div>"
        f"<p>95 % bootstrap intervals in brackets.{by}</p>"
    )


def site_signature_section(res: Path) -> str:
    """The site-signature probe of ``site_signature.json`` (empty without it)."""
    path = res / "site_signature.json"
    if not path.is_file():
        return ""
    s = json.loads(path.read_text(encoding="utf-8"))
    e = html.escape
    if s.get("skipped"):
        return f"<h2>Site signature</h2><p>Not measured: {e(str(s['skipped']))}.</p>"
    rows = []
    for name, r in s.get("encoders", {}).items():
        rows.append(
            f"<tr><td>{e(name)}</td><td>{ci_cell(r, 'balanced_accuracy')}</td>"
            f"<td>{_num(r.get('chance'))}</td><td>{_num(r.get('permuted'))}</td></tr>"
        )
    return (
        "<h2>Site signature</h2><div class='scroll'><table id='site-signature'><tr><th>encoder</th>"
        "<th>site predicted from features: balanced accuracy</th><th>chance</th>"
        f"<th>labels permuted (control)</th></tr>{''.join(rows)}</table></div>"
        f"<p>A linear probe predicts each slide's site ({int(s.get('n_slides', 0))} slides, "
        f"{int(s.get('n_sites', 0))} sites) from its per-scale mean features, cross-validated by "
        f"{e(str(s.get('split', {}).get('by', 'patient')))}. A value well above chance means the "
        "features carry the hospital: labels confounded with site will look learnable, and a "
        "head may learn the site instead of the disease (Howard et al., Nat Commun 2021).</p>"
    )


def _num(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "–"
