#!/usr/bin/env bash
# One command for a lent GPU (no package registry there): install the project and the
# wheels brought along, then run the CUDA tests, the encode throughput benchmark (two
# random-weight open_clip encoders, three scales) with a GPU utilisation sample, and the
# CPU decode with 1-14 readers and the overlap proxy; everything lands in one folder. About
# 5.5 minutes on an H100/H200.
#
#   bash benchmarks/gpu_check.sh [WHEELS_DIR] [OUT_DIR]
#
# WHEELS_DIR (default: shared/wheels) holds the wheels the machine lacks, made on a
# machine with a registry for the GPU machine's Python (see README, "Checking on a GPU"):
#   pip download --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
#       --no-deps -d shared/wheels open_clip_torch zarr numcodecs donfig msgspec \
#       google-crc32c openslide-python openslide-bin tiffslide imagecodecs simplejpeg \
#       shapely dask jsonschema jsonschema-specifications referencing rpds-py \
#       ftfy regex huggingface_hub safetensors
# OUT_DIR (default: $OUT when the device tool runs this, else gpu_check_out) receives
# env.txt, pytest.txt, throughput.txt (+ .json), nvidia_smi.csv, decode_scaling.txt (+ .json),
# overlap.txt (+ .json), summary.txt.
set -u
WHEELS="${1:-shared/wheels}"
OUT_DIR="${2:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR"
log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$OUT_DIR/summary.txt"; }

log "python: $(python --version 2>&1); wheels: $WHEELS"
{ nvidia-smi; python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } \
    > "$OUT_DIR/env.txt" 2>&1
if [ -d "$WHEELS" ]; then
    python -m pip install --no-index --find-links "$WHEELS" --quiet "$WHEELS"/*.whl \
        > "$OUT_DIR/install.txt" 2>&1 || log "some wheels did not install (see install.txt)"
fi
python -m pip install --no-index --no-deps --no-build-isolation --quiet -e . >> "$OUT_DIR/install.txt" 2>&1 \
    || { log "the project did not install (see install.txt)"; exit 1; }
python -c "import histoalign_wsi, open_clip, zarr, openslide, simplejpeg" >> "$OUT_DIR/install.txt" 2>&1 \
    || { log "imports fail after install (see install.txt)"; exit 1; }
log "installed"

# 1. the CUDA tests (nvJPEG agreement, device assembly, encode on the device) and the
#    encode tests, 120 s at most
timeout 120 python -m pytest -q -p no:cacheprovider -m "not slow" \
    tests/slides/test_device_jpeg.py tests/features/test_encode.py tests/features/test_overlap.py \
    > "$OUT_DIR/pytest.txt" 2>&1
log "pytest: $(tail -n 1 "$OUT_DIR/pytest.txt")"

# 2. throughput (native JPEG and OpenSlide paths, 2 encoders, 3 scales) with the GPU's
#    utilisation sampled every 200 ms meanwhile, 110 s at most
rm -f benchmarks/out/encode_throughput.json benchmarks/out/decode_scaling.json  # no stale figures
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 200 \
    > "$OUT_DIR/nvidia_smi.csv" 2>/dev/null &
SMI=$!
timeout 110 python benchmarks/encode_throughput.py --arch ViT-B-16 ViT-B-32 --device cuda \
    --size 24000 --workers 12 --batch 256 > "$OUT_DIR/throughput.txt" 2>&1 \
    || log "throughput failed or timed out: $(tail -n 1 "$OUT_DIR/throughput.txt" | cut -c1-200)"
kill "$SMI" 2>/dev/null
cp benchmarks/out/encode_throughput.json "$OUT_DIR/" 2>/dev/null
python - "$OUT_DIR/nvidia_smi.csv" >> "$OUT_DIR/summary.txt" <<'EOF'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if r and r[0][:1].isdigit()]
util = [int(r[1].strip().split()[0]) for r in rows]
busy = [u for u in util if u > 5]
if util:
    print(f"GPU utilisation while the benchmark ran: mean {sum(util) / len(util):.0f} %, "
          f"while busy {sum(busy) / max(len(busy), 1):.0f} % ({len(util)} samples)")
EOF
log "throughput: $(grep -E 'native-jpeg|openslide' "$OUT_DIR/throughput.txt" | tr -s ' ' | cut -c1-200)"

# 3. CPU decode with 1 to 14 reader threads on this machine's 16 cores (does it keep
#    scaling?), 60 s at most
timeout 60 python benchmarks/decode_scaling.py --readers 1 2 4 8 14 --rounds 2 --size 24000 \
    > "$OUT_DIR/decode_scaling.txt" 2>&1
cp benchmarks/out/decode_scaling.json "$OUT_DIR/" 2>/dev/null
log "decode scaling: $(grep -E '^ *[0-9]+ ' "$OUT_DIR/decode_scaling.txt" | tr -s ' ' | head -5 | tr '\n' ';')"

# 4. the overlap proxy on this machine's CPUs (no GPU involved), for comparison
timeout 60 python benchmarks/encode_throughput.py --fake-forward-ms 0 --device cpu --size 24000 \
    --workers 2 --batch 32 > "$OUT_DIR/overlap.txt" 2>&1 \
    && cp benchmarks/out/encode_throughput.json "$OUT_DIR/overlap.json"
log "overlap proxy: $(grep native-jpeg "$OUT_DIR/overlap.txt" | tr -s ' ' | cut -c1-200)"
log "done: $OUT_DIR"
