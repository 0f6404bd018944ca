#!/usr/bin/env bash
# Check a GPU machine (each command's step budgets add up to 8 minutes on an H100):
#   benchmarks/gpu_check.sh                 the GPU tests (in-process, then the ones that run scripts), then
#                                           benchmark.py on CUDA (models, layers, the epochs table under COMPILE=off
#                                           and graph), a profile of each model's step, the CIFAR-stem models and,
#                                           where the git history is there, the tuned layer of 6a669d7 beside the
#                                           einsum layer (docs/lambda-speed.md: which of its pieces a GPU step needs)
#   benchmarks/gpu_check.sh --compiled      torch.compile only, minutes of compiling, so a command of its own: the
#                                           compiled-step tests and the epochs table under reduce-overhead
#   add --cpu-dry-run                       the same steps, tiny, on the CPU: checks this script, not the GPU
# Writes benchmarks/results/<gpu name>/ (see docs/gpu.md): gpu_check.log (everything printed), summary.md (each
# step's result, time and budget, the tests' summaries, then the tables), the JUnit XML of each test step and the
# benchmarks' files; --compiled writes gpu_check-compiled.log and summary-compiled.md instead.
# A step that runs past its budget gets SIGINT (pytest then prints its summary and writes its XML; main_general.py
# stops before its next step), a second one 8 s later, SIGKILL 7 s after that; the next step still runs. After
# every step summary.md is rewritten and, with $OUT set, the results are copied there, so that a kill at any
# moment keeps what was measured. The exit status is the number of failed steps.
set -u
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python3}
DRY=0
COMPILED=0
for arg in "$@"; do
  case $arg in
    --cpu-dry-run) DRY=1 ;;
    --compiled) COMPILED=1 ;;
    *) echo "usage: benchmarks/gpu_check.sh [--compiled] [--cpu-dry-run]" >&2; exit 2 ;;
  esac
done
SCALE=$((DRY ? 5 : 1))  # a shared 2-core CPU is slow: the dry run gets 5 times the time
TOTAL_BUDGET=${GPU_CHECK_BUDGET_S:-$((480 * SCALE))}  # seconds for all steps together, kills included
GRACE=15  # seconds a step may run past its budget: 8 to the second SIGINT, 7 more to SIGKILL
START=$(date +%s)

if [ "$DRY" = 1 ]; then
  NAME=cpu-dry-run
else
  NAME=$($PYTHON -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-cuda")' 2>/dev/null || echo unknown-gpu)
fi
NAME=$(echo "$NAME" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9\n' '-' | sed 's/--*/-/g; s/^-//; s/-$//')
RESULTS=benchmarks/results/$NAME
if [ "$COMPILED" = 1 ]; then
  SUFFIX=-compiled
  FILES="gpu_check-compiled.log summary-compiled.md gpu-tests-compiled.xml compiled/benchmark.json compiled/benchmark.md"
else
  SUFFIX=""
  FILES="gpu_check.log summary.md gpu-tests.xml gpu-tests-runs.xml benchmark.json benchmark.md benchmark.png
         profile.md cifar-stem/benchmark.json cifar-stem/benchmark.md layer_versions.md"
fi
LOG=$RESULTS/gpu_check$SUFFIX.log
SUMMARY=$RESULTS/summary$SUFFIX.md
TIMED_OUT=$RESULTS/.step-timed-out
mkdir -p "$RESULTS/compiled" "$RESULTS/cifar-stem"
for file in $FILES; do rm -f "$RESULTS/$file"; done  # a file there afterwards is this run's
: > "$LOG"
FAILED=0
ROWS=""
TESTS=""
CURRENT=""  # process group of the running step
STOPPED=0  # gpu_check.sh itself got SIGINT or SIGTERM: the running step is stopped, the others skipped
trap 'STOPPED=1; [ -n "$CURRENT" ] && kill -INT -- "-$CURRENT" 2>/dev/null' INT TERM

# run_budgeted BUDGET COMMAND...: COMMAND's status. Job control (set -m) while the step and its watchdog start:
# each then runs in a process group of its own (the job's pid names it), with SIGINT not ignored (a background
# job of a script without job control ignores it, and Python then never raises KeyboardInterrupt)
run_budgeted() {
  local budget=$1 pid watchdog status
  shift
  rm -f "$TIMED_OUT"
  set -m
  "$@" >> "$LOG" 2>&1 < /dev/null &
  pid=$!
  CURRENT=$pid
  bash -c 'sleep "$1"; touch "$3"; kill -INT -- "-$2" 2>/dev/null || exit 0
           sleep 8; kill -INT -- "-$2" 2>/dev/null || exit 0; sleep 7; kill -KILL -- "-$2" 2>/dev/null' \
    watchdog "$budget" "$pid" "$TIMED_OUT" < /dev/null > /dev/null 2>&1 &
  watchdog=$!
  set +m
  wait "$pid"
  status=$?
  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; status=$?; done  # a trapped signal ended the wait early
  kill -KILL -- "-$pid" 2>/dev/null  # what the step left running (a worker of a killed pytest) holds the GPU
  kill -- "-$watchdog" 2>/dev/null
  wait "$watchdog" 2>/dev/null
  CURRENT=""
  return "$status"
}

# step NAME BUDGET_S COMMAND...: run it within its budget (and what is left of the total), its output to the
# log, its result to the summary; then rewrite the summary and copy the results to $OUT
step() {
  local name=$1 budget=$(($2 * SCALE)) started status elapsed left first verdict
  shift 2
  left=$((TOTAL_BUDGET - GRACE - ($(date +%s) - START)))
  [ "$left" -lt "$budget" ] && budget=$left
  if [ "$STOPPED" = 1 ] || [ "$budget" -le 5 ]; then
    verdict=$([ "$STOPPED" = 1 ] && echo "skipped (gpu_check.sh was stopped)" || echo "skipped (no time left)")
    echo "== $name: $verdict" | tee -a "$LOG"
    ROWS="$ROWS| $name | $verdict | 0 | $budget |\n"
    FAILED=$((FAILED + 1))
    finish_step
    return
  fi
  echo "== $name (at most ${budget} s): $*" | tee -a "$LOG"
  first=$(($(wc -l < "$LOG") + 1))
  started=$(date +%s)
  run_budgeted "$budget" "$@"
  status=$?
  elapsed=$(($(date +%s) - started))
  if [ -e "$TIMED_OUT" ]; then
    verdict="ran out of time (exit $status)"
  elif [ "$status" -eq 0 ]; then
    verdict=ok
  else
    verdict="failed (exit $status)"
  fi
  [ "$status" -ne 0 ] && FAILED=$((FAILED + 1))
  echo "== $name: $verdict after ${elapsed} s" | tee -a "$LOG"
  ROWS="$ROWS| $name | $verdict | $elapsed | $budget |\n"
  [ "$1" = "$PYTHON" ] && [ "${2:-}" = -m ] && [ "${3:-}" = pytest ] && TESTS="$TESTS$(test_results "$name" "$first")\n"
  finish_step
}

# test_results NAME FIRST_LINE: a pytest step's summary line, the test it was in when stopped, its failures
test_results() {
  local output
  output=$(tail -n +"$2" "$LOG")
  echo "- $1: $(echo "$output" | grep -E '^=+ .*[0-9]+ (passed|failed|skipped|deselected|errors?)' | tail -n 1 |
                sed 's/^=* *//; s/ *=*$//' | grep . || echo 'no pytest summary line (see the log)')"
  echo "$output" | grep -q "KeyboardInterrupt" &&
    echo "$output" | grep -oE '^tests/[^ ]+::[^ ]+' | tail -n 1 | sed 's/^/  - stopped in /'
  echo "$output" | grep -E '^(FAILED|ERROR) ' | head -n 30 | sed 's/^/  - /'
}

finish_step() {
  write_summary
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/compiled" "$OUT/cifar-stem"
    for file in $FILES; do
      [ -f "$RESULTS/$file" ] && cp "$RESULTS/$file" "$OUT/$file"
    done
  fi
}

write_summary() {
  local now=$(($(date +%s) - START))
  {
    echo "# benchmarks/gpu_check.sh$([ "$COMPILED" = 1 ] && echo " --compiled") on $NAME"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown),"\
         "$now s of a $TOTAL_BUDGET s budget; $FAILED step(s) failed. The log: $(basename "$LOG")."
    [ "${DONE:-0}" = 1 ] || echo "Not finished: the steps below the last row had not run when this was written."
    echo
    echo "| step | result | seconds | budget s |"
    echo "|---|---|---|---|"
    printf "%b" "$ROWS"
    if [ -n "$TESTS" ]; then
      echo
      echo "## GPU tests"
      echo
      printf "%b" "$TESTS"
    fi
    echo
    if [ "$COMPILED" = 1 ]; then
      grep -h -A 12 -E "^## Epochs" "$RESULTS/compiled/benchmark.md" 2>/dev/null
    else
      grep -h -A 12 -E "^## (Models|Epochs)" "$RESULTS/benchmark.md" "$RESULTS/cifar-stem/benchmark.md" 2>/dev/null
      [ -f "$RESULTS/layer_versions.md" ] && { echo; echo "## The tuned layer of 6a669d7 side by side"; echo;
        cat "$RESULTS/layer_versions.md"; }
    fi
  } > "$SUMMARY.tmp"
  mv "$SUMMARY.tmp" "$SUMMARY"
}

PYTEST=($PYTHON -m pytest -m gpu -v -rfEs -p no:cacheprovider)
RUN_TESTS="end_to_end or torchrun or quick_benchmark"  # the GPU tests that start main_general.py or benchmark.py
if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  SMALL=(--quick --iters 1 --warmup 0 --sizes 4 --batch-size 2 --num-threads 1 --epoch-train-size 8 --epoch-test-size 4)
  BENCH=("${SMALL[@]}" --epoch-compile off,graph)
  COMPILED_EPOCHS=("${SMALL[@]}" --skip-models --epoch-models baseline --epoch-compile graph)  # compiling on the CPU: minutes
  PROFILE=(--batch-size 2 --steps 1 --top 5 --num-threads 1)
  CIFAR=("${SMALL[@]}" --stem cifar --skip-epochs)
  VERSIONS=(--batch-size 2 --rounds 1 --num-threads 1)
else
  DEVICE=cuda
  BENCH=(--epoch-train-size 5000 --epoch-test-size 1000 --epoch-compile off,graph)
  COMPILED_EPOCHS=(--skip-models --sizes 8 --epoch-models baseline --epoch-train-size 5000 --epoch-test-size 1000
                   --epoch-compile reduce-overhead)
  PROFILE=(--steps 5)
  VERSIONS=(--batch-size 128 --rounds 5)
  CIFAR=(--stem cifar --skip-epochs --sizes 8 --iters 3)
fi

# budgets in seconds on an H100 (times SCALE); each command's add up to TOTAL_BUDGET - GRACE
step environment 20 $PYTHON -c 'import torch, platform; print("torch", torch.__version__, "CUDA", torch.version.cuda,
"python", platform.python_version()); ok = torch.cuda.is_available(); print("cuda available", ok);
ok and print(torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")'
if [ "$COMPILED" = 1 ]; then
  step gpu-tests-compiled 240 "${PYTEST[@]}" --junitxml="$RESULTS/gpu-tests-compiled.xml" -k compiled tests/test_gpu.py
  step compiled-epochs 200 $PYTHON benchmark.py --device $DEVICE --out "$RESULTS/compiled" "${COMPILED_EPOCHS[@]}"
else
  command -v nvidia-smi > /dev/null && step nvidia-smi 10 nvidia-smi
  step gpu-tests 150 "${PYTEST[@]}" --junitxml="$RESULTS/gpu-tests.xml" -k "not compiled and not ($RUN_TESTS)" tests/
  step gpu-tests-runs 90 "${PYTEST[@]}" --junitxml="$RESULTS/gpu-tests-runs.xml" -k "$RUN_TESTS" tests/test_gpu.py
  step benchmark 75 $PYTHON benchmark.py --device $DEVICE --out "$RESULTS" "${BENCH[@]}"
  step profile 30 $PYTHON benchmarks/profile_step.py --device $DEVICE --out "$RESULTS/profile.md" "${PROFILE[@]}"
  step cifar-stem 45 $PYTHON benchmark.py --device $DEVICE --out "$RESULTS/cifar-stem" "${CIFAR[@]}"
  # the network with the tuned layer that the einsum layer replaced (6a669d7) beside this tree's: needs the history
  if git rev-parse -q --verify 6a669d7^{commit} > /dev/null 2>&1; then
    step layer-versions 45 $PYTHON benchmarks/layer_versions.py --commit 6a669d7 --device $DEVICE \
      --positions absolute,relative,conv --out "$RESULTS/layer_versions.md" "${VERSIONS[@]}"
  else
    echo "== layer-versions: skipped, no git history here (6a669d7 not found)" | tee -a "$LOG"
    ROWS="$ROWS| layer-versions | skipped (no git history: 6a669d7 not found) | 0 | 0 |\n"
  fi
fi
DONE=1
finish_step
cat "$SUMMARY"
rm -f "$TIMED_OUT"
exit "$FAILED"
