"""Learning from reports, cost: one slide-report contrastive epoch on synthetic feature
stores (bags streamed, ``cache_mb=0``, beside the time to read them once), and pairing
patches against an unpaired corpus: the corpus embedded by the demo encoder's text tower
once (then read from the cache), and the blocked top-k at the demo's 64 dimensions and
at 512 (a real CLIP's width, random unit vectors). Each row runs in its own process, so
each peak RSS is its own.

    python benchmarks/reports.py                       # 200 slides; 10,000 x 50,000 pairing
    python benchmarks/reports.py --slides 50 --patches 2000 --corpus 10000   # quicker

Targets: pairing is one matrix product per block (no loop per image); peak RSS < 4 GB.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report, run_child
from fit_mil import make_stores

EPOCH = """
import json, resource, time
import numpy as np, torch
from pathlib import Path
from histoalign_wsi.learn.bags import BagSource
from histoalign_wsi.learn.contrastive import ContrastiveSettings, train_contrastive
torch.set_num_threads(2)
paths = sorted(Path({folder!r}).glob("*.zarr"))
src = BagSource(paths, cache_mb=0)
ids = list(src.ids)
t = time.perf_counter()
for s in ids:
    src.bag(s)
read_s = time.perf_counter() - t
rng = np.random.default_rng(0)
vec = rng.normal(size=(len(ids), 512))
text = {{s: (v / np.linalg.norm(v)).astype(np.float32) for s, v in zip(ids, vec)}}
st = ContrastiveSettings(epochs=1, batch_size=32, lr=1e-3, weight_decay=1e-4, patience=1, hidden=128,
                         temperature=0.07, seed=0)
t = time.perf_counter()
train_contrastive(src, ids[:-8], ids[-8:], text, st)  # one epoch plus its validation pass
epoch_s = time.perf_counter() - t
print(json.dumps({{"read_s": read_s, "epoch_s": epoch_s,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

PAIR_DEMO = """
import json, resource, time
import numpy as np, torch
from histoalign_wsi.features.adapters import load_encoder
from histoalign_wsi.features.registry import load_registry
from histoalign_wsi.learn.pairing import pair_topk
from histoalign_wsi.learn.report_text import embed_texts
torch.set_num_threads(2)
enc = load_encoder(load_registry()["demo"])
words = ["carcinoma", "adenoma", "benign", "necrosis", "margins", "lymph", "node", "grade", "mucosa"]
rng = np.random.default_rng(0)
texts = [" ".join(rng.choice(words, 24)) + f". Case {{i}}." for i in range({corpus})]
t = time.perf_counter()
emb = embed_texts(enc, texts, cache_dir={cache!r}).emb
embed_s = time.perf_counter() - t
x = rng.normal(size=({patches}, emb.shape[1])).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
t = time.perf_counter()
pairs = pair_topk(x, emb, 5)
pair_s = time.perf_counter() - t
print(json.dumps({{"embed_s": embed_s, "pair_s": pair_s, "dim": int(emb.shape[1]),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

PAIR_512 = """
import json, resource, time
import numpy as np, torch
from histoalign_wsi.learn.pairing import pair_topk
torch.set_num_threads(2)
rng = np.random.default_rng(0)
c = rng.normal(size=({corpus}, 512)).astype(np.float32)
c /= np.linalg.norm(c, axis=1, keepdims=True)
x = rng.normal(size=({patches}, 512)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
t = time.perf_counter()
pairs = pair_topk(x, c, 5)
pair_s = time.perf_counter() - t
print(json.dumps({{"embed_s": None, "pair_s": pair_s, "dim": 512,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=200)
    ap.add_argument("--tiles", type=int, default=2000, help="finest-scale tiles per slide")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--patches", type=int, default=10_000)
    ap.add_argument("--corpus", type=int, default=50_000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_reports_"))
    rows = []
    try:
        make_stores(tmp / "stores", args.slides, args.tiles, args.dim)
        r = run_child(EPOCH.format(folder=str(tmp / "stores")))
        rows.append(
            {
                "task": f"contrastive epoch, {args.slides} slides",
                "wall_s": r["epoch_s"],
                "read_s": r["read_s"],
                "ratio": r["epoch_s"] / r["read_s"],
                "peak_rss_mib": r["peak_rss_mib"],
            }
        )
        cache = str(tmp / "cache")
        for label in ("first run: embed corpus", "second run: corpus cached"):
            r = run_child(PAIR_DEMO.format(corpus=args.corpus, patches=args.patches, cache=cache))
            rows.append(
                {
                    "task": f"pair {args.patches} x {args.corpus} (D={r['dim']}), {label}",
                    "wall_s": r["embed_s"] + r["pair_s"],
                    "embed_s": r["embed_s"],
                    "pair_s": r["pair_s"],
                    "peak_rss_mib": r["peak_rss_mib"],
                }
            )
        r = run_child(PAIR_512.format(corpus=args.corpus, patches=args.patches))
        rows.append(
            {
                "task": f"pair {args.patches} x {args.corpus} (D=512), corpus given",
                "wall_s": r["pair_s"],
                "pair_s": r["pair_s"],
                "peak_rss_mib": r["peak_rss_mib"],
            }
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cols = ["task", "wall_s", "read_s", "ratio", "embed_s", "pair_s", "peak_rss_mib"]
    report("reports", rows, cols, {"args": vars(args)})


if __name__ == "__main__":
    main()
