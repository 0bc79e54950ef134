#!/usr/bin/env bash
# spark-submit with a quiet console, for local runs (make demo uses it):
#   scripts/submit.sh [spark-submit options] jobs/<job>.py [job options and KEY=VALUE overrides]
# The arguments are spark-submit's. Every start of spark-submit resolves spark.jars.packages
# (Delta's jars, conf/spark/spark-defaults.conf) with Ivy, which prints its resolution report
# (about 50 lines) to stderr and has no option to keep it quiet; this wrapper moves that report
# and the JVM's incubator-module notice into the run's log file (named by conf/spark/spark-env.sh,
# where Spark's INFO and the job's own INFO go too) and passes every other line through. With
# --verbose (the job's option, or spark-submit's) it runs spark-submit untouched.
set -euo pipefail
SPARK_CONF_DIR="${SPARK_CONF_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../conf/spark" && pwd)}"
source "$SPARK_CONF_DIR/spark-env.sh"  # exports AUDIOHASH_LOG_FILE, the same name spark-submit's JVM gets
SUBMIT="${SPARK_HOME:+$SPARK_HOME/bin/}spark-submit"
case " $* " in *" --verbose "*) exec "$SUBMIT" "$@" ;; esac
mkdir -p "$(dirname "$AUDIOHASH_LOG_FILE")"

# Ivy's report: from its first line to the "N artifacts copied, M already retrieved" line (or a
# Java exception, which stays on the console). Read line by line as they come: mawk would hold
# them back until the end.
quiet_ivy() {
  local line ivy=0
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
      ":: loading settings ::"* | "Ivy Default Cache set to:"*) ivy=1 ;;
      "Exception in thread"*) ivy=0 ;;
    esac
    if [ "$ivy" = 1 ] || [ "$line" = "WARNING: Using incubator modules: jdk.incubator.vector" ]; then
      printf '%s\n' "$line" >> "$AUDIOHASH_LOG_FILE"
      case "$line" in *" artifacts copied, "*" already retrieved"*) ivy=0 ;; esac
    else
      printf '%s\n' "$line" >&2
    fi
  done
}

status=0
# stdout (the job's output) passes as it is; stderr goes through the filter.
{ "$SUBMIT" "$@" 2>&1 1>&3 3>&- | quiet_ivy; } 3>&1 || status=$?
# Exit 2 is the job's own error, whose message already names the log file.
if [ "$status" -ne 0 ] && [ "$status" -ne 2 ]; then
  echo "submit: spark-submit exited $status; the full log: $AUDIOHASH_LOG_FILE" >&2
fi
exit "$status"
