"""The code table's side of the encode stage: its lineage (each encode commit's userMetadata),
the Spark-writer commits (MERGE of changed rows, rejects), rollback and maintenance."""
from __future__ import annotations

import logging

from delta.exceptions import (ConcurrentAppendException, ConcurrentDeleteDeleteException,
                              ConcurrentDeleteReadException, ConcurrentTransactionException, ConcurrentWriteException,
                              DeltaConcurrentModificationException, MetadataChangedException, ProtocolChangedException)
from delta.tables import DeltaTable
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from audiohash.bundle import ModelBundle
from audiohash.encoding import CODES_COLUMNS, HISTORY_DEPTH, Lineage, lineage_at
from audiohash.errors import AudiohashError
from audiohash.schemas import ENCODE_INPUT_COLUMNS, REJECTS_DDL
from audiohash.spark.embedding_reader import fingerprinted
from audiohash.spark.tables import append_delta, session_conf, table_exists, table_history, table_version

log = logging.getLogger("audiohash.encode")
USER_METADATA_CONF = "spark.databricks.delta.commitInfo.userMetadata"
# What delta-spark raises when another writer committed first (its public Python exceptions).
DELTA_CONFLICTS = (ConcurrentAppendException, ConcurrentDeleteDeleteException, ConcurrentDeleteReadException,
                   ConcurrentTransactionException, ConcurrentWriteException, DeltaConcurrentModificationException,
                   MetadataChangedException, ProtocolChangedException)


def code_table_state(spark: SparkSession, codes_table: str) -> tuple[int, Lineage | None]:
    """(latest version, lineage of its content) of a code table, from one read of its history."""
    history = table_history(spark, codes_table, HISTORY_DEPTH)
    return max(r["version"] for r in history), lineage_at(history)


def commit_metrics(spark: SparkSession, table: str) -> tuple[int, dict]:
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


def merge_codes(spark: SparkSession, codes_table: str, source: DataFrame, lineage: Lineage,
                has_lists: bool) -> tuple[int, int, int]:
    """Apply ``source`` (code rows plus ``_delete``: true = remove that clip's code) to the code
    table in one MERGE commit. Returns (version, rows inserted or updated, rows deleted).
    ``has_lists``: the model has an inverted file, so a changed clip may move to another list's
    shard: rows are matched by clip_id alone (else by shard too, which prunes the target files)."""
    values = {c: f"s.{c}" for c in CODES_COLUMNS}
    match = "t.clip_id = s.clip_id" if has_lists else "t.shard = s.shard AND t.clip_id = s.clip_id"
    with session_conf(spark, {USER_METADATA_CONF: lineage.to_json()}):  # MERGE takes no writer options
        (DeltaTable.forPath(spark, codes_table).alias("t")
         .merge(source.alias("s"), match)
         .whenMatchedDelete(condition="s._delete")
         .whenMatchedUpdate(set=values)
         .whenNotMatchedInsert(condition="NOT s._delete", values=values)
         .execute())
    version, metrics = commit_metrics(spark, codes_table)
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
