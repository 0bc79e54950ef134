"""What every job shares: ``--conf-file`` plus ``key=value`` overrides, logging, clean errors."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from audiohash.config import Config, load_config
from audiohash.errors import AudiohashError

OVERRIDES_HELP = "config overrides as section.key=value, e.g. train.bits=32 model.version=3 spark.master=local[2]"


def job_parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser whose help is the job's module docstring."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conf-file", default=None, help="YAML config (default: built-in defaults, see conf/local.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    return parser


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("py4j", "alembic", "mlflow.store", "urllib3", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_job(main: Callable[[Config, argparse.Namespace], None], parser: argparse.ArgumentParser,
            argv: list[str] | None = None) -> None:
    """Parse, load the config, run ``main``; an AudiohashError ends with its message and exit 2."""
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.conf_file, args.overrides)
        main(cfg, args)
    except AudiohashError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
