"""Delta table helpers: one commit per write, versions reported, executor thread settings."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from delta.tables import DeltaTable
from pyarrow import fs
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import StructType

from audiohash.errors import AudiohashError
from audiohash.schemas import column_names
from audiohash.table_files import balance_files, direct_readable

log = logging.getLogger("audiohash.tables")


def table_exists(spark: SparkSession, path: str) -> bool:
    return DeltaTable.isDeltaTable(spark, path)


@dataclass(frozen=True)
class TableState:
    """What a reader decides by, of a Delta table's latest version: no file listing."""

    version: int
    table_id: str  # the id a table keeps for life (a table created anew at the same path gets another)
    min_reader_version: int
    partition_columns: list[str]
    properties: dict[str, str]
    # The version's data files (URIs) where Delta keeps them in the version's checksum file (tables
    # of fewer than spark.databricks.delta.allFilesInCrc.thresholdNumFiles files, default 50): a
    # listing without the Spark jobs of Delta's state reconstruction. None: list them with Spark.
    files: tuple[str, ...] | None = None


def _delta_log(spark: SparkSession, path: str):
    return spark._jvm.org.apache.spark.sql.delta.DeltaLog.forTable(spark._jsparkSession, path)


def table_state(spark: SparkSession, path: str) -> TableState:
    """The latest version of the Delta table at ``path``, its id, reader protocol, partitioning
    and properties, from Delta's own snapshot (delta-spark's ``DeltaLog``, as ``write_and_commit``).

    ``DeltaTable.detail()`` has the same fields but also counts the version's files and bytes, and
    listing a version's files (``DataFrame.inputFiles``) reconstructs its state: on a version not
    yet read, each costs Spark jobs over the log: 1.25 s for both on local[2] after an append to a
    1M-row table, against 0.10 s for this, which reads the version's checksum file
    (benchmarks/table_state.py). delta-spark has no public Python API for the snapshot; the
    version is pinned."""
    log_ = _delta_log(spark, path)
    snapshot = log_.update(*[getattr(log_, f"update$default${i}")() for i in (1, 2, 3)])
    if snapshot.version() < 0:
        raise AudiohashError(f"{path} is not a Delta table")
    metadata, converters = snapshot.metadata(), spark._jvm.scala.jdk.javaapi.CollectionConverters
    files, checksum = None, snapshot.checksumOpt()
    if checksum.isDefined() and checksum.get().allFiles().isDefined():
        adds = converters.asJava(checksum.get().allFiles().get())
        files = tuple(add.absolutePath(snapshot).toString() for add in adds)
    return TableState(int(snapshot.version()), metadata.id(), int(snapshot.protocol().minReaderVersion()),
                      list(converters.asJava(metadata.partitionColumns())),
                      dict(converters.asJava(metadata.configuration())), files)


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


def append_delta(df: DataFrame, path: str, ddl: str | None = None) -> int:
    """Append in one commit, creating the table on first use."""
    if ddl is not None:
        df = df.selectExpr(*column_names(ddl))
    df.write.format("delta").mode("append").save(path)
    return table_version(df.sparkSession, path)


def direct_read_groups(rows: DataFrame, state: TableState, columns: list[str], max_task_bytes: int,
                       version: int | None) -> list[list[str]] | None:
    """The data files behind ``rows`` grouped into tasks that read them with pyarrow
    (``table_files.balance_files``: one task per core while a task stays under ``max_task_bytes``);
    None where they do not qualify (``table_files.direct_readable``) and Spark's reader must feed
    the tasks. ``rows``: ``version`` of the table whose latest state is ``state`` (its files come
    from ``state`` when that is the latest and lists them), or given Parquet files of it
    (``version`` None: Spark lists them)."""
    if state.min_reader_version != 1:
        return None  # cannot qualify: spare the file listing
    # The listing Spark's scan would make, fully qualified.
    uris = list(state.files) if version == state.version and state.files is not None else rows.inputFiles()
    if not direct_readable(state.min_reader_version, state.partition_columns, uris, columns):
        return None
    spark = rows.sparkSession
    cores = max(1, spark.sparkContext.defaultParallelism // int(spark.conf.get("spark.task.cpus", "1")))
    sizes = [os.path.getsize(fs.FileSystem.from_uri(u)[1]) for u in uris]
    return [[uris[i] for i in group] for group in balance_files(sizes, cores, max_task_bytes)]


def qualified_uri(spark: SparkSession, path: str) -> str:
    """``path`` as Hadoop resolves it for this session: file:/..., hdfs://..., s3a://... (a path
    without a scheme is on the default filesystem, which need not be the local one)."""
    jpath = spark._jvm.org.apache.hadoop.fs.Path(path)
    return jpath.getFileSystem(spark._jsc.hadoopConfiguration()).makeQualified(jpath).toString()


# The Delta protocol ``write_and_commit`` creates tables with, and the only one it adds files to.
DIRECT_PROTOCOL = {"minReaderVersion": 1, "minWriterVersion": 2}


def write_and_commit(spark: SparkSession, path: str, schema: StructType, partition_column: str, replace: bool,
                     user_metadata: str, write_files: Callable[[], list[dict]],
                     commit_if: Callable[[], bool] = lambda: True) -> tuple[int, list[dict]] | None:
    """Write Parquet data files with ``write_files`` (the executors, ``table_files.write_partitioned``:
    [{path, partition, size, rows}]) and commit them to the Delta table at ``path`` in one
    transaction, started before they are written: as the table's whole content (``replace``: every
    current file is removed in the same commit) or added to it; creates the table if needed.
    Returns (committed version, the files). Returns None, writing nothing, when the existing table
    has another schema, partitioning, protocol or settings than this writer makes (the caller then
    writes through Spark's Delta writer); also None when ``commit_if()``, asked once the files are
    written, says no: the files are then deleted, nothing is committed. A run stopped before the
    commit leaves only unreferenced files, as Spark's writer does (VACUUM removes them).

    delta-spark has no Python API for committing files written elsewhere; this uses its JVM
    transaction (``DeltaLog.startTransaction``, ``OptimisticTransaction.commit``, actions parsed by
    ``Action.fromJson``) through py4j, so Delta checks conflicts and writes the log entry itself.
    These are delta-spark's internal classes: the version is pinned, and tests/test_encode_spark.py
    exercises every call."""
    jvm = spark._jvm
    delta, converters = jvm.org.apache.spark.sql.delta, jvm.scala.jdk.javaapi.CollectionConverters
    txn = _delta_log(spark, path).startTransaction()
    now = int(time.time() * 1000)
    actions = []
    if txn.readVersion() < 0:  # a new table: its metadata and protocol come in the same commit
        actions.append({"metaData": {"id": str(uuid.uuid4()), "format": {"provider": "parquet", "options": {}},
                                     "schemaString": schema.json(), "partitionColumns": [partition_column],
                                     "configuration": {}, "createdTime": now}})
        actions.append({"protocol": DIRECT_PROTOCOL})
    else:
        metadata, protocol = txn.metadata(), txn.snapshot().protocol()
        same = (StructType.fromJson(json.loads(metadata.schemaString())) == schema
                and list(converters.asJava(metadata.partitionColumns())) == [partition_column]
                and {"minReaderVersion": protocol.minReaderVersion(),
                     "minWriterVersion": protocol.minWriterVersion()} == DIRECT_PROTOCOL
                and not dict(converters.asJava(metadata.configuration())))
        if not same:
            return None
    files = write_files()
    if not commit_if():
        filesystem, root = fs.FileSystem.from_uri(qualified_uri(spark, path))
        for f in files:
            filesystem.delete_file(f"{root}/{f['path']}")
        log.info("%s: %d files written, not committed (commit_if said no): deleted", path, len(files))
        return None
    jactions = jvm.java.util.ArrayList()
    for action in actions:
        jactions.add(delta.actions.Action.fromJson(json.dumps(action)))
    if replace and txn.readVersion() >= 0:
        current = txn.filterFiles().iterator()
        while current.hasNext():
            jactions.add(current.next().remove())
    for f in files:
        jactions.add(delta.actions.Action.fromJson(json.dumps({"add": {
            "path": f["path"], "partitionValues": {partition_column: str(f["partition"])}, "size": f["size"],
            "modificationTime": now, "dataChange": True, "stats": json.dumps({"numRecords": f["rows"]})}})))
    write = getattr(getattr(delta, "DeltaOperations$Write$"), "MODULE$")
    some = jvm.scala.Some
    partition_columns = jvm.java.util.ArrayList()
    partition_columns.add(partition_column)
    operation = write.apply(
        getattr(jvm.org.apache.spark.sql.SaveMode, "Overwrite" if replace else "Append"),
        some(converters.asScala(partition_columns).toList()),
        getattr(write, "apply$default$3")(), some(user_metadata),
        *[getattr(write, f"apply$default${i}")() for i in range(5, 10)])
    return int(txn.commit(converters.asScala(jactions).toList(), operation)), files


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
