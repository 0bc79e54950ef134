"""What every job shares: ``--conf-file`` plus ``key=value`` overrides, logging, clean errors."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

from audiohash.config import Config, load_config
from audiohash.errors import AudiohashError

OVERRIDES_HELP = "config overrides as section.key=value, e.g. train.bits=32 model.version=3 spark.master=local[2]"
# The run's log file and Spark's console level, shared with the JVM through the environment:
# conf/spark/spark-env.sh sets them before spark-submit's JVM starts (and this process inherits
# them); under plain python setup_logging sets them before get_spark starts the JVM.
LOG_FILE_ENV, LOG_DIR_ENV, CONSOLE_LEVEL_ENV = "AUDIOHASH_LOG_FILE", "AUDIOHASH_LOG_DIR", "AUDIOHASH_CONSOLE_LEVEL"
NOISY_LOGGERS = ("py4j", "alembic", "mlflow.store", "urllib3", "faiss.loader")


def job_parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser whose help is the job's module docstring."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conf-file", default=None, help="YAML config (default: built-in defaults, see conf/local.yaml)")
    parser.add_argument("--verbose", action="store_true",
                        help="INFO logs of the job and of Spark on the console too (always in the log file)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    return parser


def log_file_for(job: str, environ: dict[str, str] = os.environ, now: float | None = None) -> Path:
    """The run's log file: $AUDIOHASH_LOG_FILE when set (under spark-submit, the file Spark's JVM
    already writes), else ``$AUDIOHASH_LOG_DIR`` (default ./logs) / ``<job>-<UTC time>.log``."""
    if environ.get(LOG_FILE_ENV):
        return Path(environ[LOG_FILE_ENV])
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return Path(environ.get(LOG_DIR_ENV) or "logs").absolute() / f"{job}-{stamp}.log"


def setup_logging(job: str, verbose: bool = False) -> Path:
    """INFO and above into the run's log file (appended), WARNING and above on stderr (INFO with
    ``verbose``). Exports the file and the console level, so that a JVM this process starts
    (get_spark under plain python) logs to the same file (conf/spark/log4j2.properties).
    Returns the file."""
    path = log_file_for(job)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.environ[LOG_FILE_ENV] = str(path)
    if verbose:
        os.environ[CONSOLE_LEVEL_ENV] = "INFO"
    to_file = logging.FileHandler(path, mode="a", encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    to_console = logging.StreamHandler(sys.stderr)
    to_console.setLevel(logging.INFO if verbose else logging.WARNING)
    to_console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[to_file, to_console], force=True)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return path


def run_job(main: Callable[[Config, argparse.Namespace], None], parser: argparse.ArgumentParser,
            argv: list[str] | None = None) -> None:
    """Parse, set up logging, load the config, run ``main``; an AudiohashError ends with its
    message, the log file's name and exit 2."""
    args = parser.parse_args(argv)
    log_file = setup_logging(Path(parser.prog).stem, args.verbose)
    try:
        cfg = load_config(args.conf_file, args.overrides)
        main(cfg, args)
    except AudiohashError as exc:
        logging.getLogger("audiohash.cli").info("exit 2: %s", exc)
        print(f"error: {exc}\n(the full log: {log_file})", file=sys.stderr)
        sys.exit(2)
