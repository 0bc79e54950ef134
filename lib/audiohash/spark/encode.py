"""Encode stage on Spark: embeddings table -> sharded Delta code table, model bundle broadcast.

One run makes at most one commit to the code table, so a killed run leaves the table as it was
(Delta writes the data files first and commits them in one atomic log entry at the end):
- full: every valid row of the embeddings table is encoded; the table is replaced in one commit
  (readers see the old index or the new one; the old one stays reachable by time travel).
- incremental (``plan_encode``): only rows of files appended since the last encode, or rows whose
  fingerprint (``source_hash`` = ``encoding.fingerprint`` of embedding and label) differs from the
  code table's, are encoded; they and the deletions are applied by one MERGE. Nothing changed:
  nothing is written.
Where the embeddings version is plain Parquet on local files (``table_files.direct_readable``),
the encode tasks read its data files themselves with pyarrow; otherwise the rows come from Spark's
Delta reader. Where they read the files and the code table is on local files too, a full run or
a blind append has the tasks write the code files with pyarrow and the driver commit them in one
Delta transaction (``write_code_files``); otherwise the code rows go to Spark's Delta writer.
Each commit carries its ``Lineage`` as userMetadata; ``rollback_codes`` restores an older version
together with its lineage, so the next incremental run starts from what was restored.
"""
from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
from delta.exceptions import (ConcurrentAppendException, ConcurrentDeleteDeleteException,
                              ConcurrentDeleteReadException, ConcurrentTransactionException, ConcurrentWriteException,
                              DeltaConcurrentModificationException, MetadataChangedException, ProtocolChangedException)
from delta.tables import DeltaTable
from pyspark import Accumulator, StorageLevel, TaskContext
from pyspark.broadcast import Broadcast
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StructField, StructType

from audiohash.bundle import ModelBundle, bundle_to_bytes
from audiohash import delta_tables, faults
from audiohash.encoding import CODES_COLUMNS, EncodePlan, Lineage, first_duplicate, plan_encode
from audiohash.errors import AudiohashError
from audiohash.schemas import CODES_DDL, ENCODE_INPUT_COLUMNS, ENCODED_DDL, REJECTS_DDL, arrow_schema
from audiohash.spark.tables import (TableState, append_delta, direct_read_groups, indexed_tasks, local_table,
                                    overwrite_delta, session_conf, set_worker_threads, table_exists,
                                    table_history, table_state, table_version)
from audiohash.table_files import ENCODE_TASK_BYTES, SCAN_TASK_BYTES

log = logging.getLogger("audiohash.encode")
USER_METADATA_CONF = "spark.databricks.delta.commitInfo.userMetadata"
# Commits that rearrange files or settings but not rows: the lineage before them still holds.
MAINTENANCE_OPERATIONS = {"OPTIMIZE", "VACUUM START", "VACUUM END", "SET TBLPROPERTIES", "UNSET TBLPROPERTIES"}
SPARK_WRITER_NOTE = ("the code table is not one the encode tasks write (storage, schema, layout or protocol): "
                     "written through Spark's Delta writer")
DELTA_CONFLICTS = (ConcurrentAppendException, ConcurrentDeleteDeleteException, ConcurrentDeleteReadException,
                   ConcurrentTransactionException, ConcurrentWriteException, DeltaConcurrentModificationException,
                   MetadataChangedException, ProtocolChangedException)
HISTORY_DEPTH = 100  # commits searched back for the last encode's lineage


@dataclass
class EncodeSummary:
    mode: str  # none | append | compare | full
    reason: str
    encoded: int  # code rows inserted or replaced
    deleted: int
    rejected: int
    seconds: float
    embeddings_version: int
    codes_version: int  # the table's version after the run
    previous_version: int | None  # before the run; None = there was no table

    @property
    def wrote(self) -> bool:
        return self.codes_version != self.previous_version

    def line(self) -> str:
        if not self.wrote:
            return (f"encode: nothing changed ({self.reason}); code table stays at version {self.codes_version}, "
                    f"{self.seconds:.1f} s")
        rate = self.encoded / self.seconds if self.seconds else 0.0
        rollback = (f"; previous index: version {self.previous_version} (roll back with encode.rollback_to="
                    f"{self.previous_version})" if self.previous_version is not None else "")
        return (f"encode ({self.mode}: {self.reason}): {self.encoded} clips encoded ({rate:.0f} clips/s), "
                f"{self.deleted} deleted, {self.rejected} rejected, {self.seconds:.1f} s; read embeddings "
                f"v{self.embeddings_version}, wrote codes v{self.codes_version}{rollback}")


def read_rows(spark: SparkSession, embeddings_table: str, version: int, splits: list[str],
              files: tuple[str, ...] | None = None) -> DataFrame:
    """The embeddings table at ``version`` (rows of ``splits``, all if empty), from Spark's reader.

    files: URIs of data files of that version: read those only. They are read as Parquet directly,
    since Delta's reader would scan every file (it does not prune by file name); the planner
    hands over only files of plain appends, without deletion vectors, to an unpartitioned table
    without column mapping, whose rows are the files' rows.
    """
    rows = spark.read.format("delta").option("versionAsOf", version).load(embeddings_table)
    if files is not None:
        rows = spark.read.schema(rows.schema).parquet(*files)
    if splits:
        rows = rows.filter(F.col("split").isin(list(splits)))
    return rows


def fingerprinted(rows: DataFrame) -> DataFrame:
    """Embedding rows with ``source_hash`` (``encoding.fingerprint``) appended, computed in the
    executors: for comparing a table's rows with the code table's."""
    schema = StructType([*rows.schema.fields, StructField("source_hash", LongType())])  # .add() would edit rows'

    def add_fingerprints(batches):
        from audiohash.encoding import with_fingerprints

        for batch in batches:
            yield with_fingerprints(batch)

    return rows.mapInArrow(add_fingerprints, schema)


def _direct_columns(splits) -> list[str]:
    """Columns an encode task reads from the embeddings files: the split only to select rows by it."""
    return [*ENCODE_INPUT_COLUMNS, "split"] if splits else ENCODE_INPUT_COLUMNS


@dataclass
class EmbeddingRows:
    """The embedding rows an encode run reads: ``frame`` (Spark's reader: counts, rejects) and,
    when the tasks can read the files themselves, ``file_groups`` (URIs per task)."""

    frame: DataFrame
    splits: tuple[str, ...]
    file_groups: list[list[str]] | None = None


def embedding_rows(spark: SparkSession, embeddings_table: str, version: int, splits: list[str], state: TableState,
                   files: tuple[str, ...] | None = None, direct_read: bool = True) -> EmbeddingRows:
    """The rows to encode (see ``read_rows``), with the file groups of a direct read where the
    version's files qualify (``table_files.direct_readable``): one task per core, each at most
    ``ENCODE_TASK_BYTES`` of files, streamed in batches. ``state``: the table's latest
    (``table_state``): its protocol and partitioning, and its files if ``version`` is the latest."""
    frame = read_rows(spark, embeddings_table, version, splits, files)
    rows = EmbeddingRows(frame, tuple(splits))
    if direct_read:
        rows.file_groups = direct_read_groups(frame, state, _direct_columns(splits), ENCODE_TASK_BYTES,
                                              version if files is None else None)
    log.info("encode reads %s", f"{sum(map(len, rows.file_groups))} files in {len(rows.file_groups)} tasks"
             if rows.file_groups is not None else "rows from Spark's Delta reader")
    return rows


def check_extractor(rows: EmbeddingRows, bundle: ModelBundle, embeddings_table: str) -> None:
    """AudiohashError when the rows were embedded by another extractor version than the one the
    bundle was trained on (its ``meta["extractor_version"]``, set by the train job): same-size
    vectors from another extractor would be coded without a word. One row is read: the extract
    job keeps one extractor version per table (a change overwrites it)."""
    from audiohash.table_files import read_parquet_files

    if not bundle.meta.get("extractor_version"):
        return
    if rows.file_groups is not None:
        uris = [uri for group in rows.file_groups for uri in group]
        found = next((batch.column(0)[0].as_py() for batch in read_parquet_files(uris, ["extractor_version"])
                      if batch.num_rows), None)
    else:
        first = rows.frame.select("extractor_version").limit(1).collect()
        found = first[0][0] if first else None
    refuse_other_extractor(found, bundle, embeddings_table)


def refuse_other_extractor(found: str | None, bundle: ModelBundle, embeddings_table: str) -> None:
    """AudiohashError naming both versions when embeddings of extractor version ``found`` (None: no
    rows) do not match the one the bundle was trained on; bundles without one pass."""
    expected = bundle.meta.get("extractor_version")
    if expected and found is not None and found != expected:
        raise AudiohashError(
            f"{embeddings_table} holds embeddings of extractor {found}, but model {bundle.model_name} "
            f"v{bundle.model_version} was trained on {expected}: train a model on these embeddings "
            f"(jobs/train.py) or re-extract with {expected}; nothing was written")


def encode_frame(rows: EmbeddingRows, bundle: ModelBundle, n_shards: int,
                 batch_rows: int = 65536) -> tuple[DataFrame, Accumulator]:
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
def file_batches(uris: list[str], splits: tuple[str, ...], batch_rows: int):
    """The encode input (``ENCODE_INPUT_COLUMNS``) of embeddings files a task reads itself, the rows
    of ``splits`` only, in batches of at most ``batch_rows`` rows."""
    from audiohash.encoding import select_splits
    from audiohash.table_files import read_parquet_files

    for batch in read_parquet_files(uris, _direct_columns(splits), batch_rows):
        yield select_splits(batch, splits).select(ENCODE_INPUT_COLUMNS)


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
                     encoded_at: dt.datetime, replace: bool, batch_rows: int = 65536,
                     commit_if: Callable[[], bool] = lambda: True) -> tuple[int, int, int] | None:
    """Where the tasks read the embeddings files themselves and the code table is on ``file:``
    storage, they also write the code files (pyarrow, one per shard per task, streamed batch by
    batch) and the driver commits them in one Delta transaction (``delta_tables.commit_files``), so
    no code row goes through the JVM. Returns (code table version, code rows written, rows left
    out as bad embeddings), or None where this does not apply (the caller uses Spark's writer)
    or ``commit_if()`` said no once the files were written (they are deleted)."""
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
    return version, sum(f["rows"] for f in files), left_out.value


def code_rows(encoded: DataFrame, lineage: Lineage, encoded_at: dt.datetime) -> DataFrame:
    """Encoded rows + the columns every row of this run shares -> rows of ``CODES_DDL``."""
    constants = {
        "model_name": F.lit(lineage.model_name), "model_version": F.lit(lineage.model_version).cast("int"),
        "embedding_version": F.lit(lineage.embeddings_version).cast("long"),
        "encoded_at": F.lit(encoded_at).cast("timestamp"), "encode_run_id": F.lit(lineage.run_id),
    }
    return encoded.select(*[constants.get(c, F.col(c)).alias(c) for c in CODES_COLUMNS])


# ---- the code table's state ------------------------------------------------------------------------
def lineage_at(history: list, version: int | None = None) -> Lineage | None:
    """The lineage of the table's content at ``version`` (default: latest) from its history rows.

    Walks back over maintenance commits; None when a commit that changed rows was not made by
    encode (or by its rollback), since then nobody knows what the rows were made from.
    """
    for row in sorted(history, key=lambda r: -r["version"]):
        if version is not None and row["version"] > version:
            continue
        lineage = Lineage.from_json(row["userMetadata"])
        if lineage is not None:
            return lineage
        if row["operation"] not in MAINTENANCE_OPERATIONS:
            return None
    return None


def code_table_state(spark: SparkSession, codes_table: str) -> tuple[int, Lineage | None]:
    """(latest version, lineage of its content) of a code table, from one read of its history."""
    history = table_history(spark, codes_table, HISTORY_DEPTH)
    return max(r["version"] for r in history), lineage_at(history)


def _commit_metrics(spark: SparkSession, table: str) -> tuple[int, dict]:
    row = table_history(spark, table, 1)[0]
    return row["version"], {k: int(v) for k, v in row["operationMetrics"].items() if str(v).isdigit()}


# ---- writing ---------------------------------------------------------------------------------------
def changed_rows(rows: DataFrame, codes_table: str) -> DataFrame:
    """Every row, with ``changed`` (a new clip, or another source_hash than its code row's); the
    embedding is kept for changed rows only, so the result is small enough to persist."""
    current = (rows.sparkSession.read.format("delta").load(codes_table)
               .select("clip_id", F.col("source_hash").alias("coded_hash")))
    # The code table's keys (tens of bytes per clip) are broadcast: no shuffle of the embeddings.
    joined = fingerprinted(rows.select(*ENCODE_INPUT_COLUMNS)).join(F.broadcast(current), on="clip_id", how="left")
    changed = F.col("coded_hash").isNull() | (F.col("coded_hash") != F.col("source_hash"))
    return joined.select("clip_id", "label", changed.alias("changed"),
                         F.when(changed, F.col("embedding")).alias("embedding"))


def merge_codes(spark: SparkSession, codes_table: str, source: DataFrame, lineage: Lineage) -> tuple[int, int, int]:
    """Apply ``source`` (code rows plus ``_delete``: true = remove that (clip_id, shard)) to the
    code table in one MERGE commit. Returns (version, rows inserted or updated, rows deleted)."""
    values = {c: f"s.{c}" for c in CODES_COLUMNS}
    with session_conf(spark, {USER_METADATA_CONF: lineage.to_json()}):  # MERGE takes no writer options
        (DeltaTable.forPath(spark, codes_table).alias("t")
         .merge(source.alias("s"), "t.shard = s.shard AND t.clip_id = s.clip_id")
         .whenMatchedDelete(condition="s._delete")
         .whenMatchedUpdate(set=values)
         .whenNotMatchedInsert(condition="NOT s._delete", values=values)
         .execute())
    version, metrics = _commit_metrics(spark, codes_table)
    upserted = metrics.get("numTargetRowsInserted", 0) + metrics.get("numTargetRowsUpdated", 0)
    return version, upserted, metrics.get("numTargetRowsDeleted", 0)


def write_rejects(rows: DataFrame, codes_table: str, codes_version: int, bundle: ModelBundle,
                  rejects_table: str) -> int:
    """Append the rows that got no code (null, wrong-size, NaN/inf embeddings: the worker leaves
    them out) to the rejects table; returns how many. Run only when the counts show some."""
    dim = bundle.quantizer.input_dim
    coded = (rows.sparkSession.read.format("delta").option("versionAsOf", codes_version).load(codes_table)
             .select("clip_id", "source_hash"))
    rows = fingerprinted(rows.select("path", "clip_id", "label", "embedding", "extractor_version"))
    rejected = rows.join(coded, on=["clip_id", "source_hash"], how="left_anti").select(
        "path", "clip_id", F.lit("encode").alias("stage"), F.lit("bad_embedding").alias("reason"),
        F.concat(F.lit("clip "), F.col("clip_id"), F.lit(": embedding has "),
                 F.coalesce(F.size("embedding").cast("string"), F.lit("no")),
                 F.lit(f" values, or NaN/inf/null ones; model {bundle.model_name} v{bundle.model_version} expects "
                       f"{dim} finite values. Re-extract the file")).alias("message"),
        "extractor_version", F.current_timestamp().alias("run_at")).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        n_rejected = rejected.count()
        if n_rejected:
            append_delta(rejected, rejects_table, REJECTS_DDL)
            log.warning("%d rows not encoded (bad embeddings), listed in %s", n_rejected, rejects_table)
    finally:
        rejected.unpersist()
    return n_rejected


# ---- the stage ------------------------------------------------------------------------------------
@dataclass
class _Written:
    version: int | None  # None: nothing to write
    encoded: int = 0
    deleted: int = 0
    maybe_rejected: bool = False  # rows in scope were not encoded: look for bad embeddings
    reason: str = ""


def encode_codes(spark: SparkSession, bundle: ModelBundle, embeddings_table: str, codes_table: str,
                 rejects_table: str, n_shards: int, splits: list[str], mode: str = "incremental",
                 run_id: str = "", model_run_id: str = "", embeddings_version: int | None = None,
                 batch_rows: int = 65536, direct_read: bool = True) -> EncodeSummary:
    """Bring the code table up to date with the embeddings table (latest or ``embeddings_version``)
    for ``bundle``; at most one commit. See the module docstring for the modes; ``direct_read``
    False makes every read go through Spark's Delta reader."""
    started = time.time()
    if not table_exists(spark, embeddings_table):
        raise AudiohashError(f"embeddings table {embeddings_table} does not exist; run jobs/extract.py first")
    state = table_state(spark, embeddings_table)
    version = state.version if embeddings_version is None else embeddings_version
    table_id = state.table_id
    # Appended files are read as plain Parquet (see read_rows): only where file rows = table rows.
    plain = not state.partition_columns and state.properties.get("delta.columnMapping.mode", "none") == "none"
    requested = Lineage(bundle.model_name, bundle.model_version, n_shards, tuple(splits), embeddings_table,
                        version, table_id, run_id, model_run_id)
    previous, current = None, None
    if table_exists(spark, codes_table):
        history = table_history(spark, codes_table, HISTORY_DEPTH)
        previous, current = history[0]["version"], lineage_at(history)
    appended = None
    local = local_table(spark, embeddings_table)
    if (mode == "incremental" and current is not None and requested.same_index(current)
            and current.embeddings_table_id == table_id and plain and local is not None
            and current.embeddings_version < version):
        try:
            appended = delta_tables.appended_files(local, current.embeddings_version, version)
        except AudiohashError as exc:  # the encoded version's log was cleaned up
            log.info("embeddings table after version %d not comparable (%s); comparing every row",
                     current.embeddings_version, exc)
    plan = plan_encode(requested, current, mode, appended)
    log.info("encode plan: %s (%s)", plan.mode, plan.reason)

    def read(files: tuple[str, ...] | None = None) -> EmbeddingRows:
        rows = embedding_rows(spark, embeddings_table, version, splits, state, files, direct_read)
        check_extractor(rows, bundle, embeddings_table)
        return rows

    written = _Written(None, reason=plan.reason)
    if plan.mode != "none":
        # One writer per shard open at once: a task's rows need no sort by shard before the write.
        with session_conf(spark, {"spark.sql.execution.arrow.maxRecordsPerBatch": str(batch_rows),
                                  "spark.sql.maxConcurrentOutputFileWriters": str(n_shards)}):
            try:
                written = WRITERS[plan.mode](spark, plan, bundle, codes_table, requested, read, batch_rows)
            except DELTA_CONFLICTS:  # Spark's writer lost to a concurrent commit (the task writer says so itself)
                latest = table_version(spark, codes_table)
                raise delta_tables.ConcurrentCommitError(
                    f"Delta table {codes_table}: another writer committed version {latest} while this run was "
                    f"writing (it had read version {previous}); nothing of this run was committed (the files "
                    f"Spark's writer wrote stay unreferenced until VACUUM). Run it again: it will start from "
                    f"version {latest}") from None
    if written.version is None:
        return EncodeSummary(plan.mode, written.reason, 0, 0, 0, time.time() - started, version, previous, previous)
    rejected = 0
    if written.maybe_rejected:
        files = plan.added_files if plan.mode == "append" else None
        rejected = write_rejects(read_rows(spark, embeddings_table, version, splits, files), codes_table,
                                 written.version, bundle, rejects_table)
    return EncodeSummary(plan.mode, written.reason, written.encoded, written.deleted, rejected,
                         time.time() - started, version, written.version, previous)


# The writers: (spark, plan, bundle, codes table, lineage to commit, read(files) -> EmbeddingRows,
# rows per Arrow batch) -> _Written.
def _full(spark: SparkSession, plan: EncodePlan, bundle: ModelBundle, codes_table: str, lineage: Lineage,
          read, batch_rows: int) -> _Written:
    rows, encoded_at = read(), dt.datetime.now(dt.timezone.utc)
    written = write_code_files(spark, rows, bundle, codes_table, lineage, encoded_at, True, batch_rows)
    if written is not None:
        version, n_codes, n_left_out = written
        return _Written(version, n_codes, 0, n_left_out > 0, plan.reason)
    log.info(SPARK_WRITER_NOTE)
    encoded, left_out = encode_frame(rows, bundle, lineage.n_shards, batch_rows)
    # One task per shard writes it: one file per shard, whatever the number of input files or
    # tasks. Shuffled before the columns every row shares are added (fewer bytes to move).
    # (Without the shuffle each task writes its own shard files: no faster, measured by
    # benchmarks/encode_write_choices.py.)
    encoded = encoded.repartition(lineage.n_shards, "shard")
    codes = code_rows(encoded, lineage, encoded_at)
    overwrite_delta(codes, codes_table, partition_by=("shard",), user_metadata=lineage.to_json())
    version, metrics = _commit_metrics(spark, codes_table)
    return _Written(version, metrics.get("numOutputRows", 0), 0, left_out.value > 0, plan.reason)


def appended_clip_ids(rows: EmbeddingRows) -> pa.ChunkedArray:
    """The clip ids of the rows an append run encodes, on the driver: read from the appended files
    with pyarrow where the tasks read them directly, else from Spark's reader. (The ids of one
    append fit the driver, as the broadcast of the known-clip check needs anyway.)"""
    from audiohash.encoding import select_splits
    from audiohash.table_files import read_parquet_files

    if rows.file_groups is None:
        return rows.frame.select("clip_id").toArrow().column("clip_id")
    columns = ["clip_id", "split"] if rows.splits else ["clip_id"]
    uris = [uri for group in rows.file_groups for uri in group]
    return pa.chunked_array([select_splits(batch, rows.splits).column("clip_id")
                             for batch in read_parquet_files(uris, columns)], pa.string())


def count_coded(spark: SparkSession, codes_table: str, clip_ids: pa.Array) -> int:
    """How many of ``clip_ids`` already have a row in the code table. Where its files qualify
    (``table_files.direct_readable``), the tasks read their clip_id column with pyarrow and count
    the matches (no code row goes through the JVM); else a semi-join on Spark's reader."""
    state = table_state(spark, codes_table)
    coded = spark.read.format("delta").option("versionAsOf", state.version).load(codes_table)
    groups = direct_read_groups(coded, state, ["clip_id"], SCAN_TASK_BYTES, state.version)
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


def _append(spark: SparkSession, plan: EncodePlan, bundle: ModelBundle, codes_table: str, lineage: Lineage,
            read, batch_rows: int) -> _Written:
    rows = read(plan.added_files)
    clip_ids = appended_clip_ids(rows).combine_chunks()
    if len(clip_ids) == 0:
        return _Written(None, reason=f"{plan.reason}, but none of their rows is in splits {list(lineage.splits)}")
    twice = first_duplicate(clip_ids)
    if twice is not None:
        raise AudiohashError(f"embeddings table {lineage.embeddings_table} version {lineage.embeddings_version}: "
                             f"clip_id {twice!r} appears more than once in the appended files; clip_id must "
                             f"be unique (delete the duplicate rows, or re-extract)")
    encoded_at = dt.datetime.now(dt.timezone.utc)
    # Only new clips make a blind append, the cheapest commit: the tasks encode and write the codes
    # while a concurrent Spark job counts the appended clips that already have one, and the codes
    # are committed only if none has (else they are deleted, and a MERGE replaces those codes).
    with ThreadPoolExecutor(1) as pool:
        known_count = pool.submit(count_coded, spark, codes_table, clip_ids)
        written = write_code_files(spark, rows, bundle, codes_table, lineage, encoded_at, False, batch_rows,
                                   commit_if=lambda: known_count.result() == 0)
        known = known_count.result()
    if written is not None:
        version, n_codes, n_left_out = written
        return _Written(version, n_codes, 0, n_left_out > 0, plan.reason)
    log.info("%s", f"{known} appended clips already have a code: MERGE" if known else SPARK_WRITER_NOTE)
    encoded, left_out = encode_frame(rows, bundle, lineage.n_shards, batch_rows)
    codes = code_rows(encoded, lineage, encoded_at)
    if known:  # some appended clips already have a code: replace those rows
        version, n_codes, _ = merge_codes(spark, codes_table, codes.withColumn("_delete", F.lit(False)), lineage)
    else:  # only new clips: a blind append, the cheapest commit
        codes.write.format("delta").mode("append").option("userMetadata", lineage.to_json()).save(codes_table)
        version, metrics = _commit_metrics(spark, codes_table)
        n_codes = metrics.get("numOutputRows", 0)
    return _Written(version, n_codes, 0, left_out.value > 0, plan.reason)


def _compare(spark: SparkSession, plan: EncodePlan, bundle: ModelBundle, codes_table: str, lineage: Lineage,
             read, batch_rows: int) -> _Written:
    # Every row is compared with its code row in the JVM: Spark's reader feeds the join.
    rows = read_rows(spark, lineage.embeddings_table, lineage.embeddings_version, list(lineage.splits))
    # A table re-extracted in place by another extractor of the same width lands here: refuse it too.
    check_extractor(EmbeddingRows(rows, lineage.splits), bundle, lineage.embeddings_table)
    # One scan of the embeddings; only the changed rows keep their embedding, so this stays small.
    keyed = changed_rows(rows, codes_table).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        changed = EmbeddingRows(keyed.filter("changed").drop("changed"), lineage.splits)
        encoded, left_out = encode_frame(changed, bundle, lineage.n_shards, batch_rows)
        upserts = code_rows(encoded, lineage, dt.datetime.now(dt.timezone.utc)).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            # A clip keeps its code if its row is unchanged or was just encoded; every other code goes
            # (its clip left the embeddings table, or its new embedding cannot be encoded).
            kept = keyed.filter(~F.col("changed")).select("clip_id").unionByName(upserts.select("clip_id"))
            current = spark.read.format("delta").load(codes_table).select("clip_id", "shard")
            deletions = current.join(kept, on="clip_id", how="left_anti")
            source = upserts.withColumn("_delete", F.lit(False)).unionByName(
                deletions.withColumn("_delete", F.lit(True)), allowMissingColumns=True)
            source = source.persist(StorageLevel.MEMORY_AND_DISK)
            try:
                if source.isEmpty():
                    return _Written(None, reason=f"{plan.reason}, but no row's fingerprint changed")
                version, n_codes, n_deleted = merge_codes(spark, codes_table, source, lineage)
            finally:
                source.unpersist()
        finally:
            upserts.unpersist()
        return _Written(version, n_codes, n_deleted, left_out.value > 0, plan.reason)
    finally:
        keyed.unpersist()


WRITERS = {"full": _full, "append": _append, "compare": _compare}


# ---- rollback and maintenance ---------------------------------------------------------------------
def rollback_codes(spark: SparkSession, codes_table: str, version: int) -> tuple[int, Lineage | None]:
    """Restore the code table to ``version`` in one new commit (readers see the old or the restored
    index), carrying that version's lineage; returns (new version, restored lineage)."""
    if not table_exists(spark, codes_table):
        raise AudiohashError(f"code table {codes_table} does not exist; nothing to roll back")
    history = table_history(spark, codes_table)
    versions = {r["version"] for r in history}
    if version not in versions:
        raise AudiohashError(f"code table {codes_table} has no version {version}; versions: "
                             f"{min(versions)}..{max(versions)} (see DESCRIBE HISTORY)")
    lineage = lineage_at(history, version)
    try:
        with session_conf(spark, {USER_METADATA_CONF: lineage.to_json()} if lineage else {}):
            DeltaTable.forPath(spark, codes_table).restoreToVersion(version)
    except Exception as exc:  # py4j/Analysis errors: files vacuumed away, version too old
        raise AudiohashError(f"cannot restore {codes_table} to version {version}: {exc}; files older than "
                             f"the VACUUM retention are gone") from None
    return table_version(spark, codes_table), lineage


def maintain_codes(spark: SparkSession, codes_table: str, optimize: bool, vacuum_hours: int) -> list[str]:
    """OPTIMIZE (bin-packing the many small files incremental runs leave) and/or VACUUM; returns
    what was done, one line each."""
    done = []
    table = DeltaTable.forPath(spark, codes_table)
    if optimize:
        metrics = table.optimize().executeCompaction().select("metrics").first()["metrics"]
        done.append(f"OPTIMIZE: {metrics['numFilesRemoved']} files compacted into {metrics['numFilesAdded']}")
    if vacuum_hours > 0:
        try:
            table.vacuum(float(vacuum_hours))
        except Exception as exc:
            raise AudiohashError(f"encode.vacuum_hours={vacuum_hours}: VACUUM of {codes_table} failed: {exc}") from None
        done.append(f"VACUUM: removed files unreferenced for more than {vacuum_hours} h "
                    f"(versions older than that can no longer be restored)")
    return done
