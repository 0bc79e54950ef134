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

import dataclasses
import datetime as dt
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pyspark import StorageLevel
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from audiohash import delta_tables
from audiohash.bundle import ModelBundle
from audiohash.encoding import CODES_COLUMNS, HISTORY_DEPTH, EncodePlan, Lineage, first_duplicate, lineage_at, plan_encode
from audiohash.errors import AudiohashError
from audiohash.spark.code_table import DELTA_CONFLICTS, commit_metrics, changed_rows, merge_codes, write_rejects
from audiohash.spark.code_writer import code_rows, count_coded, encode_frame, write_code_files
from audiohash.spark.embedding_reader import EmbeddingRows, appended_clip_ids, check_extractor, embedding_rows, read_rows
from audiohash.spark.tables import (local_table, overwrite_delta, session_conf, table_exists, table_history,
                                    table_state, table_version)

log = logging.getLogger("audiohash.encode")
SPARK_WRITER_NOTE = ("the code table is not one the encode tasks write (storage, schema, layout or protocol): "
                     "written through Spark's Delta writer")


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
    # Which path ran: data files the tasks read themselves (None: Spark's Delta reader fed them) and
    # code files they wrote for one delta-rs commit (None: Spark's writer or MERGE wrote the rows).
    files_read: int | None = None
    files_written: int | None = None

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


# ---- the stage ------------------------------------------------------------------------------------
@dataclass
class _Written:
    version: int | None  # None: nothing to write
    encoded: int = 0
    deleted: int = 0
    maybe_rejected: bool = False  # rows in scope were not encoded: look for bad embeddings
    reason: str = ""
    files_written: int | None = None  # code files the tasks wrote; None: Spark's writer


@dataclass(frozen=True)
class EncodeParams:
    """What an encode run reads and writes, and how. ``from_config`` takes every value from the
    config (``config.EncodeSettings`` holds the defaults, in one place)."""

    embeddings_table: str
    codes_table: str
    rejects_table: str
    n_shards: int
    splits: tuple[str, ...]  # () = every row of the embeddings table
    mode: str  # incremental | full (``encoding.plan_encode``)
    batch_rows: int  # rows per Arrow batch in the tasks
    run_id: str = ""  # the MLflow run of this encode, and of the model's training: the lineage
    model_run_id: str = ""
    embeddings_version: int | None = None  # None: the latest
    direct_read: bool = True  # False: every read through Spark's Delta reader

    @classmethod
    def from_config(cls, cfg, **changes) -> "EncodeParams":
        settings = cfg.encode
        params = cls(cfg.lake.table("embeddings"), cfg.lake.table("codes"), cfg.lake.table("rejects"),
                     settings.n_shards, tuple(settings.splits), settings.mode, settings.batch_rows)
        return dataclasses.replace(params, **changes)


def encode_codes(spark: SparkSession, bundle: ModelBundle, params: EncodeParams) -> EncodeSummary:
    """Bring the code table up to date with the embeddings table (its latest version or
    ``params.embeddings_version``) for ``bundle``; at most one commit. See the module docstring."""
    started = time.time()
    embeddings_table, codes_table, n_shards = params.embeddings_table, params.codes_table, params.n_shards
    splits, mode, batch_rows, embeddings_version = (list(params.splits), params.mode, params.batch_rows,
                                                    params.embeddings_version)
    if not table_exists(spark, embeddings_table):
        raise AudiohashError(f"embeddings table {embeddings_table} does not exist; run jobs/extract.py first")
    state = table_state(spark, embeddings_table)
    version = state.version if embeddings_version is None else embeddings_version
    table_id = state.table_id
    # Appended files are read as plain Parquet (see read_rows): only where file rows = table rows.
    plain = not state.partition_columns and state.properties.get("delta.columnMapping.mode", "none") == "none"
    requested = Lineage(bundle.model_name, bundle.model_version, n_shards, tuple(splits), embeddings_table,
                        version, table_id, params.run_id, params.model_run_id)
    previous, current = None, None
    if table_exists(spark, codes_table):
        history = table_history(spark, codes_table, HISTORY_DEPTH)
        previous, current = history[0]["version"], lineage_at(history)
        columns = {f["name"] for f in table_state(spark, codes_table).schema.get("fields", [])}
        if current is not None and not set(CODES_COLUMNS) <= columns:  # written before list_id existed
            log.warning("code table %s lacks columns %s: re-encoding every row", codes_table,
                        sorted(set(CODES_COLUMNS) - columns))
            mode = "full"
    appended = None
    local = local_table(spark, embeddings_table)
    if (mode == "incremental" and current is not None and requested.same_index(current)
            and current.embeddings_table_id == table_id and plain and local is not None
            and current.embeddings_version < version):
        try:
            appended = delta_tables.appended_files(local, current.embeddings_version, version, state)
        except AudiohashError as exc:  # the encoded version's log was cleaned up
            log.info("embeddings table after version %d not comparable (%s); comparing every row",
                     current.embeddings_version, exc)
    plan = plan_encode(requested, current, mode, appended)
    log.info("encode plan: %s (%s)", plan.mode, plan.reason)

    files_read = []

    def read(files: tuple[str, ...] | None = None) -> EmbeddingRows:
        rows = embedding_rows(spark, embeddings_table, version, splits, state, files, params.direct_read)
        check_extractor(rows, bundle, embeddings_table)
        if rows.file_groups is not None:
            files_read.append(sum(map(len, rows.file_groups)))
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
                                 written.version, bundle, params.rejects_table)
    return EncodeSummary(plan.mode, written.reason, written.encoded, written.deleted, rejected,
                         time.time() - started, version, written.version, previous,
                         sum(files_read) if files_read else None, written.files_written)


# The writers: (spark, plan, bundle, codes table, lineage to commit, read(files) -> EmbeddingRows,
# rows per Arrow batch) -> _Written.
def _full(spark: SparkSession, plan: EncodePlan, bundle: ModelBundle, codes_table: str, lineage: Lineage,
          read, batch_rows: int) -> _Written:
    rows, encoded_at = read(), dt.datetime.now(dt.timezone.utc)
    written = write_code_files(spark, rows, bundle, codes_table, lineage, encoded_at, True, batch_rows)
    if written is not None:
        version, n_codes, n_left_out, n_files = written
        return _Written(version, n_codes, 0, n_left_out > 0, plan.reason, n_files)
    log.info(SPARK_WRITER_NOTE)
    encoded, left_out = encode_frame(rows, bundle, lineage.n_shards, batch_rows)
    # One task per shard writes it: one file per shard, whatever the number of input files or
    # tasks. Shuffled before the columns every row shares are added (fewer bytes to move).
    # (Without the shuffle each task writes its own shard files: no faster, measured by
    # benchmarks/encode_write_choices.py.)
    encoded = encoded.repartition(lineage.n_shards, "shard")
    codes = code_rows(encoded, lineage, encoded_at)
    overwrite_delta(codes, codes_table, partition_by=("shard",), user_metadata=lineage.to_json())
    version, metrics = commit_metrics(spark, codes_table)
    return _Written(version, metrics.get("numOutputRows", 0), 0, left_out.value > 0, plan.reason)


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
        version, n_codes, n_left_out, n_files = written
        return _Written(version, n_codes, 0, n_left_out > 0, plan.reason, n_files)
    log.info("%s", f"{known} appended clips already have a code: MERGE" if known else SPARK_WRITER_NOTE)
    encoded, left_out = encode_frame(rows, bundle, lineage.n_shards, batch_rows)
    codes = code_rows(encoded, lineage, encoded_at)
    if known:  # some appended clips already have a code: replace those rows
        version, n_codes, _ = merge_codes(spark, codes_table, codes.withColumn("_delete", F.lit(False)), lineage,
                                          bundle.quantizer.nlist > 0)
    else:  # only new clips: a blind append, the cheapest commit
        codes.write.format("delta").mode("append").option("userMetadata", lineage.to_json()).save(codes_table)
        version, metrics = commit_metrics(spark, codes_table)
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
                version, n_codes, n_deleted = merge_codes(spark, codes_table, source, lineage,
                                                          bundle.quantizer.nlist > 0)
            finally:
                source.unpersist()
        finally:
            upserts.unpersist()
        return _Written(version, n_codes, n_deleted, left_out.value > 0, plan.reason)
    finally:
        keyed.unpersist()


WRITERS = {"full": _full, "append": _append, "compare": _compare}

