#!/usr/bin/env bash
# The demo end to end: render the GM dataset, then the four jobs through spark-submit.
# Usage (inside the environment, see Makefile): scripts/demo.sh [CONF_FILE] [KEY=VALUE ...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CONF="${1:-conf/local.yaml}"; shift || true
read -r DATASET_ROOT DATASET_SIZE DATASET_SEED DATASET_BANKS < <(python - "$CONF" "$@" <<'PY'
import sys
from audiohash.config import load_config
c = load_config(sys.argv[1], sys.argv[2:])
print(c.dataset_root, c.dataset.size, c.dataset.seed, ",".join(c.dataset.banks))
PY
)
declare -A took
stage() {  # stage NAME CMD...: run, time, remember
  local name="$1"; shift
  echo "==> $name: $*"
  local t0=$SECONDS
  "$@"
  took[$name]=$((SECONDS - t0))
}
small=""; [ "$DATASET_SIZE" = small ] && small="--small"
stage dataset python -m audiohash.dataset --out "$DATASET_ROOT" $small --seed "$DATASET_SEED" --banks "$DATASET_BANKS"
stage extract spark-submit jobs/extract.py --conf-file "$CONF" "$@"
stage train   spark-submit jobs/train.py   --conf-file "$CONF" "$@"
stage encode  spark-submit jobs/encode.py  --conf-file "$CONF" "$@"
stage query   spark-submit jobs/query.py   --conf-file "$CONF" "$@"
echo "==> wall time per stage (s): dataset ${took[dataset]}, extract ${took[extract]}, train ${took[train]}, encode ${took[encode]}, query ${took[query]}"
echo "==> see the runs: mlflow ui --backend-store-uri sqlite:///$(python -c "import sys; from audiohash.config import load_config; print(load_config(sys.argv[1]).tracking_uri.split(':///',1)[1])" "$CONF")"
