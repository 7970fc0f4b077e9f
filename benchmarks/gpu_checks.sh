#!/usr/bin/env bash
# The GPU checks in one bounded run (a lent GPU machine has minutes, not hours): each step gets at most its own
# limit and never more than what is left of DEADLINE seconds, so a slow step cuts the later ones short instead of
# losing everything. Runs from a checkout without installing (PYTHONPATH) and needs only torch, timm, opencv,
# scikit-learn and safetensors (no faiss, no kornia): FAISS-less paths are what a bare GPU machine exercises.
# densevit.apps must be importable: install the checkout (pip install -e .) or, in a throwaway copy, link it
# (ln -s ../apps densevit/apps: apps/ installs as densevit.apps).
#
#   DENSEVIT_SHARED=../shared REF=/path/to/reference OUT=results/gpu bash benchmarks/gpu_checks.sh
#
# SPEED_ARGS: more flags for benchmarks/speed.py (SPEED_ARGS='--only vos').
# SKIP: step names to leave out, as an alternation (SKIP='speed_gpu|cuda_tests').
# REF: a folder with dino-vit-features' extractor.py and DINO's vision_transformer.py / utils.py (the reference
# implementation timed beside densevit; skipped when unset). Writes OUT/all.log and OUT/results.tgz.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SHARED="${DENSEVIT_SHARED:-$PWD/../shared}"; export DENSEVIT_SHARED="$SHARED"
OUT="${OUT:-results/gpu}"; R="$OUT/r"; mkdir -p "$R"
DEADLINE="${DEADLINE:-540}"; REPEAT="${REPEAT:-20}"; CLICKS="${CLICKS:-50}"
PY="${PYTHON:-python3}"; DEV="${DEV:-cuda}"   # DEV=cpu: a dry run of this script on a machine without a GPU
D="$SHARED/data/davis2016/JPEGImages/480p"
W="$SHARED/golden/vits8_random_fp16.pth"
LOG="$OUT/all.log"; : > "$LOG"

step() {  # step NAME LIMIT_S CMD...
    local name=$1 limit=$2; shift 2
    if [[ -n "${SKIP:-}" && "$name" =~ ^(${SKIP})$ ]]; then echo "=== $name: skipped (SKIP)" | tee -a "$LOG"; return; fi
    local left=$((DEADLINE - SECONDS))
    if (( left < 15 )); then echo "=== $name: skipped (deadline)" | tee -a "$LOG"; return; fi
    (( limit > left )) && limit=$left
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" >> "$LOG" 2>&1
    echo "=== $name: rc $? in $((SECONDS - t0)) s" | tee -a "$LOG"
}

step env 30 bash -c "nvidia-smi -L; $PY -c 'import torch, timm, sys; print(sys.version.split()[0], torch.__version__, timm.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else \"no cuda\")'"
# the GPU computes what the CPU computes (the CPU is proven against the official code by tests/test_golden.py)
step gpu_vs_cpu 60 "$PY" - "$W" "$SHARED/data/images/cat.jpg" "$DEV" <<'EOF'
import sys, torch
from densevit import ViTExtractor
w, img = sys.argv[1:3]
out = {}
for dev in ("cpu", sys.argv[3]):
    ext = ViTExtractor("dino_vits8", stride=4, weights=w, device=dev)
    x, _ = ext.preprocess(img, load_size=224)
    f = ext.extract(x, (9, 11), ("key", "token"), bin=True, saliency=True)
    out[dev] = {k: v.float().cpu()[0] for k, v in f.descriptors.items()} | {"saliency": f.saliency.float().cpu()}
for k in out["cpu"]:
    a, b = out["cpu"][k], out[sys.argv[3]][k]
    if k == "saliency":
        print(k, "max abs diff", (a - b).abs().max().item())
    else:
        c = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        print(k, "per-token cosine GPU vs CPU: min", c.min().item(), "mean", c.mean().item())
EOF
TP=(benchmarks/throughput.py --images "$D/car-shadow" "$D/blackswan" --procs 1 --workers 8 --writers 4 --shard-size 256 --weights "$W" --device "$DEV")
step throughput_fp32 100 "$PY" "${TP[@]}" --repeat "$REPEAT" --batch-size 32 --out "$R/throughput_fp32"
step throughput_bf16 100 "$PY" "${TP[@]}" --repeat "$REPEAT" --batch-size 32 --dtype bfloat16 --out "$R/throughput_bf16"
# the reference implementation beside densevit on the default inputs (the two photographs, 6 frames of two sequences)
[ -n "${REF:-}" ] && step throughput_reference 150 "$PY" benchmarks/throughput.py --procs 1 --workers 8 --shard-size 256 \
    --batch-size 8 --weights "$W" --device "$DEV" --reference "$REF" --out "$R/throughput_ref"
step explore_latency 90 "$PY" benchmarks/explore_latency.py --device "$DEV" --images 2 8 --clicks "$CLICKS" --out "$R/explore_latency_$DEV"
# torch flat search on the GPU (no FAISS here) over a real store: the one the throughput run wrote
for st in "$R/throughput_ref/store_p1" "$R/throughput_fp32/store_p1"; do [ -d "$st" ] && break; done
step index_flat_gpu 90 "$PY" benchmarks/index_scale.py real "$st" --kinds flat --queries 200 --out "$R/index_gpu"
step speed_gpu 200 "$PY" benchmarks/speed.py --set gpu --device "$DEV" ${SPEED_ARGS:-} --out "$R/speed_gpu.json"
step davis_fp32 60 "$PY" benchmarks/davis.py --davis-root "$SHARED/data/davis2016" --sequences blackswan,dog,car-shadow --max-frames 6 --weights "$W" --device "$DEV" --dtype float32 --quiet --out "$R/davis_fp32"
step davis_bf16 60 "$PY" benchmarks/davis.py --davis-root "$SHARED/data/davis2016" --sequences blackswan,dog,car-shadow --max-frames 6 --weights "$W" --device "$DEV" --dtype bfloat16 --quiet --out "$R/davis_bf16"
step davis_compare 30 "$PY" benchmarks/compare_masks.py "$R/davis_fp32" "$R/davis_bf16"
step cuda_tests 90 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_index.py tests/test_store.py -k "cuda or CUDA"
# keep the tables, not the stores
find "$R" -name 'store_p*' -prune -o -name 'inputs' -prune -o -name '*.npy' -prune -o -type f -print \
    | tar -czf "$OUT/results.tgz" -T - 2>/dev/null
echo "done in $SECONDS s" | tee -a "$LOG"
