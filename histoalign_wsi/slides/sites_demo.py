"""A planted multi-site cohort: the same tissue classes at every site, each site with its
own stain (a Beer-Lambert colour shift: every channel's optical density scaled), and a
slide sheet with ``site``, ``patient_id`` and ``label`` columns. Used by
``benchmarks/sites.py`` and the tests to show what the site signature and stain
normalisation measure."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

from .._atomic import atomic_file
from .synthetic import CLASS_CODES, demo_cohort, slide_filename, write_slide

__all__ = ["SITE_STAINS", "make_site_cohort"]

#: site -> per-channel optical-density factors (R, G, B): site A as the textures are;
#: B with a bluer haematoxylin-heavy stain; C with a pinker eosin-heavy stain
SITE_STAINS: dict[str, tuple[float, float, float]] = {
    "A": (1.0, 1.0, 1.0),
    "B": (1.6, 0.9, 0.6),
    "C": (0.65, 1.3, 1.5),
}


def make_site_cohort(
    outdir: str | Path,
    *,
    per_site: int = 6,
    width: int = 3072,
    height: int = 2304,
    seed: int = 0,
    sites: dict[str, tuple[float, float, float]] | None = None,
) -> Path:
    """Write ``per_site`` slides per site into ``outdir`` and return the slide sheet
    (``slides.csv``: slide_id, path, label, site, patient_id; one patient per slide).
    Every site has the same planted layouts (tumour- and stroma-dominant in turn), so
    only the stain tells the sites apart."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    stains = sites or SITE_STAINS
    layouts = demo_cohort(per_site, width=width, height=height, seed=seed, ome_every=0)
    rows = []
    for site, od in stains.items():
        for spec, label in layouts:
            s = replace(spec, name=f"site{site}_{spec.name}", stain_od=od)
            path = write_slide(s, out / slide_filename(s))
            rows.append([s.name, path.name, label, site, f"patient_{site}_{spec.name}"])
    sheet = out / "slides.csv"
    with atomic_file(sheet) as tmp, tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "path", "label", "site", "patient_id"])
        w.writerows(rows)
    assert {r[2] for r in rows} <= set(CLASS_CODES.values())
    return sheet
