#!/usr/bin/env bash
# Check a GPU machine in one command (at most 7 minutes on an H100):
#   benchmarks/gpu_check.sh                 the GPU test suite, then benchmark.py on CUDA: models, layers,
#                                           and the epochs table under COMPILE=off, graph and reduce-overhead;
#                                           a profile of each model's step; the CIFAR-stem models
#   benchmarks/gpu_check.sh --cpu-dry-run   the same steps, tiny, on the CPU: checks this script, not the GPU
# Writes benchmarks/results/<gpu name>/: gpu_check.log (everything printed), summary.md (each step's
# exit status and time, then the tables), benchmark.json/.md/.png, compiled/benchmark.json/.md,
# profile.md (benchmarks/profile_step.py), cifar-stem/benchmark.json/.md and, where the git history
# is there, layer_versions.md (benchmarks/layer_versions.py against the layer before issue 12).
# A step that fails or runs past its time budget is logged and the next one still runs; the exit
# status is the number of failed steps. With $OUT set, the results are copied there too.
set -u
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python3}
DRY=0
[ "${1:-}" = "--cpu-dry-run" ] && DRY=1
SCALE=$((DRY ? 5 : 1))  # a shared 2-core CPU is slow: the dry run gets 5 times the time
TOTAL_BUDGET=${GPU_CHECK_BUDGET_S:-$((420 * SCALE))}  # seconds for all steps together
START=$(date +%s)

if [ "$DRY" = 1 ]; then
  NAME=cpu-dry-run
else
  NAME=$($PYTHON -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-cuda")' 2>/dev/null || echo unknown-gpu)
fi
NAME=$(echo "$NAME" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9\n' '-' | sed 's/--*/-/g; s/^-//; s/-$//')
RESULTS=benchmarks/results/$NAME
mkdir -p "$RESULTS/compiled" "$RESULTS/cifar-stem"
LOG=$RESULTS/gpu_check.log
SUMMARY=$RESULTS/summary.md
: > "$LOG"
FAILED=0
ROWS=""

# step NAME BUDGET_S COMMAND...: run it under `timeout`, its output to the log, its status to the summary
step() {
  local name=$1 budget=$(($2 * SCALE)) started status elapsed left
  shift 2
  left=$((TOTAL_BUDGET - ($(date +%s) - START)))
  [ "$left" -lt "$budget" ] && budget=$left
  if [ "$budget" -le 5 ]; then
    echo "== $name: skipped, the time budget is spent" | tee -a "$LOG"
    ROWS="$ROWS| $name | skipped (no time left) | 0 |\n"
    FAILED=$((FAILED + 1))
    return
  fi
  echo "== $name (at most ${budget} s): $*" | tee -a "$LOG"
  started=$(date +%s)
  timeout --kill-after=10 "$budget" "$@" >> "$LOG" 2>&1
  status=$?
  elapsed=$(($(date +%s) - started))
  case $status in
    0) verdict=ok ;;
    124|137) verdict="timed out (exit $status)" ;;
    *) verdict="failed (exit $status)" ;;
  esac
  [ "$status" -ne 0 ] && FAILED=$((FAILED + 1))
  echo "== $name: $verdict after ${elapsed} s" | tee -a "$LOG"
  ROWS="$ROWS| $name | $verdict | $elapsed |\n"
}

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  SMALL=(--quick --iters 1 --warmup 0 --sizes 4 --batch-size 2 --num-threads 1 --epoch-train-size 8 --epoch-test-size 4)
  BENCH=("${SMALL[@]}" --epoch-compile off,graph)
  COMPILED=("${SMALL[@]}" --skip-models --epoch-models baseline --epoch-compile graph)  # no compile on the CPU: minutes
  PROFILE=(--batch-size 2 --steps 1 --top 5 --num-threads 1)
  CIFAR=("${SMALL[@]}" --stem cifar --skip-epochs)
  VERSIONS=(--batch-size 2 --rounds 1 --num-threads 1)
else
  DEVICE=cuda
  BENCH=(--epoch-train-size 5000 --epoch-test-size 1000 --epoch-compile off,graph)
  COMPILED=(--skip-models --sizes 8 --epoch-models baseline --epoch-train-size 5000 --epoch-test-size 1000
            --epoch-compile reduce-overhead)
  PROFILE=(--steps 5)
  VERSIONS=(--batch-size 128 --rounds 5)
  CIFAR=(--stem cifar --skip-epochs --sizes 8 --iters 3)
fi

step environment 30 $PYTHON -c 'import torch, platform; print("torch", torch.__version__, "CUDA", torch.version.cuda,
"python", platform.python_version()); ok = torch.cuda.is_available(); print("cuda available", ok);
ok and print(torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")'
command -v nvidia-smi > /dev/null && step nvidia-smi 15 nvidia-smi
step gpu-tests 150 $PYTHON -m pytest -m gpu -q -rs -p no:cacheprovider tests/
TESTS=$(tail -n 20 "$LOG" | grep -E "[0-9]+ (passed|failed|skipped|errors?)" | tail -n 1)
step benchmark 150 $PYTHON benchmark.py --device $DEVICE --out "$RESULTS" "${BENCH[@]}"
step profile 45 $PYTHON benchmarks/profile_step.py --device $DEVICE --out "$RESULTS/profile.md" "${PROFILE[@]}"
step compiled-epochs 90 $PYTHON benchmark.py --device $DEVICE --out "$RESULTS/compiled" "${COMPILED[@]}"
step cifar-stem 75 $PYTHON benchmark.py --device $DEVICE --out "$RESULTS/cifar-stem" "${CIFAR[@]}"
# the network with the layer before issue 12 (0baa330) beside this tree's: needs the git history
if git rev-parse -q --verify 0baa330^{commit} > /dev/null 2>&1; then
  step layer-versions 60 $PYTHON benchmarks/layer_versions.py --commit 0baa330 --device $DEVICE \
    --positions absolute,relative,conv --out "$RESULTS/layer_versions.md" "${VERSIONS[@]}"
else
  echo "== layer-versions: skipped, no git history here (0baa330 not found)" | tee -a "$LOG"
fi

{
  echo "# benchmarks/gpu_check.sh on $NAME"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown),"\
       "$(($(date +%s) - START)) s in all; $FAILED step(s) failed. The log: gpu_check.log."
  echo
  echo "GPU tests: ${TESTS:-no pytest summary line (see the log)}"
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---|"
  printf "%b" "$ROWS"
  echo
  grep -h -A 12 -E "^## (Models|Epochs)" "$RESULTS/benchmark.md" "$RESULTS/compiled/benchmark.md" \
    "$RESULTS/cifar-stem/benchmark.md" 2>/dev/null
  [ -f "$RESULTS/layer_versions.md" ] && { echo; echo "## The layer before issue 12 (0baa330) side by side"; echo;
    cat "$RESULTS/layer_versions.md"; }
} > "$SUMMARY"
cat "$SUMMARY"

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/compiled" "$OUT/cifar-stem"
  for file in gpu_check.log summary.md benchmark.json benchmark.md benchmark.png compiled/benchmark.json \
      compiled/benchmark.md profile.md cifar-stem/benchmark.json cifar-stem/benchmark.md layer_versions.md; do
    [ -f "$RESULTS/$file" ] && cp "$RESULTS/$file" "$OUT/$file"
  done
fi
exit "$FAILED"
