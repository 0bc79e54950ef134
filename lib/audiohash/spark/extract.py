"""Extract stage on Spark: audio files -> embeddings table + rejects table (Delta)."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from audiohash.errors import AudiohashError
from audiohash.schemas import EMBEDDINGS_DDL, EXTRACT_OUTPUT_DDL, INPUT_FILE_COLUMNS, REJECTS_DDL
from audiohash.spark.tables import append_delta, overwrite_delta, set_worker_threads

log = logging.getLogger("audiohash.extract")
AUDIO_GLOB = "*.{wav,WAV,flac,FLAC,ogg,OGG,aiff,aif,mp3}"


@dataclass
class ExtractSummary:
    files: int
    embedded_rows: int
    rejected_files: int
    seconds: float
    embeddings_version: int

    def line(self) -> str:
        rate = self.files / self.seconds if self.seconds else 0.0
        return (f"extract: {self.files} files -> {self.embedded_rows} embedding rows, "
                f"{self.rejected_files} rejected, {self.seconds:.1f} s ({rate:.0f} files/s), "
                f"embeddings table version {self.embeddings_version}")


def hadoop_path(path: str) -> str:
    """A local path in the form Spark's binaryFile source reports (file:/abs/path); URIs unchanged."""
    if "://" in path or path.startswith("file:"):
        return path
    return "file:" + os.path.abspath(path)


def read_manifest(manifest: str) -> pd.DataFrame:
    """Manifest (CSV/Parquet: path, label?, split?, clip_id?, source?) -> the input-file columns.

    Relative paths are resolved against the manifest's folder. A ``soundfont`` column (the
    benchmark dataset's) stands in for ``source``.
    """
    suffix = Path(manifest).suffix.lower()
    if suffix == ".csv":
        frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    elif suffix in (".parquet", ".pq"):
        frame = pd.read_parquet(manifest).astype(str)
    else:
        raise AudiohashError(f"manifest {manifest!r}: expected a .csv or .parquet file")
    if "path" not in frame.columns:
        raise AudiohashError(f"manifest {manifest!r}: no 'path' column (columns: {list(frame.columns)})")
    base = Path(manifest).resolve().parent
    frame["path"] = [p if "://" in p or os.path.isabs(p) else str(base / p) for p in frame["path"]]
    if "clip_id" not in frame.columns or (frame["clip_id"] == "").any():
        frame["clip_id"] = [os.path.splitext(os.path.relpath(p, base))[0] for p in frame["path"]]
    if "source" not in frame.columns:
        frame["source"] = frame["soundfont"] if "soundfont" in frame.columns else None
    for column in ("label", "split"):
        if column not in frame.columns:
            frame[column] = None
    duplicated = frame["clip_id"].duplicated()
    if duplicated.any():
        raise AudiohashError(
            f"manifest {manifest!r}: clip_id {frame['clip_id'][duplicated].iloc[0]!r} appears more than once"
        )
    frame["path"] = [hadoop_path(p) for p in frame["path"]]
    return frame[[c for c in INPUT_FILE_COLUMNS if c != "content"]].replace({"": None})


def input_files(spark: SparkSession, source: str) -> DataFrame:
    """The files to embed, with their bytes: a manifest or a folder of class sub-folders."""
    if os.path.isdir(source) or (not Path(source).suffix and "://" in source):
        files = (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
                 .option("pathGlobFilter", AUDIO_GLOB).load(hadoop_path(source)))
        root = hadoop_path(source).rstrip("/") + "/"
        relative = F.expr(f"substring(path, {len(root) + 1})")
        return files.select(
            F.regexp_replace(relative, r"\.[^./]*$", "").alias("clip_id"),  # relative path, no suffix
            "path",
            F.element_at(F.split(F.col("path"), "/"), -2).alias("label"),  # the class sub-folder
            F.lit(None).cast("string").alias("split"),
            F.lit(None).cast("string").alias("source"),
            "content",
        )
    if not os.path.exists(source) and "://" not in source:
        raise AudiohashError(f"extract input {source!r} does not exist (give a manifest or a folder)")
    manifest = read_manifest(source)
    listed = spark.createDataFrame(manifest, "clip_id string, path string, label string, split string, source string")
    # Read the bytes of every audio file under the manifest's folders, then keep the listed ones;
    # a listed file that is not found keeps content = null and becomes a 'missing' reject.
    folders = sorted({p.rsplit("/", 1)[0] for p in manifest["path"]})
    contents = (spark.read.format("binaryFile").option("pathGlobFilter", AUDIO_GLOB)
                .load(folders).select("path", "content"))
    return listed.join(contents, on="path", how="left").select(*INPUT_FILE_COLUMNS)


def extract_embeddings(spark: SparkSession, source: str, embeddings_table: str, rejects_table: str,
                       extractor_name: str, extractor_params: dict, max_windows: int, batch_size: int) -> ExtractSummary:
    """Embed every file of ``source`` in the executors; overwrite the embeddings table in one
    commit and append the rejects. Returns counts and the committed table version."""
    from audiohash.extraction import embed_files
    from audiohash.features import get_extractor

    get_extractor(extractor_name, **extractor_params)  # fail fast on the driver: bad name/model path
    started = time.time()
    files = input_files(spark, source)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_size))
    task_cpus = int(spark.conf.get("spark.task.cpus", "1"))

    def embed_partition(batches):
        set_worker_threads(task_cpus)
        extractor = get_extractor(extractor_name, **extractor_params)
        for batch in batches:
            yield embed_files(batch, extractor, max_windows)

    out = files.mapInPandas(embed_partition, EXTRACT_OUTPUT_DDL).persist(StorageLevel.DISK_ONLY)
    try:
        embedded = out.filter(F.col("reject_reason").isNull()).selectExpr(
            *[c.split()[0] for c in EMBEDDINGS_DDL.split(", ")])
        version = overwrite_delta(embedded, embeddings_table)
        rejects = out.filter(F.col("reject_reason").isNotNull()).select(
            "path", "clip_id", F.lit("extract").alias("stage"), F.col("reject_reason").alias("reason"),
            F.col("reject_message").alias("message"), "extractor_version", F.col("extracted_at").alias("run_at"))
        counts = out.groupBy(F.col("reject_reason").isNull().alias("ok")).count().collect()
        n_ok = sum(r["count"] for r in counts if r["ok"])
        n_rejected = sum(r["count"] for r in counts if not r["ok"])
        if n_rejected:
            append_delta(rejects, rejects_table, REJECTS_DDL)
            for row in rejects.groupBy("reason").count().collect():
                log.warning("rejected %d files: %s (see %s)", row["count"], row["reason"], rejects_table)
        n_files = out.select("path").distinct().count()
    finally:
        out.unpersist()
    return ExtractSummary(n_files, n_ok, n_rejected, time.time() - started, version)
