#!/usr/bin/env bash
# The whole GPU job: every measurement the project makes on one GPU, and the paper's table at
# full size, packed into one archive of at most 16 MiB.
#
#   bash benchmarks/gpu_job.sh [--tiny] [--redo] [STEP ...]      (default: every step, in order)
#
# Steps (each resumable; a finished step is skipped when the job runs again, --redo repeats it):
#   tests    pytest -m gpu: bf16 autocast, channels_last, torch.compile, the --jobs auto probe,
#            GPU system metrics, the benchmark on CUDA
#   bench    benchmarks/gpu.py: alexnet at 227 (two towers and one, batch 128/256, eager and
#            compiled), the plain fp32 loop, torchvision's alexnet, the blog loop, a CIFAR-10
#            epoch of convnet4 and alexnet_cifar through the data path; TFLOP/s and MFU
#   packing  benchmarks/gpu_packing.py: aggregate images/s with 1, 2, 4, 8 cells at once, and
#            the paper grid's epochs that fit PAPER_BUDGET (written to STATE/plan.env)
#   sweep    ablate sweep relu_vs_tanh: a learning rate for ReLU and one for tanh (Section 3.1;
#            no weight decay, as Figure 1's nets have no regularization)
#   paper    ablate run paper --tuned: every claim's ablation on the whole CIFAR-10 training set
#            (validation carved from it), full width, SEEDS seeds; cells shared by several
#            ablations train once; relu_vs_tanh at its tuned rates, the others as configured
#   reports  ablate report paper, and the report of each ablation it includes (nine)
#   pack     OUT/gpu-job-results.tar.gz: the MLflow and Optuna databases (no artifacts: no
#            checkpoints or weights; the reports need only the database), reports/ with their
#            figures, results/ (RESULTS.md with every new fragment in place, the fragments,
#            timings, the test results) and the end of each step's log
#
# Where things go: STATE (default .gpu-job/, ignored by git) holds the store (STATE/mlruns),
# the decoded-data cache, the reports, results/ and logs/ of every step; it survives between
# commands on one machine, so the steps can run as separate commands. OUT (default STATE/out)
# receives the archive. To use the results elsewhere: tar xzf gpu-job-results.tar.gz, copy
# reports/ into the project's reports/, take results/RESULTS.md's fragments into
# benchmarks/RESULTS.md, and `ablate report NAME --tracking-uri sqlite:///$PWD/mlruns/mlflow.db`
# reads the runs again.
#
# A machine without network: the project runs from this source tree (PYTHONPATH), with the
# machine's own torch and torchvision; the other runtime requirements come from .gpu/wheels
# (installed into SITE, default /tmp/site, when not importable) and the CIFAR-10 training
# images from .gpu/cifar10.tar.gz (extracted into DATA, default /tmp/cifar10, train/<class>/).
#
# Time (one H100/H200, each command at most 10 minutes, 30 minutes of device time in all).
# From the targets: an alexnet_cifar epoch (45,000 images) <= 3 s alone, a convnet4 one <= 1 s.
#   tests ~3 min; bench ~4-6 min (four torch.compile rows, the first decode of 50,000 JPEGs);
#   packing ~2 min (2 models x 4 packings, 6 s each, plus process start-up); then step 4,
#   the paper table, <= 10 min: sweep SWEEP_SECONDS (150 s; convnet4 trials stop at 25%
#   training error or EPOCHS, TRIALS per arm, SWEEP_JOBS at once), paper PAPER_BUDGET (330 s)
#   of packed training plus ~1.5 min of process start-up, logging and ensembles, reports ~1 min.
#   The paper grid at 3 seeds is 42 distinct cells, 36 of them alexnet_cifar (the base cell is
#   shared by eight ablations and trained once): one epoch of all of them is 36 x 3 s = 108 s
#   alone, ~40-55 s packed 2-3x on the device, so 330 s hold ~6-8 epochs. The packing step
#   measures the real aggregate and writes the epochs that fit to
#   STATE/plan.env; the sweep step reads it (else EPOCHS=6) and records what it used in
#   STATE/epochs, which the paper step reads: --tuned finds a sweep by its configuration, so
#   both must train the same number of epochs. EPOCHS in the environment overrides both.
#   SEEDS=5 where time allows (about 5/3 the paper step).
# Suggested commands, each under 10 minutes, one after another while the machine is warm:
# `tests packing` (~5 min), `bench` (~5 min), `sweep paper` (~8-9 min), `reports pack`.
# JOB_LIMIT (540 s) bounds one invocation: a step still running then is stopped (a grid's
# finished cells are kept and a sweep's trials too) and the later steps wait: run the same
# command again (finished steps are skipped). paper needs a finished sweep, reports a finished
# paper grid.
#
# --tiny: the same job on a CPU in minutes, as its test does: a generated folder of 300 images,
# --quick widths, one epoch, two seeds, two trials per arm.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE=full REDO=0 STEPS=()
ALL_STEPS=(tests bench packing sweep paper reports pack)
for arg in "$@"; do
  case $arg in
    --tiny) SIZE=tiny ;;
    --redo) REDO=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    all) STEPS+=("${ALL_STEPS[@]}") ;;
    tests|bench|packing|sweep|paper|reports|pack) STEPS+=("$arg") ;;
    *) echo "error: unknown argument '$arg'; steps: ${ALL_STEPS[*]}, or --tiny, --redo" >&2
       exit 2 ;;
  esac
done
[ ${#STEPS[@]} -gt 0 ] || STEPS=("${ALL_STEPS[@]}")

STATE=$(mkdir -p "${STATE:-$ROOT/.gpu-job}" && cd "${STATE:-$ROOT/.gpu-job}" && pwd)
OUT=${OUT:-$STATE/out}
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
JOB_LIMIT=${JOB_LIMIT:-540}
STARTED=$(date +%s)
if [ "$SIZE" = tiny ]; then
  DATA=${DATA:-$STATE/tiny-data}
  SEEDS=${SEEDS:-2} TRIALS=${TRIALS:-2} SWEEP_JOBS=${SWEEP_JOBS:-1}
  SWEEP_SECONDS=${SWEEP_SECONDS:-300} PAPER_BUDGET=${PAPER_BUDGET:-60} EPOCHS=${EPOCHS:-1}
  QUICK=(--quick)
  # One thread each: a CPU shared with other work slows a two-thread run ten times over.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  DATA=${DATA:-/tmp/cifar10}
  SEEDS=${SEEDS:-3} TRIALS=${TRIALS:-8} SWEEP_JOBS=${SWEEP_JOBS:-4}
  SWEEP_SECONDS=${SWEEP_SECONDS:-150} PAPER_BUDGET=${PAPER_BUDGET:-330}
  QUICK=()
fi
RESULTS=$STATE/results
mkdir -p "$RESULTS" "$STATE/logs" "$STATE/done" "$STATE/mlruns" "$OUT"
export ALEXNET_CACHE=$STATE/cache MPLBACKEND=Agg PYTHONUNBUFFERED=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset MLFLOW_TRACKING_URI  # the job's store is STATE/mlruns, whatever the shell says

say() { echo "[gpu-job $(date -u +%H:%M:%S)] $*"; }
die() { echo "error: $*" >&2; exit 2; }

# --- the environment: requirements and data ------------------------------------------------
if ! "$PYTHON" -c "import mlflow, optuna, pydantic, typer" 2>/dev/null; then
  if PYTHONPATH="$SITE:$PYTHONPATH" "$PYTHON" -c "import mlflow, optuna, pydantic" 2>/dev/null
  then :
  elif compgen -G "$ROOT/.gpu/wheels/*.whl" >/dev/null; then
    say "installing the runtime requirements from .gpu/wheels into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$ROOT"/.gpu/wheels/*.whl
  else
    die "mlflow, optuna and pydantic are not importable and there is no .gpu/wheels/ to install them from"
  fi
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi
if [ "$SIZE" = tiny ]; then
  "$PYTHON" "$ROOT/benchmarks/gpu_job.py" tiny-data "$DATA"
elif [ ! -d "$DATA/train" ]; then
  [ -f "$ROOT/.gpu/cifar10.tar.gz" ] || die "no CIFAR-10 images at $DATA/train and no .gpu/cifar10.tar.gz; set DATA"
  say "extracting .gpu/cifar10.tar.gz into $DATA"
  mkdir -p "$DATA" && tar xzf "$ROOT/.gpu/cifar10.tar.gz" -C "$DATA"
fi
[ -f "$RESULTS/RESULTS.md" ] || cp "$ROOT/benchmarks/RESULTS.md" "$RESULTS/RESULTS.md"

epochs() {  # the environment's, else the sweep's, else the packing step's plan, else 6
  if [ -n "${EPOCHS:-}" ]; then echo "$EPOCHS"
  elif [ -f "$STATE/epochs" ]; then cat "$STATE/epochs"
  elif [ -f "$STATE/plan.env" ]; then sed -n 's/^EPOCHS=//p' "$STATE/plan.env"
  else echo 6; fi
}
DATA_ARGS=("${QUICK[@]}" --dataset imagefolder --data-root "$DATA")
ablate() { (cd "$STATE" && limited "$PYTHON" -m alexnet "$@"); }

# Every command of a step runs under what is left of the step's time: the job's limit.
limited() {
  local left=$((STARTED + JOB_LIMIT - $(date +%s)))
  [ "$left" -gt 5 ] || { echo "no time left in JOB_LIMIT=${JOB_LIMIT}s" >&2; return 124; }
  timeout --signal=TERM --kill-after=30 "$left" "$@"
}

# --- the steps ---------------------------------------------------------------------------------
step_tests() {
  (cd "$ROOT" && limited "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider \
     --junitxml="$RESULTS/pytest-gpu.xml" tests)
}

step_bench() {
  local size=()
  [ "$SIZE" = tiny ] && size=(--quick --device cpu --no-compile --steps 1 --threads 1)
  limited "$PYTHON" "$ROOT/benchmarks/gpu.py" "${size[@]}" --data-root "$DATA" \
    --write-results --results-file "$RESULTS/RESULTS.md" --out "$RESULTS/gpu-benchmark.md"
}

step_packing() {
  local size=()
  [ "$SIZE" = tiny ] && size=(--quick --device cpu)
  limited "$PYTHON" "$ROOT/benchmarks/gpu_packing.py" "${size[@]}" --data-root "$DATA" \
    --write-results --results-file "$RESULTS/RESULTS.md" --out "$RESULTS/gpu-packing.md" \
    --plan-seeds "$SEEDS" --plan-budget "$PAPER_BUDGET" --plan-file "$STATE/plan.env"
}

step_sweep() {
  epochs > "$STATE/epochs"  # what the paper grid must use too
  ablate sweep relu_vs_tanh "${DATA_ARGS[@]}" --epochs "$(epochs)" --trials "$TRIALS" \
    --jobs "$SWEEP_JOBS" --wd-range off --timeout "$SWEEP_SECONDS"
}

step_paper() {
  # No per-epoch checkpoints: a GPU epoch takes seconds and a checkpoint of alexnet_cifar
  # (weights and momentum, 240 MB) a sizeable part of one; a cell stopped by the time limit
  # starts again. runtime.* is not part of a cell's key.
  ablate run paper --tuned "${DATA_ARGS[@]}" --epochs "$(epochs)" --seeds "$SEEDS" \
    --jobs "${JOBS:-auto}" --set runtime.checkpoint=false
}

step_reports() {
  local name
  mkdir -p "$STATE/reports"
  for name in paper $("$PYTHON" "$ROOT/benchmarks/gpu_job.py" members paper); do
    ablate report "$name" --out reports
  done
  if [ "$SIZE" = full ]; then
    "$PYTHON" "$ROOT/benchmarks/gpu_job.py" check-reports "$STATE/reports" \
      | tee "$RESULTS/report-check.txt" || say "warning: see $RESULTS/report-check.txt"
  fi
}

step_pack() {
  "$PYTHON" "$ROOT/benchmarks/gpu_job.py" summary "$STATE" "$SIZE"
  "$PYTHON" "$ROOT/benchmarks/gpu_job.py" pack "$STATE" "$OUT/gpu-job-results.tar.gz"
}

# --- running them ----------------------------------------------------------------------------
echo "size=$SIZE epochs=$(epochs) seeds=$SEEDS sweep: $TRIALS trials per arm, $SWEEP_JOBS at once, ${SWEEP_SECONDS}s; paper budget ${PAPER_BUDGET}s; data $DATA" \
  > "$RESULTS/settings.txt"
[ -f "$RESULTS/times.tsv" ] || printf 'step\tstarted\tseconds\texit\n' > "$RESULTS/times.tsv"
declare -A NEEDS=([paper]=sweep [reports]=paper)
for step in "${STEPS[@]}"; do
  if [ -e "$STATE/done/$step" ] && [ "$REDO" = 0 ]; then
    say "$step: finished before; skipped (--redo runs it again)"
    continue
  fi
  need=${NEEDS[$step]:-}
  if [ -n "$need" ] && [ ! -e "$STATE/done/$need" ]; then
    size_flag=""; [ "$SIZE" = tiny ] && size_flag="--tiny "
    say "$step: waits for $need, which has not finished; run: bash $0 $size_flag$need $step"
    exit 3
  fi
  say "$step: starting ($(cat "$RESULTS/settings.txt"))"
  t0=$(date +%s.%N)
  set +e
  ( set -e; "step_$step" ) 2>&1 | tee -a "$STATE/logs/$step.log"
  rc=${PIPESTATUS[0]}
  set -e
  seconds=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\t%s\n' "$step" "$(date -u -d "@${t0%.*}" +%FT%TZ)" "$seconds" "$rc" \
    >> "$RESULTS/times.tsv"
  if [ "$rc" != 0 ]; then
    say "$step: stopped after ${seconds}s (exit $rc); run the same command again to go on from here"
    exit "$rc"
  fi
  touch "$STATE/done/$step"
  say "$step: done in ${seconds}s"
done
