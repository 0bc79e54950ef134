"""Shared fixtures: one local[2] SparkSession with Delta for the whole run, the small rendered
dataset, and a Config pointing every table and the MLflow store into a temp lake."""
from __future__ import annotations

import importlib.util
import os
from argparse import Namespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # Until pyproject.toml lists it with the other markers.
    config.addinivalue_line("markers", "cluster: runs the jobs with spark-submit on a Spark standalone cluster "
                                       "(a master and two workers on loopback, tests/spark_cluster.py)")


# The longest test files first: pytest-xdist (-n 2 --dist loadfile) hands files to its workers in
# collection order, so the long ones start at once and the short ones even out the end (the
# suite's wall time is its slower worker's).
LONG_FILES_FIRST = ("test_cluster.py", "test_encode_spark.py", "test_query_spark.py", "test_quantizers.py",
                    "test_report.py", "test_extract_spark.py", "test_pipeline_e2e.py")


def pytest_sessionstart(session):
    """Under xdist each worker gets its share of the cores for torch and faiss: with their default
    (every core) two workers oversubscribe a 2-core machine. The quantizer and encode test files
    side by side took 210 s (151 s of CPU) with every core per worker, 198 s (128 s) with a share.
    Spark's Python workers set their own (``spark.task.cpus``)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import faiss
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES_FIRST)))  # stable: file order kept


@pytest.fixture(scope="session", autouse=True)
def log_dir(tmp_path_factory):
    """The log files of the JVMs and jobs the tests start (conf/spark/spark-env.sh, audiohash.cli)
    land in a temp folder, not in ./logs."""
    folder = tmp_path_factory.mktemp("logs")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AUDIOHASH_LOG_DIR", str(folder))
        env.delenv("AUDIOHASH_LOG_FILE", raising=False)
        yield folder


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from audiohash.config import SparkSettings
    from audiohash.spark.session import get_spark

    settings = SparkSettings(
        master="local[2]", shuffle_partitions=2, show_progress=False, driver_memory="3g",
        extra={"spark.ui.enabled": "false",
               "spark.sql.warehouse.dir": str(tmp_path_factory.mktemp("warehouse"))},
    )
    session = get_spark(settings)
    session.sparkContext.setLogLevel("WARN")  # the jobs keep Spark's INFO in their log file; the tests need not
    yield session
    session.stop()


@pytest.fixture(scope="session")
def small_manifest(tmp_path_factory) -> Path:
    """The small GM dataset rendered from the real soundfonts (seconds), once per test run."""
    from audiohash.dataset import render_dataset

    return Path(render_dataset(tmp_path_factory.mktemp("dataset"), size="small", seed=0))


def make_config(lake: Path, *overrides: str):
    from audiohash.config import load_config

    return load_config(REPO / "conf" / "small.yaml",
                       [f"lake.root={lake}", "spark.master=local[2]", "spark.show_progress=false", *overrides])


def load_job(name: str):
    """Import jobs/<name>.py as a module (jobs are scripts, not package modules)."""
    spec = importlib.util.spec_from_file_location(f"audiohash_job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_job_main(name: str, cfg, **args) -> None:
    """Run a job's main() in this process, so it shares the test session's SparkSession."""
    load_job(name).main(cfg, Namespace(**args))
