"""The Spark side of Delta tables: writes through Spark's Delta writer (one commit each, versions
reported), the state of a table whichever storage it is on (``delta_tables`` for local tables,
delta-spark's public ``DeltaTable`` otherwise), tasks that read a version's files themselves, and
executor thread settings."""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Callable, Iterable

import numpy as np

from delta.tables import DeltaTable
from pyarrow import fs
from pyspark.sql import DataFrame, SparkSession

from audiohash import delta_tables
from audiohash.delta_tables import TableState
from audiohash.errors import AudiohashError
from audiohash.schemas import column_names
from audiohash.table_files import balance_files, direct_readable

log = logging.getLogger("audiohash.tables")


def local_table(spark: SparkSession, path: str) -> str | None:
    """The local path of a table this session reads and writes on local files (a ``file:`` URI, or a
    path without a scheme while Hadoop's default filesystem is the local one); None for other
    storage (s3a://, hdfs://, ...). Local tables have their state read and their direct writes
    committed by ``delta_tables`` (no JVM); other tables go through delta-spark's public API."""
    # One conf lookup (SparkContext.getConf() copies the whole configuration through py4j: 40 ms).
    default_fs = spark.conf.get("spark.hadoop.fs.defaultFS", "file:///") or "file:///"
    if "://" not in path and not path.startswith("file:") and not default_fs.startswith("file:"):
        return None
    return delta_tables.local_path(path)


def table_exists(spark: SparkSession, path: str) -> bool:
    local = local_table(spark, path)
    return delta_tables.is_table(local) if local is not None else DeltaTable.isDeltaTable(spark, path)


def table_state(spark: SparkSession, path: str, version: int | None = None) -> TableState:
    """The state of the Delta table at ``path`` (latest, or ``version``): ``delta_tables.table_state``
    for a local table (its files listed from Delta's log by delta-rs: 0.0x s, no Spark job); for one
    on other storage, delta-spark's public ``DeltaTable.history`` and ``detail`` (Spark jobs over
    the log; files None: Spark lists them when it reads)."""
    local = local_table(spark, path)
    if local is not None:
        return delta_tables.table_state(local, version)
    if not DeltaTable.isDeltaTable(spark, path):
        raise AudiohashError(f"{path} is not a Delta table")
    table = DeltaTable.forPath(spark, path)
    latest = int(table.history(1).first()["version"])
    if version not in (None, latest):
        raise AudiohashError(f"{path}: the state of version {version} of a table off local storage is not read "
                             f"here; read its rows with Spark's reader (versionAsOf)")
    detail = table.detail().first()
    schema = json.loads(spark.read.format("delta").load(path).schema.json())
    return TableState(latest, detail["id"], int(detail["minReaderVersion"]), int(detail["minWriterVersion"]),
                      list(detail["partitionColumns"]), dict(detail["properties"] or {}), schema)


def table_history(spark: SparkSession, path: str, limit: int | None = None) -> list[dict]:
    """The table's commits, newest first (at most ``limit``): version, operation, userMetadata,
    operationMetrics; ``delta_tables.history`` for a local table, else delta-spark's public
    ``DeltaTable.history``."""
    local = local_table(spark, path)
    if local is not None:
        return delta_tables.history(local, limit)
    rows = (DeltaTable.forPath(spark, path).history(limit)
            .select("version", "operation", "userMetadata", "operationMetrics").collect())
    return [{**row.asDict(), "operationMetrics": dict(row["operationMetrics"] or {})} for row in rows]


def table_version(spark: SparkSession, path: str) -> int:
    """The latest committed version of the Delta table at ``path``."""
    return table_state(spark, path).version


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


def replace_where_delta(df: DataFrame, path: str, where: str) -> int:
    """Replace the table's rows matching the SQL predicate ``where`` by ``df``'s (each of which must
    match it: Delta checks) in one commit (Delta's ``replaceWhere``)."""
    df.write.format("delta").mode("overwrite").option("replaceWhere", where).save(path)
    return table_version(df.sparkSession, path)


def append_delta(df: DataFrame, path: str, ddl: str | None = None) -> int:
    """Append in one commit, creating the table on first use."""
    if ddl is not None:
        df = df.selectExpr(*column_names(ddl))
    df.write.format("delta").mode("append").save(path)
    return table_version(df.sparkSession, path)


def direct_read_groups(spark: SparkSession, rows: Callable[[], DataFrame], state: TableState, columns: list[str],
                       max_task_bytes: int, version: int | None,
                       keep: Callable[[dict], bool] | None = None) -> list[list[str]] | None:
    """The data files behind ``rows()`` grouped into tasks that read them with pyarrow
    (``table_files.balance_files``: one task per core while a task stays under ``max_task_bytes``);
    None where they do not qualify (``table_files.direct_readable``) and Spark's reader must feed
    the tasks. ``rows()``: ``version`` of the table whose latest state is ``state`` (its files come
    from ``state`` when that is the latest and lists them: ``rows`` is then never called), or given
    Parquet files of it (``version`` None: Spark lists them). ``keep``: only the files whose
    partition values ({column: value}) it accepts (with ``version`` the latest)."""
    if state.min_reader_version != 1 or state.files is None:
        return None  # cannot qualify (a table off local storage has no files listed): spare the listing
    if version == state.version:
        chosen = [i for i in range(len(state.files)) if keep is None or keep(state.partitions[i])]
        uris, sizes = [state.files[i] for i in chosen], [state.sizes[i] for i in chosen]
    else:  # given files of the version (the listing Spark's scan would make, fully qualified)
        uris = rows().inputFiles()
        sizes = [os.path.getsize(fs.FileSystem.from_uri(u)[1]) for u in uris]
    if not direct_readable(state.min_reader_version, state.partition_columns, uris, columns):
        return None
    cores = max(1, spark.sparkContext.defaultParallelism // int(spark.conf.get("spark.task.cpus", "1")))
    return [[uris[i] for i in group] for group in balance_files(sizes, cores, max_task_bytes)]


def indexed_tasks(spark: SparkSession, n_tasks: int, task: Callable[[int], Iterable], schema: str) -> DataFrame:
    """A DataFrame made by ``n_tasks`` tasks (one row of a range per partition), task i yielding
    the Arrow record batches of ``task(i)``: for tasks that find their own input, such as the data
    files ``direct_read_groups`` gave them (task i reads group i)."""
    def run(batches):
        for batch in batches:
            for i in batch.column("id").to_pylist():
                yield from task(i)

    return spark.range(0, n_tasks, 1, max(1, n_tasks)).mapInArrow(run, schema)


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

    version = table_version(spark, path) if version is None else version
    rows = _embedding_rows(spark, path, splits, version)
    table = rows.select("clip_id", "label", "embedding").orderBy("clip_id").toArrow()
    if table.num_rows == 0:
        raise AudiohashError(f"embeddings table {path} (version {version}) has no rows for splits {splits}")
    dims = set(np.diff(table.column("embedding").combine_chunks().offsets.to_numpy()).tolist())
    if len(dims) != 1:
        raise AudiohashError(f"embeddings table {path}: rows of different sizes {sorted(dims)}; re-extract")
    x = embedding_matrix(table.column("embedding"), dims.pop(), what=f"{path} embedding")
    return (table.column("clip_id").to_numpy(zero_copy_only=False),
            table.column("label").to_numpy(zero_copy_only=False), x, version)


def embeddings_extractor(spark: SparkSession, path: str, splits: list[str] | None,
                         version: int) -> tuple[str, str] | None:
    """(extractor, extractor_version) of one row of the embeddings table at ``version`` (of ``splits``);
    None without rows. One row says it: the extract job keeps one extractor version per table."""
    first = _embedding_rows(spark, path, splits, version).select("extractor", "extractor_version").first()
    return (first[0], first[1]) if first else None


def _embedding_rows(spark: SparkSession, path: str, splits: list[str] | None, version: int):
    rows = spark.read.format("delta").option("versionAsOf", version).load(path)
    return rows.filter(rows.split.isin(splits)) if splits else rows


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
