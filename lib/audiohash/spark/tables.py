"""Delta table helpers: one commit per write, versions reported, executor thread settings."""
from __future__ import annotations

import contextlib
import logging
import os

import numpy as np

from delta.tables import DeltaTable
from pyarrow import fs
from pyspark.sql import DataFrame, SparkSession

from audiohash.table_files import balance_files, direct_readable

log = logging.getLogger("audiohash.tables")


def table_exists(spark: SparkSession, path: str) -> bool:
    return DeltaTable.isDeltaTable(spark, path)


def table_version(spark: SparkSession, path: str) -> int:
    """The latest committed version of the Delta table at ``path``."""
    return int(DeltaTable.forPath(spark, path).history(1).select("version").first()[0])


def overwrite_delta(df: DataFrame, path: str, partition_by: tuple[str, ...] = (), user_metadata: str = "") -> int:
    """Replace the table's content in one atomic commit (readers see old or new, never a mix)."""
    writer = df.write.format("delta").mode("overwrite").option("overwriteSchema", "true")
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    if user_metadata:
        writer = writer.option("userMetadata", user_metadata)
    writer.save(path)
    version = table_version(df.sparkSession, path)
    log.info("committed %s version %d", path, version)
    return version


def append_delta(df: DataFrame, path: str, ddl: str | None = None) -> int:
    """Append in one commit, creating the table on first use."""
    if ddl is not None:
        df = df.selectExpr(*[col.split()[0] for col in ddl.split(", ")])
    df.write.format("delta").mode("append").save(path)
    return table_version(df.sparkSession, path)


def direct_read_groups(rows: DataFrame, min_reader_version: int, partition_columns: list[str], columns: list[str],
                       max_task_bytes: int) -> list[list[str]] | None:
    """The data files behind ``rows`` (a Delta version, or given Parquet files of it) grouped into
    tasks that read them with pyarrow (``table_files.balance_files``: one task per core while a
    task stays under ``max_task_bytes``); None where they do not qualify
    (``table_files.direct_readable``) and Spark's reader must feed the tasks."""
    if min_reader_version != 1:
        return None  # cannot qualify: spare the file listing
    uris = rows.inputFiles()  # the listing Spark's scan would make, fully qualified
    if not direct_readable(min_reader_version, partition_columns, uris, columns):
        return None
    spark = rows.sparkSession
    cores = max(1, spark.sparkContext.defaultParallelism // int(spark.conf.get("spark.task.cpus", "1")))
    sizes = [os.path.getsize(fs.FileSystem.from_uri(u)[1]) for u in uris]
    return [[uris[i] for i in group] for group in balance_files(sizes, cores, max_task_bytes)]


def set_worker_threads(task_cpus: int) -> None:
    """Executors: give torch and faiss the task's cores only, so tasks sharing a worker do not
    oversubscribe it (called in every task once its model is loaded; cheap). torch is set only
    if the model imported it: a PQ scan worker never pays torch's import (seconds per worker)."""
    import sys

    import faiss

    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != task_cpus:
        torch.set_num_threads(task_cpus)
    faiss.omp_set_num_threads(task_cpus)


def read_embeddings(spark: SparkSession, path: str, splits: list[str] | None = None, version: int | None = None):
    """Collect an embeddings table (or some splits of it) to the driver, sorted by clip_id.

    Returns (clip_ids object (n,), labels object (n,), embeddings float32 (n, d), table version).
    """
    from audiohash.arrow_arrays import embedding_matrix
    from audiohash.errors import AudiohashError

    version = table_version(spark, path) if version is None else version
    rows = spark.read.format("delta").option("versionAsOf", version).load(path)
    if splits:
        rows = rows.filter(rows.split.isin(splits))
    table = rows.select("clip_id", "label", "embedding").orderBy("clip_id").toArrow()
    if table.num_rows == 0:
        raise AudiohashError(f"embeddings table {path} (version {version}) has no rows for splits {splits}")
    dims = set(np.diff(table.column("embedding").combine_chunks().offsets.to_numpy()).tolist())
    if len(dims) != 1:
        raise AudiohashError(f"embeddings table {path}: rows of different sizes {sorted(dims)}; re-extract")
    x = embedding_matrix(table.column("embedding"), dims.pop(), what=f"{path} embedding")
    return (table.column("clip_id").to_numpy(zero_copy_only=False),
            table.column("label").to_numpy(zero_copy_only=False), x, version)


@contextlib.contextmanager
def session_conf(spark: SparkSession, settings: dict[str, str]):
    """Set SQL settings for the enclosed reads and writes, then restore the previous values."""
    before = {key: spark.conf.get(key, None) for key in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)
