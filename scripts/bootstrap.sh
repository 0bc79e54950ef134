#!/usr/bin/env bash
# Source this file (scripts/with-env.sh does) to get the audiohash stack ready in this shell:
#  - Debian packages: Java, libsndfile, fluidsynth and the two GM soundfonts (installed if missing);
#  - a virtualenv OUTSIDE the clone, keyed by a hash of pyproject.toml, holding the dependencies
#    (torch and pyspark weigh gigabytes: an unchanged pyproject.toml reuses it in seconds);
#  - the environment Spark needs: PYSPARK_PYTHON (the venv's python, for Python workers),
#    SPARK_CONF_DIR (conf/spark: Delta's jars for spark-submit), PYTHONPATH (this checkout's lib/).
# The project code itself is not installed into the venv: lib/ of the checkout is on PYTHONPATH,
# so several clones can share one venv.
set -euo pipefail
AUDIOHASH_HOME="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
APT_PACKAGES="openjdk-17-jre-headless libsndfile1 fluidsynth fluid-soundfont-gm timgm6mb-soundfont"
# The test command adds what only tests need (make test: the listening page's browser test drives
# Debian's headless chromium through its chromedriver).
APT_PACKAGES="$APT_PACKAGES ${AUDIOHASH_EXTRA_APT:-}"

_ah_missing_apt() {
  local missing=""
  for p in $APT_PACKAGES; do
    # Java may come from elsewhere (a JDK install): only require the Debian one when java is absent.
    if [ "$p" = openjdk-17-jre-headless ] && command -v java >/dev/null 2>&1; then continue; fi
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
  echo "$missing"
}

missing="$(_ah_missing_apt)"
if [ -n "$missing" ]; then
  echo "[setup] installing Debian packages:$missing" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >&2
fi

PYTHON="${AUDIOHASH_PYTHON:-python3}"
hash="$(sha256sum "$AUDIOHASH_HOME/pyproject.toml" | cut -c1-12)"
export AUDIOHASH_VENV="${AUDIOHASH_VENV_ROOT:-$HOME/.cache/audiohash}/venv-$hash"
if [ ! -f "$AUDIOHASH_VENV/.complete" ]; then
  echo "[setup] building $AUDIOHASH_VENV (first time for this pyproject.toml: about 5 minutes)" >&2
  rm -rf "$AUDIOHASH_VENV"
  "$PYTHON" -m venv "$AUDIOHASH_VENV"
  "$AUDIOHASH_VENV/bin/python" -m pip install -q --upgrade pip >&2
  # The dependencies and test extras from pyproject.toml, not the project (see above).
  "$AUDIOHASH_VENV/bin/python" - "$AUDIOHASH_HOME/pyproject.toml" > "$AUDIOHASH_VENV/requirements.txt" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["test"]))
PY
  "$AUDIOHASH_VENV/bin/python" -m pip install -q -r "$AUDIOHASH_VENV/requirements.txt" >&2
  touch "$AUDIOHASH_VENV/.complete"
else
  echo "[setup] reusing $AUDIOHASH_VENV" >&2
fi

export PATH="$AUDIOHASH_VENV/bin:$PATH"
export PYSPARK_PYTHON="$AUDIOHASH_VENV/bin/python"
export PYSPARK_DRIVER_PYTHON="$AUDIOHASH_VENV/bin/python"
export SPARK_CONF_DIR="$AUDIOHASH_HOME/conf/spark"
export PYTHONPATH="$AUDIOHASH_HOME/lib${PYTHONPATH:+:$PYTHONPATH}"

# The aisfx extractor's pretrained weights (CC BY 4.0, lib/audiohash/aisfx.py): the checkpoint
# and its wheel, fetched once with pip in hash-checking mode. Only presence is checked here (no
# Python start on every call); the loader checks the sha256 and names the fix when it differs.
# A failed fetch does not stop the other extractors: aisfx then fails with the instruction.
export AUDIOHASH_AISFX_DIR="${AUDIOHASH_AISFX_DIR:-$HOME/.cache/audiohash/aisfx-0.1.2}"
if [ ! -f "$AUDIOHASH_AISFX_DIR/checkpoint.pth" ] || [ ! -f "$AUDIOHASH_AISFX_DIR/aisfx-0.1.2-py2.py3-none-any.whl" ]; then
  echo "[setup] fetching the aisfx weights into $AUDIOHASH_AISFX_DIR" >&2
  "$AUDIOHASH_VENV/bin/python" -m audiohash.aisfx --fetch >&2 \
    || echo "[setup] WARNING: the aisfx weights could not be fetched; the aisfx extractor and its tests will fail until \`python -m audiohash.aisfx --fetch\` succeeds" >&2
fi
set +euo pipefail
