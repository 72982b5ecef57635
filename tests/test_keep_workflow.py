"""protocol: keep through the real workflow: the screening step runs before scoring, the
slides are decided by the tile vote with the bag's other-tissue class left out of the
slide decision, and run.json records what reproduces every figure (linked by the report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from histoalign_wsi.slides.synthetic import make_demo_cohort

from .test_workflow import smk, write_config

pytestmark = pytest.mark.slow

BAG = """
templates: default
classes:
  TUM: {names: [tumour epithelium, carcinoma cells], color: [200, 0, 0]}
  STR: {names: [fibrous stroma, desmoplastic stroma], color: [0, 160, 0]}
  BACK: {names: [background, glass slide], color: [120, 120, 120], other: true}
"""


def test_keep_protocol_run_and_its_run_record(tmp_path: Path) -> None:
    make_demo_cohort(tmp_path / "slides", n=2, width=3072, height=2304, ome_every=0)
    (tmp_path / "bag.yaml").write_text(BAG)
    write_config(
        tmp_path,
        prompt_bag="bag.yaml",
        protocol="keep",
        scales_mpp=[0.5, 1.0],
        keep={"top_n": 2, "max_sets": 8},
        bootstrap={"resamples": 100},
    )
    smk(tmp_path, "--cores", "2")
    r = tmp_path / "results"
    scr = json.loads((r / "prompt_screening.json").read_text())
    assert len(scr["sets"]) == 8 and len(scr["selected"]) == 2 and scr["n_slides"] == 2
    pred = json.loads((r / "predictions" / "demo_01.json").read_text())
    assert pred["classes"] == ["TUM", "STR"] and pred["pooling"]["method"] == "vote"
    assert pred["alignment"] == {"protocol": "keep", "prompt_sets": 2, "screened": True}
    assert set(pred["colors"]) == {"TUM", "STR", "BACK"} and pred["extra"]["other_classes"] == ["BACK"]
    run = json.loads((r / "run.json").read_text())
    assert run["prompt_bag"]["protocol"] == "keep" and run["prompt_bag"]["other_classes"] == ["BACK"]
    assert [p["text"] for p in run["prompt_bag"]["prompts"]][:2] == ["tumour epithelium.", "carcinoma cells."]
    assert [s["slide_id"] for s in run["slides"]] == ["demo_01", "demo_02"]
    assert all(s["fingerprint"].split("-")[0].isdigit() for s in run["slides"])
    assert run["encoders"]["demo"]["weights_from"].startswith("built in") and run["packages"]["torch"]
    assert run["scoring"]["keep"]["top_n"] == 2 and run["metrics"]["ci"]["balanced_accuracy"] is not None
    html = (r / "report.html").read_text(encoding="utf-8")
    assert "href='run.json'" in html
