"""The learning mutants of #26, by hand: each is a leak or a wrong loss that once
survived the learning tests (a probe or head fitted on its test rows, a one-way or
unscaled InfoNCE, attention over the wrong axis, an ablation from other weights, splits
that ignore patients, a corpus that keeps the cohort's reports). Each is applied alone,
the learning tests run, and the code is restored; every one must be killed.

    python benchmarks/learn_mutants.py          # prints the table, writes out/learn_mutants.json
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report

REPO = Path(__file__).resolve().parents[1]
TESTS = ["tests/learn/test_leakage.py"]

# ruff: noqa: E501  (each mutant is one exact line of code, kept whole to be found)
M = [
    (
        "few-shot probe fitted on train+test",
        "histoalign_wsi/learn/fewshot.py",
        "fit_linear_full(data.features[tr], data.labels[tr], k_cls, seed=seed + r)",
        "fit_linear_full(data.features, data.labels, k_cls, seed=seed + r)",
    ),
    (
        "probe_cv fitted on train+test",
        "histoalign_wsi/learn/evaluation.py",
        "fit_linear_full(x[tr], y[tr], len(classes), seed=seed + f)",
        "fit_linear_full(x, y, len(classes), seed=seed + f)",
    ),
    (
        "cross_validate fits heads on train+test",
        "histoalign_wsi/learn/heads.py",
        "                [ids[i] for i in tr],\n                y[tr],",
        "                list(ids),\n                y,",
    ),
    (
        "info_nce one direction",
        "histoalign_wsi/learn/contrastive.py",
        "(F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2",
        "F.cross_entropy(logits, target)",
    ),
    (
        "info_nce without temperature",
        "histoalign_wsi/learn/contrastive.py",
        "logits = scale * z @ t.T",
        "logits = z @ t.T",
    ),
    (
        "attention softmax over the size-1 axis",
        "histoalign_wsi/learn/abmil.py",
        "a = self.att_w(torch.tanh(self.att_v(h)) * torch.sigmoid(self.att_u(h))).squeeze(-1)\n        a = torch.softmax(a, dim=0)",
        "a = self.att_w(torch.tanh(self.att_v(h)) * torch.sigmoid(self.att_u(h)))\n        a = torch.softmax(a, dim=-1).squeeze(-1)",
    ),
    (
        "scale embedding created first",
        "histoalign_wsi/learn/abmil.py",
        "        self.proj = nn.Sequential(nn.Linear(cfg.in_dim, h), nn.GELU(), nn.Dropout(cfg.dropout))\n",
        "        self.scale_emb0 = nn.Embedding(cfg.n_scales, h) if cfg.scale_embedding else None\n        self.proj = nn.Sequential(nn.Linear(cfg.in_dim, h), nn.GELU(), nn.Dropout(cfg.dropout))\n",
    ),
    (
        "early-stopping split ignores groups",
        "histoalign_wsi/learn/abmil.py",
        "g = np.asarray(groups) if groups is not None else np.arange(len(y))",
        "g = np.arange(len(y))",
    ),
    (
        "few-shot draw ignores groups",
        "histoalign_wsi/learn/fewshot.py",
        "    if groups is None:\n        train = []",
        "    if True:\n        train = []",
    ),
    (
        "distill ignores patient groups",
        "histoalign_wsi/stages/pairing.py",
        "    held = _test_groups(y[lab], grp[lab], d.test_fraction, s.seed)",
        "    grp = np.array(ids)\n    held = _test_groups(y[lab], grp[lab], d.test_fraction, s.seed)",
    ),
    (
        "corpus keeps the cohort's reports",
        "histoalign_wsi/stages/pairing.py",
        "    corpus, excluded = _cohort_overlap(read_corpus(path), own)",
        "    corpus, excluded = read_corpus(path), []",
    ),
    (
        "train-reports probe on every labelled slide",
        "histoalign_wsi/stages/reports.py",
        "    lab = [s for s in test if s in labels]",
        "    lab = [s for s in idx if s in labels]",
    ),
    (
        "probe_cv folds count slides",
        "histoalign_wsi/learn/evaluation.py",
        "per_class = [len(np.unique(g[y == c])) for c in np.unique(y)]",
        "per_class = [int((y == c).sum()) for c in np.unique(y)]",
    ),
    (
        "linear head without absent-class columns",
        "histoalign_wsi/learn/heads.py",
        "coef, intercept, c = fit_linear_full(x, y, len(classes), seed=seed)",
        "coef, intercept, c = fit_linear(x, y, seed=seed)",
    ),
    (
        "cross_validate guard counts slides",
        "histoalign_wsi/learn/heads.py",
        "per_class = {classes[k]: len(np.unique(g[y == k])) for k in np.unique(y)}",
        "per_class = {classes[k]: int((y == k).sum()) for k in np.unique(y)}",
    ),
]


def main() -> None:
    rows = []
    for name, f, old, new in M:
        p = REPO / f
        src = p.read_text()
        if src.count(old) != 1:
            raise SystemExit(f"mutant {name!r}: its code is not found once in {f}; update this script")
        p.write_text(src.replace(old, new))
        try:
            cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
            last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
            rows.append(
                {
                    "mutant": name,
                    "module": f,
                    "result": "killed" if r.returncode else "SURVIVED",
                    "tests": last,
                }
            )
        finally:
            p.write_text(src)
    report("learn_mutants", rows, ["mutant", "module", "result", "tests"])
    if any(r["result"] != "killed" for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
