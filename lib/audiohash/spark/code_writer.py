"""The mapper and writer of the encode stage: embedding rows -> code rows in the executors (the
broadcast bundle, ``encoding.encode_batch``), and the code files the tasks write themselves
(pyarrow) for the driver to commit in one Delta transaction (``delta_tables.commit_files``)."""
from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import Callable

import pyarrow as pa
from pyspark import Accumulator, TaskContext
from pyspark.broadcast import Broadcast
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from audiohash import delta_tables, faults
from audiohash.bundle import ModelBundle, bundle_to_bytes
from audiohash.encoding import CODES_COLUMNS, Lineage
from audiohash.schemas import CODES_DDL, ENCODE_INPUT_COLUMNS, ENCODED_DDL, arrow_schema
from audiohash.in_process import file_batches
from audiohash.spark.embedding_reader import EmbeddingRows
from audiohash.spark.tables import direct_read_groups, indexed_tasks, local_table, set_worker_threads, table_state
from audiohash.table_files import SCAN_TASK_BYTES

log = logging.getLogger("audiohash.encode")


def encode_frame(rows: EmbeddingRows, bundle: ModelBundle, n_shards: int,
                 batch_rows: int) -> tuple[DataFrame, Accumulator]:
    """Embedding rows -> ``ENCODED_DDL`` rows, encoded in the executors (``encoding.encode_batch``).

    Also returns an accumulator of the rows the workers left out (bad embeddings): once the
    frame has been computed, a non-zero value says a rejects listing is due.
    """
    spark = rows.frame.sparkSession
    payload = spark.sparkContext.broadcast(bundle_to_bytes(bundle))
    left_out = spark.sparkContext.accumulator(0)
    task_cpus = int(spark.conf.get("spark.task.cpus", "1"))
    if rows.file_groups is None:
        def encode_rows(batches):
            return encoded_batches(batches, payload, n_shards, task_cpus, left_out)

        return rows.frame.select(*ENCODE_INPUT_COLUMNS).mapInArrow(encode_rows, ENCODED_DDL), left_out
    groups, splits = rows.file_groups, rows.splits

    def encode_files(i):
        return encoded_batches(file_batches(groups[i], splits, batch_rows), payload, n_shards, task_cpus, left_out)

    return indexed_tasks(spark, len(groups), encode_files, ENCODED_DDL), left_out


# ---- in the encode tasks ----------------------------------------------------------------------------
def encoded_batches(batches, payload: Broadcast, n_shards: int, task_cpus: int, left_out: Accumulator):
    """Encode input batches -> ``ENCODED_DDL`` batches with the broadcast bundle
    (``encoding.encode_batch``), adding the rows it leaves out (bad embeddings) to ``left_out``."""
    from audiohash.bundle import cached_bundle_from_bytes
    from audiohash.encoding import encode_batch

    faults.point("scan.task")
    quantizer = cached_bundle_from_bytes(payload.value).quantizer
    set_worker_threads(task_cpus)
    for batch in batches:
        out = encode_batch(batch, quantizer, n_shards)
        if out.num_rows < batch.num_rows:
            left_out.add(batch.num_rows - out.num_rows)
        yield out


# One row per code file a task wrote (``table_files.write_partitioned``'s dicts).
CODE_FILES_DDL = "path string, partition int, size long, rows long"
CODE_FILES_SCHEMA = pa.schema([("path", pa.string()), ("partition", pa.int32()), ("size", pa.int64()),
                               ("rows", pa.int64())])


def write_code_files(spark: SparkSession, rows: EmbeddingRows, bundle: ModelBundle, codes_table: str, lineage: Lineage,
                     encoded_at: dt.datetime, replace: bool, batch_rows: int,
                     commit_if: Callable[[], bool] = lambda: True) -> tuple[int, int, int, int] | None:
    """Where the tasks read the embeddings files themselves and the code table is on ``file:``
    storage, they also write the code files (pyarrow, one per shard per task, streamed batch by
    batch) and the driver commits them in one Delta transaction (``delta_tables.commit_files``), so
    no code row goes through the JVM. Returns (code table version, code rows written, rows left
    out as bad embeddings, code files written), or None where this does not apply (the caller
    uses Spark's writer) or ``commit_if()`` said no once the files were written (they are deleted)."""
    if rows.file_groups is None:
        return None
    local = local_table(spark, codes_table)
    if local is None:
        return None
    uri = delta_tables.file_uri(local)
    groups, splits, n_shards = rows.file_groups, rows.splits, lineage.n_shards
    payload = spark.sparkContext.broadcast(bundle_to_bytes(bundle))
    left_out = spark.sparkContext.accumulator(0)
    task_cpus = int(spark.conf.get("spark.task.cpus", "1"))
    run = uuid.uuid4().hex

    def encode_and_write(i):  # runs in task i: encodes and writes the rows of groups[i]
        from audiohash.encoding import code_table_batch
        from audiohash.table_files import write_partitioned

        encoded = encoded_batches(file_batches(groups[i], splits, batch_rows), payload, n_shards, task_cpus, left_out)
        # The attempt in the name: a retried or speculative attempt never writes over another's
        # files; the driver commits the files of the attempt whose result it got.
        name = f"part-{i:05d}-{run}-{TaskContext.get().taskAttemptId()}"
        files = write_partitioned((code_table_batch(b, lineage, encoded_at) for b in encoded), uri, "shard", name)
        yield pa.RecordBatch.from_pylist(files, schema=CODE_FILES_SCHEMA)

    def write_files() -> list[dict]:
        files = [row.asDict() for row in indexed_tasks(spark, len(groups), encode_and_write, CODE_FILES_DDL).collect()]
        faults.point("encode.before_commit")
        return files

    try:
        committed = delta_tables.commit_files(local, arrow_schema(CODES_DDL), "shard", replace, lineage.to_json(),
                                              write_files, commit_if)
    finally:
        payload.unpersist()
    if committed is None:
        return None
    version, files = committed
    log.info("committed %s version %d: %d code files written by %d tasks", codes_table, version, len(files),
             len(groups))
    return version, sum(f["rows"] for f in files), left_out.value, len(files)


def code_rows(encoded: DataFrame, lineage: Lineage, encoded_at: dt.datetime) -> DataFrame:
    """Encoded rows + the columns every row of this run shares -> rows of ``CODES_DDL``."""
    constants = {
        "model_name": F.lit(lineage.model_name), "model_version": F.lit(lineage.model_version).cast("int"),
        "embedding_version": F.lit(lineage.embeddings_version).cast("long"),
        "encoded_at": F.lit(encoded_at).cast("timestamp"), "encode_run_id": F.lit(lineage.run_id),
    }
    return encoded.select(*[constants.get(c, F.col(c)).alias(c) for c in CODES_COLUMNS])



def count_coded(spark: SparkSession, codes_table: str, clip_ids: pa.Array) -> int:
    """How many of ``clip_ids`` already have a row in the code table. Where its files qualify
    (``table_files.direct_readable``), the tasks read their clip_id column with pyarrow and count
    the matches (no code row goes through the JVM); else a semi-join on Spark's reader."""
    state = table_state(spark, codes_table)
    coded = spark.read.format("delta").option("versionAsOf", state.version).load(codes_table)
    groups = direct_read_groups(spark, lambda: coded, state, ["clip_id"], SCAN_TASK_BYTES, state.version)
    if groups is None:
        new = spark.createDataFrame(pa.table({"clip_id": clip_ids}))
        return coded.select("clip_id").join(F.broadcast(new), on="clip_id", how="left_semi").count()
    if not groups:
        return 0
    values = spark.sparkContext.broadcast(clip_ids)

    def count_matches(i):  # runs in task i: reads the clip_id column of groups[i]
        from audiohash.table_files import count_in_files

        yield pa.RecordBatch.from_pydict({"n": [count_in_files(groups[i], "clip_id", values.value)]})

    try:
        counts = indexed_tasks(spark, len(groups), count_matches, "n long").collect()
    finally:
        values.unpersist()
    return sum(row["n"] for row in counts)


