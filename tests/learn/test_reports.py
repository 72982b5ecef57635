"""Learning from pathology reports, on planted feature stores and the demo encoder's own
(untrained, frozen) text tower: slide-report retrieval against a shuffled-pairs control,
scale embeddings against their ablation, report pairing, distillation against no
pairing, the CLI chain, and bad report sheets and corpora."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histoalign_wsi.cli import main
from histoalign_wsi.config import load_config
from histoalign_wsi.errors import ConfigError
from histoalign_wsi.features.adapters import LoadedEncoder, load_encoder
from histoalign_wsi.features.registry import load_registry
from histoalign_wsi.learn.bags import BagSource
from histoalign_wsi.learn.contrastive import ContrastiveSettings, embed_slides, train_contrastive
from histoalign_wsi.learn.distill import DistillSettings, distill
from histoalign_wsi.learn.evaluation import recall_at_k, retrieval
from histoalign_wsi.learn.pairing import Pairs, fuse_paired_text, pair_topk
from histoalign_wsi.learn.report_text import embed_texts
from histoalign_wsi.learn.reports import match_reports, read_corpus, read_reports, split_slides
from histoalign_wsi.stages import run_train_reports

from ..planting import build_store, unit

FINDINGS = [
    "invasive ductal carcinoma",
    "lobular carcinoma in situ",
    "tubular adenoma of the colon",
    "squamous cell carcinoma",
    "clear cell renal cell carcinoma",
    "chronic active gastritis",
    "benign reactive lymph node",
    "malignant melanoma",
]
#: the finding named twice in varied wording, as a diagnosis line and a comment would
WORDINGS = [
    "Diagnosis: {0}. Comment: {0}.",
    "Sections show {0}; in summary {0}.",
    "Final diagnosis - {0}; margins clear. {0}.",
    "Microscopy: {0} in all fragments. Diagnosis {0}.",
    "The biopsy demonstrates {0}. Impression: {0}.",
    "Consistent with {0}. Clinical correlation advised. Final: {0}.",
    "Specimen A: {0}. Specimen B: {0}.",
    "Histology shows {0} — reviewed at consensus; {0}.",
    "Findings are those of {0}. Conclusion: {0}.",
    "{0}. See comment: {0}.",
]
N, D = len(FINDINGS), 64
SIG = unit(np.random.default_rng(7).normal(size=(N, D)))


@pytest.fixture(scope="module")
def demo() -> LoadedEncoder:
    return load_encoder(load_registry()["demo"])


def _report(i: int, k: int) -> str:
    return WORDINGS[(i * 7 + k) % len(WORDINGS)].format(FINDINGS[k])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory, demo: LoadedEncoder) -> tuple[list[Path], Path]:
    """80 slides: each carries finding k's signature in a third of its 0.5 µm/px tiles
    (the 1.0 µm/px tiles are noise), and its report names finding k in one of ten
    wordings. The sheet fixes the split: 8 training slides per finding, one each for
    validation and test (so held-out chance is 1/8)."""
    d = tmp_path_factory.mktemp("reports")
    rows, paths = [], []
    i = 0
    for split, per in (("train", 8), ("val", 1), ("test", 1)):
        for _ in range(per):
            for k in range(N):
                r = np.random.default_rng(100 + i)
                fine = r.normal(size=(32, D)) / np.sqrt(D)
                fine[:12] += SIG[k]
                coarse = r.normal(size=(8, D)) / np.sqrt(D)
                sid = f"Fall {i:03d} — Biopsie ü"  # free text: spaces, dashes, non-ASCII
                feats = {0.5: unit(fine), 1.0: unit(coarse)}
                paths.append(build_store(d / f"s{i:03d}.zarr", feats, slide_id=sid, sha=demo.weights_sha256))
                label = "TUM" if k % 2 else "STR"
                rows.append({"slide_id": sid, "report": _report(i, k), "split": split, "label": label})
                i += 1
    pd.DataFrame(rows).to_csv(d / "reports.csv", index=False)
    return paths, d / "reports.csv"


def _cfg(**over: object) -> object:
    return load_config(overrides={"train_reports": {"batch_size": 16, "patience": 20, **over}})


@pytest.mark.slow  # trains four slide-report models (about 20 s)
def test_held_out_retrieval_is_learned_and_shuffled_pairs_stay_at_chance(
    cohort: tuple[list[Path], Path], tmp_path: Path
) -> None:
    paths, sheet = cohort
    cfg = _cfg(epochs=100)
    real = run_train_reports(paths, sheet, tmp_path / "real", cfg)  # type: ignore[arg-type]
    ctrl = run_train_reports(paths, sheet, tmp_path / "ctrl", cfg, shuffle_pairs=True)  # type: ignore[arg-type]
    for name in ("scale_aware", "no_scale"):
        r = real["models"][name]["retrieval"]
        assert r["n"] == N and r["chance"]["R@1"] == pytest.approx(1 / N)
        assert r["slide_to_report"]["R@1"] >= 0.8, (name, r)
        assert r["report_to_slide"]["R@1"] >= 0.75, (name, r)
        c = ctrl["models"][name]["retrieval"]
        assert c["slide_to_report"]["R@1"] <= 3 / N, (name, c)
        assert c["slide_to_report"]["R@5"] <= 0.8, (name, c)
    # the rest of the outputs: both models saved, zero-shot and probe evaluated, no truncation
    out = json.loads((tmp_path / "real" / "metrics.json").read_text())
    assert out["splits"] == {"train": 8 * N, "val": N, "test": N} and out["split_by"] == "sheet"
    assert out["reports"]["n_truncated"] == 0 and out["reports"]["context_length"] == 77
    for name in ("scale_aware", "no_scale"):
        m = out["models"][name]
        assert 0.0 <= m["zero_shot"]["auc_macro_ovr"] <= 1.0 and m["zero_shot"]["n"] == N
        # the probe sees the 8 test slides only (4 per class, so 4 folds), never training ones
        probe = m["linear_probe"]
        assert probe["n_slides"] == N and probe["slides"] == "test split only"
        assert probe["folds"] == 4 and len(probe["per_fold"]) == 4
        assert (tmp_path / "real" / name / "model.safetensors").is_file()
    z = np.load(tmp_path / "real" / "embeddings.npz")
    assert z["scale_aware"].shape == (10 * N, D)
    assert np.allclose(np.linalg.norm(z["scale_aware"], axis=1), 1, atol=1e-5)


@pytest.mark.slow  # trains two slide-report models (about 20 s)
def test_scale_embeddings_win_when_the_finding_lives_at_one_scale(
    tmp_path: Path, demo: LoadedEncoder
) -> None:
    """Finding A: pattern P at 0.5 µm/px and Q at 1.0; finding B: the reverse. Without
    knowing a tile's scale the two kinds of slide hold the same mixture of tiles."""
    reports = [_report(0, 0), _report(1, 1)]
    text = embed_texts(demo, reports).emb
    p, q = SIG[2], SIG[3]
    paths, emb = [], {}
    for i in range(48):
        a = i % 2
        r = np.random.default_rng(i)
        fine = unit((p if a == 0 else q) + r.normal(size=(24, D)) / np.sqrt(D))
        coarse = unit((q if a == 0 else p) + r.normal(size=(24, D)) / np.sqrt(D))
        sid = f"s{i:02d}"
        paths.append(build_store(tmp_path / f"{sid}.zarr", {0.5: fine, 1.0: coarse}, slide_id=sid))
        emb[sid] = text[a]
    source = BagSource(paths)
    ids = [f"s{i:02d}" for i in range(48)]
    train, val, test = ids[:32], ids[32:38], ids[38:]
    s = ContrastiveSettings(60, 16, 1e-3, 1e-4, 20, 64, 0.07, 0)
    acc = {}
    for on in (True, False):
        model, _ = train_contrastive(source, train, val, emb, s, scale_embedding=on)
        z = embed_slides(model, source, test)
        pred = (z @ text.T).argmax(axis=1)
        acc[on] = float(np.mean(pred == [int(t[1:]) % 2 for t in test]))
    assert acc[True] >= 0.9, acc
    assert acc[False] <= 0.7, acc


def test_recall_counts_ranks_and_ties_against() -> None:
    sim = np.array([[0.9, 0.1, 0.0], [0.8, 0.5, 0.0], [0.3, 0.3, 0.3]], np.float32)
    # row 0 ranks its match first; row 1 second; row 2 is tied with both others: third
    assert recall_at_k(sim, (1, 2, 3)) == {"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0}
    r = retrieval(np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32)[[1, 0, 2, 3]])
    assert r["slide_to_report"]["R@1"] == 0.5 and r["chance"]["R@1"] == 0.25


def test_pairing_ranks_the_true_report_first(demo: LoadedEncoder) -> None:
    """A corpus of 400 reports, each image's own report among them; the images are their
    reports' embeddings plus noise. Most images get their own report first; blocks do
    not change the answer; scores come sorted."""
    corpus = [f"{_report(i, i % N)} Case number {i}, block {i % 7}." for i in range(400)]
    t = embed_texts(demo, corpus).emb
    rng = np.random.default_rng(0)
    own = rng.choice(400, 120, replace=False)
    images = unit(t[own] + 0.25 * rng.normal(size=(120, D)) / np.sqrt(D))
    pairs = pair_topk(images, t, 5)
    assert np.mean(pairs.index[:, 0] == own) >= 0.8
    assert np.all(np.diff(pairs.score, axis=1) <= 0)
    import histoalign_wsi.learn.pairing as pairing

    old = pairing._BLOCK_FLOATS
    pairing._BLOCK_FLOATS = 400 * 7  # blocks of 7 images
    try:
        again = pair_topk(images, t, 5)
    finally:
        pairing._BLOCK_FLOATS = old
    assert np.array_equal(again.index, pairs.index)
    table = pairs.table([f"img {i}" for i in range(120)], [f"r{i}" for i in range(400)])
    back = Pairs.from_table(table, [f"img {i}" for i in range(120)])
    assert np.array_equal(back.index, pairs.index)
    fused = fuse_paired_text(pairs, t, temperature=1e-4)  # a cold softmax keeps the top report
    clear = pairs.score[:, 0] - pairs.score[:, 1] > 2e-3
    assert clear.sum() > 60 and np.allclose(fused[clear], t[pairs.index[clear, 0]], atol=1e-5)
    warm = fuse_paired_text(pairs, t, temperature=1e3)  # a hot one averages the five
    mean = t[pairs.index].mean(axis=1)
    assert np.allclose(warm, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-4)


def test_distillation_beats_the_classifier_without_pairing(demo: LoadedEncoder) -> None:
    """Three findings; each image is its own report's embedding plus much noise, so the
    image features separate the classes only weakly; 12 labelled images and 200
    unlabelled ones. The paired text separates them well: the distilled student beats
    the same MLP trained without pairing, on the same split and seed."""
    findings = FINDINGS[:3]
    corpus = [WORDINGS[j % len(WORDINGS)].format(findings[j % 3]) + f" Case {j}." for j in range(360)]
    cls = np.arange(360) % 3
    t = embed_texts(demo, corpus).emb
    gains = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        own = rng.choice(360, 12 + 200 + 150)
        y = cls[own]
        x = unit(0.5 * t[own] + rng.normal(size=(len(own), D)) / np.sqrt(D))
        paired = fuse_paired_text(pair_topk(x, t, 5), t)
        pool, test = slice(0, 212), slice(212, None)
        yy = np.where(np.arange(212) < 12, y[pool], -1)
        s = DistillSettings(epochs=200, lr=1e-2, weight_decay=1e-2, hidden=64, weight=1.0, seed=seed)
        res = distill(x[pool], paired[pool], yy, 3, s)
        acc_s = np.mean(res.student.probs(x[test]).argmax(1) == y[test])
        acc_b = np.mean(res.baseline.probs(x[test]).argmax(1) == y[test])
        gains.append(acc_s - acc_b)
    assert np.mean(gains) >= 0.05, gains
    assert min(gains) > 0, gains


def test_truncated_reports_are_counted_and_embeddings_cached(demo: LoadedEncoder, tmp_path: Path) -> None:
    texts = ["Kurz.", "word " * 200, "Ein längerer Befund; " * 3]
    a = embed_texts(demo, texts, cache_dir=tmp_path)
    assert a.n_truncated == 1 and a.max_tokens == 202 and a.context_length == 77
    assert len(list(tmp_path.iterdir())) == 1
    b = embed_texts(demo, texts, cache_dir=tmp_path)
    assert np.array_equal(a.emb, b.emb) and b.n_truncated == 1
    c = embed_texts(demo, [*texts[:2], "Ein anderer Befund."], cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2 and not np.allclose(c.emb[2], a.emb[2])


def test_report_sheets_in_three_formats(tmp_path: Path) -> None:
    rows = [
        {"slide_id": "A 1", "report": "Zeile eins,\nmit Komma und Umbruch", "patient_id": "p1"},
        {"slide_id": "B/2", "report": "é" * 5000, "patient_id": "p1"},
        {"slide_id": "C", "report": "plain", "patient_id": "p2"},
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "r.csv", index=False)
    pd.DataFrame(rows).to_csv(tmp_path / "r.tsv", sep="\t", index=False)
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    for name in ("r.csv", "r.tsv", "r.jsonl"):
        s = read_reports(tmp_path / name)
        assert s.reports == {r["slide_id"]: r["report"] for r in rows}, name
        assert s.patients == {"A 1": "p1", "B/2": "p1", "C": "p2"}
    with pytest.raises(ConfigError, match=r"1 slide id\(s\) have no feature store: 'C'"):
        match_reports(read_reports(tmp_path / "r.csv"), ["A 1", "B/2", "D"])


def test_splits_are_seeded_grouped_and_need_two_slides_each() -> None:
    ids = [f"s{i}" for i in range(30)]
    groups = {s: f"p{i // 3}" for i, s in enumerate(ids)}
    a = split_slides(ids, groups=groups, seed=1)
    assert a == split_slides(ids, groups=groups, seed=1) != split_slides(ids, groups=groups, seed=2)
    assert sorted(i for v in a.values() for i in v) == sorted(ids)
    for s1 in a:
        for s2 in a:
            if s1 != s2:
                assert not {groups[i] for i in a[s1]} & {groups[i] for i in a[s2]}
    with pytest.raises(ConfigError, match="every split needs at least 2 slides, but val has 1"):
        split_slides(ids[:5], given={"s0": "train", "s1": "train", "s2": "val", "s3": "test", "s4": "test"})


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        (
            b"slide_id,report\na,fine\nb,\n",
            ".csv",
            r"r\.csv', line 3: the report of slide 'b' is empty",
        ),
        (
            b'slide_id,report\na,"two\nlines"\na,again\n',
            ".csv",
            r"r\.csv', line 4: slide 'a' already has a report \(lines 2-3\)",
        ),
        ("slide_id,report\na,b\n".encode("utf-16"), ".csv", r"r\.csv' is UTF-16 text; save it as UTF-8"),
        (b"slide_id,report\na,caf\xe9\n", ".csv", r"r\.csv' is not UTF-8 text \(byte 21, line 2\)"),
        (
            b'{"slide_id": "a", "report": "x"}\n{"slide_id": "a", "report": "y"}\n',
            ".jsonl",
            r"r\.jsonl', line 2: slide 'a' already has a report \(line 1\)",
        ),
        (b"slide,text\na,b\n", ".csv", "needs columns slide_id and report"),
        (b"slide_id,report,split\na,x,training\n", ".csv", "split 'training' of slide 'a' is not one of"),
    ],
)
def test_bad_report_sheets_name_the_file_and_row(
    tmp_path: Path, content: bytes, suffix: str, message: str
) -> None:
    p = tmp_path / f"r{suffix}"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        read_reports(p)


def test_corpora_folder_and_table_and_empty(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("Befund A", encoding="utf-8")
    (folder / "sub" / "b.txt").write_text("Befund B", encoding="utf-8")
    (folder / "empty.txt").write_text("  \n", encoding="utf-8")
    c = read_corpus(folder)
    assert c.ids == ("a.txt", "sub/b.txt") and c.texts == ("Befund A", "Befund B")
    pd.DataFrame({"report_id": ["x", "y"], "report": ["one", "two"]}).to_csv(tmp_path / "c.csv", index=False)
    assert read_corpus(tmp_path / "c.csv").ids == ("x", "y")
    none = tmp_path / "none"
    none.mkdir()
    (none / "notes.pdf").write_bytes(b"%PDF")
    with pytest.raises(ConfigError, match=r"report corpus '.*none' holds no report texts"):
        read_corpus(none)
    (tmp_path / "blank.csv").write_text('report\n\n""\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="holds no report texts"):
        read_corpus(tmp_path / "blank.csv")
    (folder / "bad.txt").write_bytes(b"Befund caf\xe9")  # Latin-1
    with pytest.raises(ConfigError, match=r"bad\.txt' is not UTF-8"):
        read_corpus(folder)


@pytest.mark.slow  # the CLI chain: train-reports, pair-reports, distill, predict
def test_cli_chain_pair_distill_predict(cohort: tuple[list[Path], Path], tmp_path: Path) -> None:
    paths, sheet = cohort
    stores = [str(p) for p in paths]
    assert (
        main(
            [
                "train-reports",
                *stores,
                "--reports",
                str(sheet),
                "--out",
                str(tmp_path / "tr"),
                "--epochs",
                "2",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "tr" / "metrics.json").read_text())["models"]["no_scale"]["epochs"] <= 2
    corpus = tmp_path / "corpus.jsonl"
    df = pd.read_csv(sheet)
    corpus.write_text(
        "\n".join(json.dumps({"report_id": f"ext {i}", "report": r}) for i, r in enumerate(df["report"]))
        + "\n"
    )
    assert (
        main(["pair-reports", *stores, "--corpus", str(corpus), "--out", str(tmp_path / "pairs"), "-k", "3"])
        == 0
    )
    pairs = pd.read_csv(tmp_path / "pairs" / "pairs.csv")
    assert len(pairs) == 3 * len(paths) and set(pairs["rank"]) == {1, 2, 3}
    assert pairs["report_id"].str.startswith("ext ").all()
    labels = tmp_path / "labels.csv"
    df[["slide_id", "label"]].iloc[::3].to_csv(labels, index=False)  # a third of the slides labelled
    assert (
        main(["distill", str(tmp_path / "pairs"), "--labels", str(labels), "--out", str(tmp_path / "d")]) == 0
    )
    m = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert set(m["metrics"]) == {"student", "baseline", "teacher_with_text"}
    assert m["n_unlabelled"] == len(paths) - len(df.iloc[::3]) and m["n_test"] >= 2
    assert (
        main(
            ["predict", *stores[:3], "--head", str(tmp_path / "d" / "student"), "--out", str(tmp_path / "p")]
        )
        == 0
    )
    pred = pd.read_csv(tmp_path / "p" / "predictions.csv")
    assert len(pred) == 3 and set(pred["predicted_class"]) <= {"STR", "TUM"}
    (tmp_path / "void").mkdir()  # an empty folder given as the report corpus: exit 2, nothing written
    assert (
        main(["pair-reports", *stores, "--corpus", str(tmp_path / "void"), "--out", str(tmp_path / "x")]) == 2
    )
    assert not (tmp_path / "x").exists()


def test_zero_shot_centroids_and_probe_on_known_answers() -> None:
    from histoalign_wsi.learn.evaluation import class_centroids, probe_cv, zero_shot_probs
    from histoalign_wsi.stages.learning import scorer

    emb = np.array([[1, 0], [0.6, 0.8], [0, 1], [0, 1]], np.float32)
    c = class_centroids(emb, np.array([0, 0, 1, 1], np.int32), 2)
    assert np.allclose(c, [[0.8 / np.hypot(0.8, 0.4), 0.4 / np.hypot(0.8, 0.4)], [0, 1]])
    z = np.array([[1, 0], [0, 1]], np.float32)
    p = zero_shot_probs(z, c, 10.0)
    logit = 10 * (z @ c.T)
    assert np.allclose(p, np.exp(logit) / np.exp(logit).sum(1, keepdims=True), atol=1e-6)
    assert p[0].argmax() == 0 and p[1].argmax() == 1
    rng = np.random.default_rng(0)
    y = ["STR", "TUM"] * 15
    x = rng.normal(size=(30, 4)).astype(np.float32)
    x[:, 0] += np.where(np.array(y) == "TUM", 4.0, -4.0)
    res = probe_cv(x, y, ["STR", "TUM"], scorer(["STR", "TUM"]), folds=5, seed=0)
    assert res["folds"] == 5 and res["mean"]["balanced_accuracy"] == 1.0
    noise = probe_cv(rng.normal(size=(30, 4)).astype(np.float32), y, ["STR", "TUM"], scorer(["STR", "TUM"]))
    assert noise["mean"]["balanced_accuracy"] < 0.8
    assert "skipped" in probe_cv(x[:3], ["STR", "STR", "TUM"], ["STR", "TUM"], scorer(["STR", "TUM"]))


def test_train_reports_refuses_a_sheet_too_small_to_split(tmp_path: Path, demo: LoadedEncoder) -> None:
    paths = []
    for i in range(3):
        f = unit(np.random.default_rng(i).normal(size=(6, D)))
        paths.append(
            build_store(tmp_path / f"s{i}.zarr", {0.5: f}, slide_id=f"s{i}", sha=demo.weights_sha256)
        )
    sheet = tmp_path / "Berichte é.csv"
    pd.DataFrame({"slide_id": ["s0", "s1", "s2"], "report": ["a", "b", "c"]}).to_csv(sheet, index=False)
    with pytest.raises(ConfigError, match=r"report sheet '.*Berichte é\.csv': every split needs at least 2"):
        run_train_reports(paths, sheet, tmp_path / "out", load_config())
    assert not (tmp_path / "out").exists()
    from histoalign_wsi.errors import StoreError
    from histoalign_wsi.stages.reports import report_encoder

    with pytest.raises(StoreError, match="text and images must share one model"):
        report_encoder(load_config(), {"demo": {"weights_sha256": "0" * 64}})
    with pytest.raises(StoreError, match=r"report encoder 'demo' is not among the stores' encoders \(plip\)"):
        report_encoder(load_config(), {"plip": {"weights_sha256": "0" * 64}})


def test_patch_folders_are_paired_and_distilled_with_folder_labels(tmp_path: Path) -> None:
    """`pair-reports` on a patch folder (class = sub-folder, `unlabelled` = no class),
    then `distill` on the folder labels alone."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for folder, n in (("TUM", 6), ("STR", 6), ("unlabelled", 4)):
        (tmp_path / "patches" / folder).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
            Image.fromarray(img).save(tmp_path / "patches" / folder / f"p{i}.png")
    corpus = tmp_path / "corpus.csv"
    pd.DataFrame({"report": [_report(i, i % N) for i in range(20)]}).to_csv(corpus, index=False)
    out = tmp_path / "pairs"
    assert (
        main(
            ["pair-reports", str(tmp_path / "patches"), "--corpus", str(corpus), "--out", str(out), "-k", "2"]
        )
        == 0
    )
    pairs = pd.read_csv(out / "pairs.csv")
    assert len(pairs) == 16 * 2 and pairs["item"].str.startswith(("TUM/", "STR/", "unlabelled/")).all()
    assert json.loads((out / "summary.json").read_text())["kind"] == "patches"
    assert main(["distill", str(out), "--out", str(tmp_path / "d"), "--set", "distill.epochs=5"]) == 0
    m = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert m["n_unlabelled"] == 4 and m["n_items"] == 16 and sorted(m["classes"]) == ["STR", "TUM"]


def test_the_shuffled_pairs_control_gives_every_slide_anothers_report() -> None:
    """A derangement, seeded: no training slide keeps its own report (a plain permutation
    leaves some slides with their own, and an unshuffled control would learn from all)."""
    from histoalign_wsi.stages.reports import shuffled_pairs

    rng = np.random.default_rng(0)
    emb = {f"s{i}": rng.normal(size=4).astype(np.float32) for i in range(12)}
    train = [f"s{i}" for i in range(10)]
    for seed in range(20):
        out = shuffled_pairs(emb, train, seed=seed)
        given = [next(k for k in train if out[s] is emb[k]) for s in train]
        assert sorted(given) == sorted(train) and all(g != s for g, s in zip(given, train, strict=True))
        assert out["s10"] is emb["s10"] and out["s11"] is emb["s11"]  # not training: kept
    a, b = shuffled_pairs(emb, train, seed=3), shuffled_pairs(emb, train, seed=3)
    assert all(a[s] is b[s] for s in emb)
    with pytest.raises(ConfigError, match="at least two training slides"):
        shuffled_pairs(emb, ["s0"], seed=0)
