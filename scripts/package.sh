#!/usr/bin/env bash
# Zip the project code (lib/audiohash, pure Python) for shipping to a Spark cluster:
#   scripts/package.sh [OUT]          (default: dist/audiohash.zip; `make package` runs this)
#   spark-submit --py-files dist/audiohash.zip jobs/query.py ...
# spark-submit puts the zip on the driver's sys.path and ships it to every executor, which adds
# it to its Python workers' sys.path: the cluster needs no copy of this checkout. Third-party
# packages (torch, faiss, pyspark, delta-spark, ...) are not in the zip; see README, "Running on
# a cluster". The zip is reproducible: sorted entries, fixed timestamps, no __pycache__.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/dist/audiohash.zip}"
PYTHON="${AUDIOHASH_VENV:+$AUDIOHASH_VENV/bin/python}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$(dirname "$OUT")"
"$PYTHON" - "$ROOT/lib" "$OUT" <<'PY'
import os, sys, zipfile
lib, out = sys.argv[1], sys.argv[2]
files = sorted(
    os.path.relpath(os.path.join(folder, name), lib)
    for folder, dirs, names in os.walk(os.path.join(lib, "audiohash"))
    if "__pycache__" not in folder
    for name in names if not name.endswith((".pyc", ".pyo"))
)
tmp = out + ".tmp"
with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
    for rel in files:
        info = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16
        with open(os.path.join(lib, rel), "rb") as fh:
            zf.writestr(info, fh.read())
os.replace(tmp, out)
print(f"{out}: {len(files)} files from {lib}/audiohash")
PY
