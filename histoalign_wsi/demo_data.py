"""Sample data for every README command, generated (nothing large is shipped):

- ``cohort/``: labelled generated slides (alternately tumour- and stroma-dominant), with
  their ground truth in ``cohort_truth/``;
- ``labels.csv``: ``slide_id,label,patient_id`` of the cohort;
- ``reports.csv``: one pathology report per slide (``slide_id,report,patient_id``), in
  words that name what the slide shows, some in German;
- ``corpus/``: an unpaired report corpus (one ``.txt`` per report), none of them the
  cohort's own;
- ``patches/{TUM,STR,LYM}/``: image patches cut from the classes' textures, with
  patient-style file names (``P07_003.png``) for grouped few-shot draws.

Every file is written only when its bytes change, so running the command again leaves
the folder as it was and a workflow over it has nothing to do.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

from ._atomic import atomic_file
from .slides.synthetic import CLASS_CODES, class_textures, make_demo_cohort

__all__ = ["make_demo_data"]

_FINDINGS = {
    "TUM": [
        "Invasive adenocarcinoma of the colon, moderately differentiated, with irregular glands "
        "of atypical epithelium and dirty necrosis.",
        "Adenocarcinoma infiltrating the muscularis propria; tumour cells with enlarged pleomorphic "
        "nuclei form cribriform glands.",
        "Befund: mäßig differenziertes Adenokarzinom des Kolons mit atypischen Drüsen und Nekrosen.",
    ],
    "STR": [
        "Dense fibrous stroma with bundles of collagen and scattered spindle-shaped fibroblasts; "
        "no malignant epithelium is seen.",
        "Desmoplastic stromal tissue, collagen-rich, with few cells; the sample holds no tumour glands.",
        "Befund: kollagenreiches Bindegewebe mit spindeligen Fibroblasten, kein Anhalt für Malignität.",
    ],
}
_EXTRA = [
    "A small lymphoid aggregate is present at the edge.",
    "Margins cannot be assessed on this sample.",
    "Ein kleines Lymphozyteninfiltrat am Rand.",
]
_PATCH_CLASSES = (1, 2, 3)  # TUM, STR, LYM


def _write_if_changed(path: Path, data: bytes) -> None:
    with atomic_file(path, keep_identical=True) as tmp:
        tmp.write_bytes(data)


def _csv(rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode("utf-8")


def _report(label: str, i: int) -> str:
    options = _FINDINGS[label]
    return f"{options[i % len(options)]} {_EXTRA[(i // 2) % len(_EXTRA)]}"


def _patches(root: Path, per_class: int, size: int, seed: int) -> None:
    """``per_class`` patches per class, each a random crop of the class texture with its
    own brightness and noise, from 6 'patients' per class (the file name prefix)."""
    rng = np.random.default_rng(seed)
    textures = class_textures(seed)
    for c in _PATCH_CLASSES:
        big = np.tile(textures[c], (3, 3, 1)).astype(np.float32)
        for j in range(per_class):
            y, x = rng.integers(0, big.shape[0] - size, 2)
            img = big[y : y + size, x : x + size] * rng.uniform(0.9, 1.05) + rng.normal(0, 6, (size, size, 3))
            buf = io.BytesIO()
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
            name = f"P{c}{j % 6:02d}_{j:03d}.png"
            _write_if_changed(root / CLASS_CODES[c] / name, buf.getvalue())


def make_demo_data(
    out: str | Path,
    *,
    n_slides: int = 10,
    width: int = 3072,
    height: int = 2304,
    patches_per_class: int = 24,
    patch_px: int = 128,
    corpus_size: int = 30,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the sample data under ``out``; returns what is where."""
    out = Path(out)
    slides = make_demo_cohort(out / "cohort", n=n_slides, width=width, height=height, seed=seed, ome_every=0)
    ids = [p.name.removesuffix(".svs") for p in slides]
    labels = [CLASS_CODES[1] if i % 2 == 0 else CLASS_CODES[2] for i in range(len(ids))]
    patients = [f"patient_{i + 1:02d}" for i in range(len(ids))]
    _write_if_changed(
        out / "labels.csv",
        _csv([["slide_id", "label", "patient_id"], *map(list, zip(ids, labels, patients, strict=True))]),
    )
    reports = [_report(lab, i) for i, lab in enumerate(labels)]
    _write_if_changed(
        out / "reports.csv",
        _csv([["slide_id", "report", "patient_id"], *map(list, zip(ids, reports, patients, strict=True))]),
    )
    for k in range(corpus_size):  # unpaired: other cases' words, never a cohort report
        label = ("TUM", "STR")[k % 2]
        text = f"Case {1000 + k}. {_report(label, k + 1)} Specimen {k % 4 + 1} of {k % 4 + 2}."
        _write_if_changed(out / "corpus" / f"case_{1000 + k}.txt", text.encode("utf-8"))
    _patches(out / "patches", patches_per_class, patch_px, seed)
    return {
        "cohort": out / "cohort",
        "labels": out / "labels.csv",
        "reports": out / "reports.csv",
        "corpus": out / "corpus",
        "patches": out / "patches",
    }
