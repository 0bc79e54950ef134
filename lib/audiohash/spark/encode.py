"""Encode stage on Spark: embeddings table -> sharded Delta code table, model bundle broadcast."""
from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from audiohash.bundle import ModelBundle, bundle_to_bytes
from audiohash.schemas import CODES_DDL, REJECTS_DDL
from audiohash.spark.tables import append_delta, overwrite_delta, set_worker_threads, table_version

log = logging.getLogger("audiohash.encode")


@dataclass
class EncodeSummary:
    encoded: int
    rejected: int
    seconds: float
    embeddings_version: int
    codes_version: int

    def line(self) -> str:
        rate = self.encoded / self.seconds if self.seconds else 0.0
        return (f"encode: {self.encoded} clips encoded ({rate:.0f} clips/s), {self.rejected} rejected, "
                f"{self.seconds:.1f} s; read embeddings v{self.embeddings_version}, wrote codes v{self.codes_version}")


def bad_embedding(dim: int):
    """Rows no model can encode: null, wrong size, NaN or inf (checked in SQL, before any Python)."""
    return F.expr(
        f"embedding IS NULL OR size(embedding) != {dim} "
        f"OR exists(embedding, x -> isnan(x) OR abs(x) = CAST('Infinity' AS FLOAT))"
    )


def encode_frame(embeddings: DataFrame, bundle: ModelBundle, n_shards: int, embedding_version: int) -> DataFrame:
    """Rows (clip_id, label, embedding) -> code rows, encoded in the executors over Arrow batches."""
    spark = embeddings.sparkSession
    payload = spark.sparkContext.broadcast(bundle_to_bytes(bundle))
    task_cpus = int(spark.conf.get("spark.task.cpus", "1"))
    encoded_at = dt.datetime.now(dt.timezone.utc)

    def encode_partition(batches):
        from audiohash.bundle import cached_bundle_from_bytes
        from audiohash.encoding import encode_batch

        set_worker_threads(task_cpus)
        worker_bundle = cached_bundle_from_bytes(payload.value)
        for batch in batches:
            yield encode_batch(batch, worker_bundle, n_shards, embedding_version, encoded_at)

    return embeddings.select("clip_id", "label", "embedding").mapInArrow(encode_partition, CODES_DDL)


def encode_table(spark: SparkSession, bundle: ModelBundle, embeddings_table: str, codes_table: str,
                 rejects_table: str, n_shards: int, splits: list[str]) -> EncodeSummary:
    """Full reindex: every (valid) embedding row -> one code row, committed as one Delta version."""
    started = time.time()
    embedding_version = table_version(spark, embeddings_table)
    rows = spark.read.format("delta").option("versionAsOf", embedding_version).load(embeddings_table)
    if splits:
        rows = rows.filter(F.col("split").isin(splits))
    bad = bad_embedding(bundle.quantizer.input_dim)
    codes = encode_frame(rows.filter(~bad), bundle, n_shards, embedding_version)
    lineage = json.dumps({"model_name": bundle.model_name, "model_version": bundle.model_version,
                          "embeddings_version": embedding_version})
    codes_version = overwrite_delta(codes, codes_table, partition_by=("shard",), user_metadata=lineage)
    rejected = rows.filter(bad).select(
        "path", "clip_id", F.lit("encode").alias("stage"), F.lit("bad_embedding").alias("reason"),
        F.concat(F.lit("clip "), F.col("clip_id"), F.lit(": embedding has "),
                 F.coalesce(F.size("embedding").cast("string"), F.lit("no")),
                 F.lit(f" values or NaN/inf, model {bundle.model_name} v{bundle.model_version} expects "
                       f"{bundle.quantizer.input_dim} finite values")).alias("message"),
        "extractor_version", F.current_timestamp().alias("run_at"))
    n_rejected = rejected.count()
    if n_rejected:
        append_delta(rejected, rejects_table, REJECTS_DDL)
        log.warning("%d rows not encoded (bad embeddings), listed in %s", n_rejected, rejects_table)
    n_encoded = spark.read.format("delta").option("versionAsOf", codes_version).load(codes_table).count()
    return EncodeSummary(n_encoded, n_rejected, time.time() - started, embedding_version, codes_version)
