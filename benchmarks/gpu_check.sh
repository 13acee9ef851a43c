#!/usr/bin/env bash
# The GPU check: what to run, in under 8 minutes, whenever a machine with an NVIDIA GPU is at hand.
#
#   benchmarks/gpu_check.sh               # on the GPU machine, from the repository root or anywhere
#   benchmarks/gpu_check.sh --cpu-smoke   # the same stages on CPU: tiny model, a few steps (tests the script)
#
# It prints the card (nvidia-smi and torch), then, each stage under its own time limit, going on when one
# fails (its exit status is printed):
#   1. one training step of ViT-B@392, batch 16, bf16 and fp32: images/s   (benchmarks/gpu_check.py step)
#   2. a 1-GPU Ray Train run of 50 steps on the demo data (pipelines/train.py --gpu: the NCCL backend;
#      NCCL_DEBUG=INFO, and the NCCL version line is shown when NCCL started)
#   3. evaluate images/s of that run's checkpoint (pipelines/evaluate.py --gpu, metrics.json)
#   4. Serve p50 at concurrency 1 and 32, ViT-B@392 on one GPU replica       (benchmarks/gpu_check.py serve)
# Nothing is downloaded (random encoder weights). Everything it writes goes to a temporary folder,
# removed at the end; Ray is started and stopped by the stages themselves. The limits add up to 460 s;
# --cpu-smoke multiplies them by GPU_CHECK_LIMIT_SCALE (default 5: a shared CPU box is slow to start Ray).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[[ -x $PY ]] || PY=python3
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_TRAIN_ENABLE_PRINT_PATCH=0 RAY_USAGE_STATS_ENABLED=0 \
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5

case "${1:-}" in
  "") MODE=gpu MODEL=vit_b BATCH=16 STEPS=50 WARMUP=20 DEVICE_FLAG=--gpu GPUS=1 REQUESTS=256 SCALE=1 ;;
  --cpu-smoke) MODE=cpu-smoke MODEL=tiny BATCH=4 STEPS=4 WARMUP=1 DEVICE_FLAG= GPUS=0 REQUESTS=8
    SCALE=${GPU_CHECK_LIMIT_SCALE:-5} ;;
  *) echo "usage: $0 [--cpu-smoke]" >&2; exit 2 ;;
esac
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dinomaly-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
FAILED=()
started=$SECONDS

# stage NAME LIMIT_S COMMAND...: run it under a time limit, record a failure, never stop the script
stage() {
  local name=$1 limit=$(($2 * SCALE))
  shift 2
  echo
  echo "== $name (limit ${limit} s, at $((SECONDS - started)) s)"
  timeout --kill-after=30 "$limit" "$@"  # SIGTERM first: the stages stop their Ray before they exit
  local rc=$?
  if ((rc != 0)); then
    echo "!! $name: exit status $rc$( ((rc == 124)) && echo ' (time limit)')"
    FAILED+=("$name")
  fi
  return 0
}

echo "== mode $MODE, python $PY, $(date -u +%FT%TZ)"
if [[ $MODE == gpu ]]; then
  if ! nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; then
    echo "no NVIDIA GPU here (nvidia-smi failed); run with --cpu-smoke to test the script on CPU" >&2
    exit 1
  fi
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "device:",
    torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)")'

stage "1. one training step, $MODEL batch $BATCH, bf16 and fp32" 100 \
  "$PY" benchmarks/gpu_check.py step --model "$MODEL" --batch "$BATCH" --precisions bf16 fp32

"$PY" benchmarks/gpu_check.py data --work "$WORK" >/dev/null || FAILED+=("demo data")
stage "2. Ray Train, 1 worker, $STEPS steps ${DEVICE_FLAG:-(CPU, gloo)}" 150 bash -c '
  NCCL_DEBUG=INFO "$0" pipelines/train.py --config demo --data "$1/demo_data/manifest.parquet" --workers 1 $2 \
    --steps "$3" --name gpu-check --output "$1/run" --storage-path "$1/storage" \
    --set "train.warmup_steps=$4" --set train.log_every=10 \
    --set "tracking.tracking_uri=sqlite:///$1/mlflow.db" --set tracking.registered_model_name= \
    > "$1/train.log" 2>&1
  rc=$?
  grep -E "images/s|data wait|checkpoint:|^error" "$1/train.log" | tail -n 6
  ((rc == 0)) || tail -n 20 "$1/train.log"
  grep -m1 -o "NCCL version [^ ]*" "$1/train.log" || echo "(no NCCL version line in the log)"
  exit $rc' "$PY" "$WORK" "$DEVICE_FLAG" "$STEPS" "$WARMUP"

stage "3. evaluate the run's checkpoint ${DEVICE_FLAG}" 100 bash -c '
  "$0" pipelines/evaluate.py --model "$1/run/checkpoint" --data "$1/demo_data/manifest.parquet" \
    --output "$1/eval" $2 > "$1/evaluate.log" 2>&1 || { tail -n 20 "$1/evaluate.log"; exit 1; }
  "$0" -c "import json, sys; m = json.load(open(sys.argv[1]))
print(\"evaluate: %d images, %.1f images/s\" % (m[\"images\"], m[\"images_per_s\"]))" "$1/eval/metrics.json"
  ' "$PY" "$WORK" "$DEVICE_FLAG"

stage "4. Serve p50, $MODEL, concurrency 1 and 32" 110 \
  "$PY" benchmarks/gpu_check.py serve --model "$MODEL" --gpus "$GPUS" --concurrency 1 32 \
  --requests "$REQUESTS" --batch 16

echo
echo "== done in $((SECONDS - started)) s; failed: ${FAILED[*]:-none}"
((${#FAILED[@]} == 0))
