"""Bad input, round two (#24): class names that would lose a class, label sheets that
would silently pick a label, text in other encodings, reports of any length; each
refused (or accepted) before any job runs, in one line naming the file and the row."""

from __future__ import annotations

from pathlib import Path

import pytest

from histoalign_wsi.errors import ConfigError, PromptBagError
from histoalign_wsi.learn.reports import read_corpus, read_reports
from histoalign_wsi.slides.cohort import read_labels, slide_id_for
from histoalign_wsi.workflow import load_workflow
from histoalign_wsi.zeroshot.names import MAX_NAME, safe_names
from histoalign_wsi.zeroshot.prompts import load_bag

BAG = "templates: ['an image of {{}}.']\nclasses:\n{}"


def _bag(tmp_path: Path, classes: str) -> Path:
    p = tmp_path / "bag.yaml"
    p.write_text(BAG.format(classes), encoding="utf-8")
    return p


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ("  1: {names: [one]}\n  '1': {names: [one again]}\n", r"class name 1 is a int, not text; quote it"),
        (
            "  TUM: {names: [tumour]}\n  STR: {names: [stroma]}\n  TUM: {names: [x]}\n",
            "key 'TUM' is written twice",
        ),
        ("  ~: {names: [none]}\n  STR: {names: [stroma]}\n", "class name None is a NoneType, not text"),
        ("  '': {names: [empty]}\n  STR: {names: [stroma]}\n", r"a class name is empty \(''\)"),
        ("  '  ': {names: [blank]}\n  STR: {names: [stroma]}\n", "a class name is empty"),
        (
            "  'Tumor cells': {names: [a]}\n  tumor_cells!: {names: [b]}\n",
            "class names 'Tumor cells' and 'tumor_cells!' differ only in case or punctuation",
        ),
    ],
)
def test_class_names_that_would_lose_a_class_are_refused(tmp_path: Path, classes: str, message: str) -> None:
    with pytest.raises(PromptBagError, match=message) as e:
        load_bag(_bag(tmp_path, classes))
    assert "\n" not in str(e.value) and "bag" in str(e.value)


def test_long_class_names_get_short_distinct_file_names() -> None:
    a, b = "carcinoma " * 30 + "A", "carcinoma " * 30 + "B"
    names = safe_names([a, b, "TUM"])
    assert all(len(n) <= MAX_NAME for n in names) and len(set(names)) == 3
    assert names[2] == "TUM" and names[0].startswith("carcinoma_carcinoma")
    assert safe_names([a]) == names[:1]  # derived from the name alone: stable across runs


def test_long_slide_names_give_ids_that_fit_a_file_name() -> None:
    a, b = slide_id_for("x" * 300 + "1.svs"), slide_id_for("x" * 300 + "2.svs")
    assert a != b and len(f"{a}_argmax_thumb.webp".encode()) < 255
    assert slide_id_for("short name.svs") == "short_name"


def _cohort(tmp_path: Path, sheet: str, *, encoding: str = "utf-8", bom: bool = False) -> dict[str, object]:
    slides = tmp_path / "slides"
    slides.mkdir()
    for n in ("a", "b", "c"):
        (slides / f"{n}.svs").write_bytes(b"")
    data = sheet.encode(encoding)
    (tmp_path / "labels.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    bag = _bag(tmp_path, "  TUM: {names: [tumour]}\n  STR: {names: [stroma]}\n")
    return {"slides": str(slides), "labels": str(tmp_path / "labels.csv"), "prompt_bag": str(bag)}


@pytest.mark.parametrize(
    ("sheet", "message"),
    [
        (
            "slide_id,label\na,TUM\nb,STR\na,STR\n",
            r"slide 'a' has two labels, 'TUM' \(line 2\) and 'STR' \(line 4\)",
        ),
        ("slide_id,label\na,TUM\nb,\nc,STR\n", r"line 3: slide 'b' has an empty label"),
        ("slide_id,label\na,TUM\n,STR\n", "line 3: empty slide_id"),
    ],
)
def test_label_sheets_that_would_pick_a_label_are_refused_before_any_job(
    tmp_path: Path, sheet: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=f"configuration check failed: label sheet .*{message}"):
        load_workflow(_cohort(tmp_path, sheet))


def test_the_same_label_twice_and_an_excel_bom_are_fine(tmp_path: Path) -> None:
    wf = load_workflow(_cohort(tmp_path, "slide_id,label\na,TUM\nb,STR\na,TUM\n", bom=True))
    assert read_labels(wf.config.labels) == {"a": "TUM", "b": "STR"}  # type: ignore[arg-type]


@pytest.mark.parametrize(("encoding", "name"), [("latin-1", "not UTF-8 text"), ("utf-16", "UTF-16 text")])
def test_sheets_and_bags_in_other_encodings_are_refused(tmp_path: Path, encoding: str, name: str) -> None:
    with pytest.raises(ConfigError, match=f"label sheet .*labels.csv' is {name}.*save it as UTF-8"):
        load_workflow(_cohort(tmp_path, "slide_id,label\na,TUM\nb,STR\nc,STRÖ\n", encoding=encoding))
    bag = tmp_path / "bag2.yaml"
    bag.write_bytes("classes:\n  TUMÖR: {names: [a]}\n  STR: {names: [b]}\n".encode(encoding))
    with pytest.raises(PromptBagError, match=f"prompt bag file .*bag2.yaml' is {name}"):
        load_bag(bag)


def test_a_configuration_with_a_key_twice_is_refused(tmp_path: Path) -> None:
    from histoalign_wsi.config import load_config

    p = tmp_path / "config.yaml"
    p.write_text("slides: a\nresults: r\nslides: b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"key 'slides' is written twice \(first on line 1\)"):
        load_config(p)


def test_a_five_megabyte_report_is_read_from_a_sheet_and_a_corpus(tmp_path: Path) -> None:
    long = "Invasive carcinoma, " * 260_000  # 5.2 MB in one cell
    for name in ("reports.csv", "corpus.csv"):
        (tmp_path / name).write_text(f'slide_id,report\na,"{long}"\nb,short\n', encoding="utf-8")
    sheet = read_reports(tmp_path / "reports.csv")
    assert len(sheet.reports["a"]) == len(long.strip()) > 5_000_000
    assert max(len(t) for t in read_corpus(tmp_path / "corpus.csv").texts) == len(long.strip())
