"""The reader of the encode stage: the embedding rows of one version of the embeddings table, read
by the encode tasks themselves where its files qualify (pyarrow over the version's Parquet files,
``table_files.direct_readable``), else by Spark's Delta reader; and the extractor check every
encode mode runs on them before anything is written."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StructField, StructType

from audiohash.bundle import ModelBundle, refuse_other_extractor
from audiohash.in_process import encode_columns
from audiohash.spark.tables import TableState, direct_read_groups
from audiohash.table_files import ENCODE_TASK_BYTES

log = logging.getLogger("audiohash.encode")


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
        rows.file_groups = direct_read_groups(spark, lambda: frame, state, encode_columns(splits), ENCODE_TASK_BYTES,
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


