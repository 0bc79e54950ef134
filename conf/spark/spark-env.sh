# Sourced by Spark's launch scripts (spark-submit, spark-class, pyspark's JVM start) before the
# JVM starts, when SPARK_CONF_DIR points here; scripts/submit.sh sources it too. It names the
# run's log file, which log4j2.properties (Spark's INFO) and audiohash.cli (the job's own INFO)
# both append to: $AUDIOHASH_LOG_FILE if already set, else
# $AUDIOHASH_LOG_DIR (default ./logs)/<application>-<UTC time>.log, <application> being the
# submitted script's name (jobs/extract.py: extract) or "spark". A --verbose anywhere on the
# command line (spark-submit's or the job's) shows Spark's INFO on the console too.
if [ -z "${AUDIOHASH_LOG_FILE:-}" ]; then
  _ah_app=spark _ah_prev=
  for _ah_arg in "$@"; do
    case "$_ah_arg" in
      *.py) if [ "$_ah_prev" != --py-files ]; then _ah_app="$(basename "$_ah_arg" .py)"; break; fi ;;
    esac
    _ah_prev="$_ah_arg"
  done
  export AUDIOHASH_LOG_FILE="${AUDIOHASH_LOG_DIR:-$PWD/logs}/$_ah_app-$(date -u +%Y%m%dT%H%M%SZ).log"
  unset _ah_app _ah_prev _ah_arg
fi
case " $* " in
  *" --verbose "*) export AUDIOHASH_CONSOLE_LEVEL="${AUDIOHASH_CONSOLE_LEVEL:-INFO}" ;;
esac
