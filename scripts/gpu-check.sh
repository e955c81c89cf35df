#!/usr/bin/env bash
# The GPU check: on a machine with CUDA GPUs, run the tests marked `cuda` (layer equivalence on CUDA, every dispatch
# on NCCL against the unsharded layer, the strategy, host synchronisations per hop), then `hiermoe bench comm` and
# `hiermoe bench layer` on the GPUs, and write everything as JSON into one folder.
#
#   scripts/gpu-check.sh [OUT_DIR]        (default: ./gpu-check; PYTHON=... picks the interpreter)
#
# Needs torch with CUDA, lightning, torchmetrics, numpy, pyyaml and pytest (+ pytest-timeout) importable; the package
# itself is used from this checkout (PYTHONPATH), nothing is installed. Multi-rank cases need one GPU per rank (NCCL
# refuses two ranks on one device): on a single GPU they are skipped with that reason and the benchmarks run one
# rank. Exit status: non-zero when a test or a benchmark failed; the JSON files say which.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)') || GPUS=0
if [ "$GPUS" -lt 1 ]; then
    echo "gpu-check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False)" >&2
    exit 3
fi
# the benchmark topology: every GPU one rank; two "nodes" when there are at least four
if [ "$GPUS" -ge 4 ]; then TOPO="2x$((GPUS / 2))"; DISPATCHES="flat,2dh,hd1,hd2,auto"; else TOPO="$GPUS"; DISPATCHES="flat,hd1,auto"; fi
"$PY" - "$OUT_DIR/env.json" "$GPUS" "$TOPO" <<'PYEOF'
import json, sys, torch
import lightning
json.dump({"torch": torch.__version__, "cuda": torch.version.cuda, "lightning": lightning.__version__,
           "gpus": int(sys.argv[2]), "gpu": torch.cuda.get_device_name(0), "bench_topology": sys.argv[3],
           "nccl": ".".join(map(str, torch.cuda.nccl.version()))}, open(sys.argv[1], "w"), indent=2)
PYEOF

status=0
echo "== tests marked cuda"
"$PY" -m pytest -m cuda -q -p no:cacheprovider -rs --junitxml="$OUT_DIR/tests.xml" tests 2>&1 | tee "$OUT_DIR/tests.log" \
    || status=1

echo "== bench comm ($TOPO, $DISPATCHES)"
"$PY" -m hiermoe_lightning bench comm --device cuda --topology "$TOPO" --num-experts 16 --top-k 8 --hidden-size 4096 \
    --tokens-per-rank 4096 --dtype bf16 --dispatch "$DISPATCHES" --iters 20 --warmup 5 --timeout 240 --json \
    > "$OUT_DIR/bench_comm.json" 2> "$OUT_DIR/bench_comm.err" || status=1

echo "== bench layer ($TOPO, flat and hd1)"
for d in flat hd1; do
    "$PY" -m hiermoe_lightning bench layer --device cuda --topology "$TOPO" --dispatch "$d" --num-experts 16 \
        --top-k 8 --hidden-size 2048 --ffn-hidden-size 1408 --tokens-per-rank 4096 --dtype bf16 --iters 10 \
        --warmup 3 --timeout 240 --json > "$OUT_DIR/bench_layer_$d.json" 2> "$OUT_DIR/bench_layer_$d.err" || status=1
done
echo "gpu-check: results in $OUT_DIR (status $status)"
exit $status
