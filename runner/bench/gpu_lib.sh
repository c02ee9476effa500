# Shared by gpu_smoke.sh and gpu_tables.sh (sourced, not run). The GPU slot is short and starts bare, so:
#   - install the wheels of ../shared/gpu/README.md from .whl when hydra is missing;
#   - every run is a `python3 run.py ...` with its own time cap, its stdout and stderr appended to one log
#     (TORCH_LOGS=recompiles,graph_breaks on), its results.json copied to $OUT/<name>/ even when it failed;
#   - a failed run does not stop the others: the script's exit code says whether any failed.
# Environment:
#   OUT        where results and the log go (the device tool's $OUT; default outputs/gpu/<script>)
#   GPU_TINY=1 tiny sizes on whatever device there is (the CPU test of these scripts)
#   GPU_DEADLINE_S seconds from the script's start after which no run may go on (default 330: a script stays
#              under 6 minutes whatever a compile costs; a run cut short is interrupted and records what it had)
#   GPU_CHECK=1 print each run's overrides (one line, tab-separated) instead of running it: the test composes
#              them and runs the pre-run checks, so no device minute is lost to a typo
set -uo pipefail
[ -n "${OUT:-}" ] && OUT=$(realpath -m "$OUT")  # relative to where the script was started, not the repo root
[ -n "${GPU_WORK:-}" ] && GPU_WORK=$(realpath -m "$GPU_WORK")
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
SCRIPT=$(basename "$0" .sh)
OUT=${OUT:-outputs/gpu/$SCRIPT}
WORK=${GPU_WORK:-outputs/gpu_runs/$SCRIPT}  # run directories (checkpoints stay here; only results.json travels)
LOG=$OUT/$SCRIPT.log
PY=${PY:-python3}
TINY=${GPU_TINY:-0}
CHECK=${GPU_CHECK:-0}
FAILED=0
DEADLINE=${GPU_DEADLINE_S:-$([ "$TINY" = 1 ] && echo 3600 || echo 330)}  # a 2-core CPU compiles slowly
DEVICE=$([ "$TINY" = 1 ] && echo auto || echo cuda)  # a GPU run must not quietly measure a CPU
export TORCH_LOGS=${TORCH_LOGS-recompiles,graph_breaks}
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

setup() {
  [ "$CHECK" = 1 ] && return 0
  mkdir -p "$OUT" "$WORK"
  : > "$LOG"
  if ! "$PY" -c "import hydra, omegaconf, datasets" 2>/dev/null; then
    [ -d .whl ] || { echo "hydra/datasets missing and no .whl folder (bash ../shared/gpu/fetch-wheels.sh .whl)" | tee -a "$LOG"; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 \
      || { echo "installing .whl failed (see $LOG)"; exit 2; }
    export PYTHONPATH=/tmp/site:$PWD
  fi
  echo "$SCRIPT $(date -u +%FT%TZ) tiny=$TINY" | tee -a "$LOG"
  "$PY" -m runner.bench.gpu_report versions "$OUT/versions.json" --require-cuda=$([ "$TINY" = 1 ] && echo 0 || echo 1) \
    2>&1 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "no CUDA device: these scripts are for the GPU machine (GPU_TINY=1 to try them here)"; exit 2; }
}

# step NAME SECONDS OVERRIDE...: one `python3 run.py OVERRIDE...` capped at SECONDS.
step() {
  local name=$1 cap=$2; shift 2
  if [ "$CHECK" = 1 ]; then
    printf '%s' "$name"; printf '\t%s' "$@"; printf '\n'
    return 0
  fi
  local dir=$WORK/$name start=$SECONDS rc left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "=== $name: skipped, the script's deadline (GPU_DEADLINE_S=$DEADLINE) is reached" | tee -a "$LOG"
    printf '%s\t%s\t%s\n' "$name" skipped 0 >> "$OUT/steps.tsv"
    FAILED=$((FAILED + 1))
    return 0
  fi
  [ "$TINY" = 1 ] && cap=$((cap * 5))  # the caps are for a GPU; tiny runs on a CPU compile slower than that
  [ "$cap" -gt "$left" ] && cap=$left
  rm -rf "$dir"
  echo "=== $name (cap ${cap}s): python3 run.py $*" | tee -a "$LOG"
  # SIGINT at the cap: the run records `interrupted` with what it measured so far (bench writes as it goes)
  timeout --signal=INT --kill-after=15 "$cap" "$PY" run.py "$@" logger=none "hydra.run.dir=$dir" >> "$LOG" 2>&1
  rc=$?
  mkdir -p "$OUT/$name"
  [ -f "$dir/results.json" ] && cp "$dir/results.json" "$OUT/$name/results.json"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$OUT/steps.tsv"
  echo "=== $name: exit $rc in $((SECONDS - start))s" | tee -a "$LOG"
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
}

finish() {
  [ "$CHECK" = 1 ] && exit 0
  "$PY" -m runner.bench.gpu_report summary "$OUT" 2>&1 | tee "$OUT/summary.md"
  [ "$FAILED" = 0 ] || { echo "$FAILED run(s) failed: see $LOG"; exit 1; }
}

# wants SECTION: whether the script's arguments select SECTION (no arguments: every section).
wants() {
  [ "${#SECTIONS[@]}" = 0 ] && return 0
  local s; for s in "${SECTIONS[@]}"; do [ "$s" = "$1" ] && return 0; done
  return 1
}
