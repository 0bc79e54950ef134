#!/usr/bin/env bash
# The demo end to end: render the GM dataset, then the four jobs through spark-submit
# (scripts/submit.sh). The console gets each stage's summary, the wall times, mAP@all and how to
# open the listening page; Spark's, Ivy's and the jobs' INFO lines go to one log file per stage
# under $AUDIOHASH_LOG_DIR (default: logs/). --verbose among the arguments shows them all.
# Usage (inside the environment, see Makefile): scripts/demo.sh [CONF_FILE] [KEY=VALUE ...] [--verbose]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CONF="${1:-conf/local.yaml}"; shift || true
export AUDIOHASH_LOG_DIR="${AUDIOHASH_LOG_DIR:-$PWD/logs}"
overrides=(); verbose=""
for arg in "$@"; do
  if [ "$arg" = --verbose ]; then verbose=1; else overrides+=("$arg"); fi
done
jobs_args=("${overrides[@]}" ${verbose:+--verbose})
# Spark's progress bar redraws one line on a terminal; into a file it would pile up.
[ -t 2 ] || jobs_args=(spark.show_progress=false "${jobs_args[@]}")
read -r DATASET_ROOT DATASET_SIZE DATASET_SEED DATASET_BANKS TRACKING_URI < <(python - "$CONF" "${overrides[@]}" <<'PY'
import sys
from audiohash.config import load_config
c = load_config(sys.argv[1], sys.argv[2:])
print(c.dataset_root, c.dataset.size, c.dataset.seed, ",".join(c.dataset.banks), c.tracking_uri)
PY
)
OUT="$(mktemp -d)"; trap 'rm -rf "$OUT"' EXIT
echo "==> audiohash demo ($CONF): each stage's summary below; the full logs in $AUDIOHASH_LOG_DIR/"

declare -A took
stage() {  # stage NAME CMD...: run (its output also kept in $OUT/NAME), time, remember; stop on failure
  local name="$1"; shift
  local t0=$SECONDS
  if ! "$@" | tee "$OUT/$name"; then
    echo "==> the $name stage failed (above: its error; the logs: $AUDIOHASH_LOG_DIR/)" >&2
    exit 1
  fi
  took[$name]=$((SECONDS - t0))
}
dataset() {  # the dataset module logs its progress to stderr: into a log file unless --verbose
  [ -n "$verbose" ] && { python -m audiohash.dataset "$@"; return; }
  local log; log="$AUDIOHASH_LOG_DIR/dataset-$(date -u +%Y%m%dT%H%M%SZ).log"
  mkdir -p "$AUDIOHASH_LOG_DIR"
  if ! python -m audiohash.dataset "$@" 2>"$log" | sed 's/^/dataset: /'; then
    grep -E "^error: |Error" "$log" | tail -n 3 >&2 || true
    echo "(the full log: $log)" >&2
    return 1
  fi
}
small=""; [ "$DATASET_SIZE" = small ] && small="--small"
stage dataset dataset --out "$DATASET_ROOT" $small --seed "$DATASET_SEED" --banks "$DATASET_BANKS"
for job in extract train encode query; do
  stage "$job" scripts/submit.sh "jobs/$job.py" --conf-file "$CONF" "${jobs_args[@]}"
done
echo "==> wall time per stage (s): dataset ${took[dataset]}, extract ${took[extract]}, train ${took[train]}, encode ${took[encode]}, query ${took[query]}"
case "$TRACKING_URI" in
  sqlite:*) echo "==> the runs: mlflow ui --backend-store-uri $TRACKING_URI" ;;
  *) echo "==> the runs: $TRACKING_URI" ;;
esac
map="$(grep -o 'map_all=[0-9.]*' "$OUT/query" | tail -n 1 | cut -d= -f2)"
echo "==> mAP@all ${map:-?}: $(grep -o '^query: [^:]*' "$OUT/query" | tail -n 1 | cut -c8-)"
echo "==> listen: scripts/with-env.sh python -m audiohash.serve --conf-file $CONF${overrides[*]:+ ${overrides[*]}}, then open http://127.0.0.1:8765/"
