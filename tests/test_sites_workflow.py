"""Many sites through the real workflow: a planted three-site cohort (same tissue, each
site its own stain) with a slide sheet holding site, patient and label columns, run by
Snakemake with stain normalisation, per-site calibration, a site-held-out head, and
the site signature; every output says which sites and split it used."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from histoalign_wsi.features.store import open_store
from histoalign_wsi.slides.sites_demo import make_site_cohort

from .test_workflow import smk, write_config

pytestmark = pytest.mark.slow

CONFIG: dict[str, object] = {
    "slides": "slides/slides.csv",
    "labels": None,
    "prompt_bag": "crc",
    "scales_mpp": [0.5, 1.0],
    "stain": {"method": "macenko"},
    "calibration": True,
    "calibration_groups": "site",
    "heads": ["linear"],
    "fit": {"folds": 3, "epochs": 2, "cv": "site"},
    "bootstrap": {"resamples": 200, "seed": 3},
}


def test_a_three_site_cohort_runs_with_site_outputs_everywhere(tmp_path: Path) -> None:
    sheet = make_site_cohort(tmp_path / "slides", per_site=2, width=2048, height=1536)
    write_config(tmp_path, **CONFIG)
    smk(tmp_path, "--cores", "2")
    r = tmp_path / "results"
    table = pd.read_csv(r / "predictions.csv")
    assert sorted(set(table["site"])) == ["A", "B", "C"]
    m = json.loads((r / "metrics.json").read_text())
    assert sorted(m["per_site"]["sites"]) == ["A", "B", "C"] and "site" in m["per_site"]["by"]
    assert m["bootstrap"]["unit"] == "patient" and m["bootstrap"]["resamples"] == 200
    cal = json.loads((r / "calibration.json").read_text())
    assert cal["groups"] == "site" and sorted(cal["by_site"]) == ["A", "B", "C"]
    assert len(cal["site_of"]) == len(table)
    sig = json.loads((r / "site_signature.json").read_text())
    assert sig["n_sites"] == 3 and set(sig["encoders"]) == {"demo"} and sig["untrained"]
    cv = json.loads((r / "models" / "cv_metrics.json").read_text())
    assert cv["split"]["cv"] == "site" and cv["split"]["held_out_sites"] == ["A", "B", "C"]
    assert sorted(cv["pooled"]["linear"]["per_site"]) == ["A", "B", "C"]
    st = open_store(r / "features" / f"{table['slide_id'][0]}.zarr")
    assert st.attrs["stain"]["method"] == "macenko"
    html = (r / "report.html").read_text(encoding="utf-8")
    for needle in (
        "Zero-shot per site",
        "Site signature",
        "linear per site (out-of-fold)",
        "leave-one-site-out",
    ):
        assert needle in html, needle
    # the stain setting re-encodes, and nothing upstream of encoding
    write_config(tmp_path, **(CONFIG | {"stain": {"method": "none"}}))
    out = smk(tmp_path, "--cores", "2", "-n").stdout
    assert "rule encode" in out and "rule prepare" not in out
    assert sheet.is_file()
