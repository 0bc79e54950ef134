"""Extract stage on Spark: audio files -> the embeddings table and the rejects table (Delta).

    spark-submit jobs/extract.py --conf-file conf/local.yaml extract.input=lake/dataset/manifest.csv

Three stages, each ending with a summary line (files, seconds, clips/s) on stdout and in the log:

1. plan (driver): read the manifest, or list the folder tree; look up every listed file's size
   (names and sizes only, no bytes); read which paths the embeddings table already holds for
   this extractor version. Missing, zero-byte, over-size (> 2 GiB, Spark's binaryFile limit)
   and clip_id-clashing files are rejected here, without reading them. (A folder tree on a
   non-local filesystem is listed by Spark, whose listing leaves out zero-byte files: those are
   not seen at all. Listed in a manifest, they are found and rejected as 'empty'.)
2. embed (executors): the files to embed, and only those, are read and embedded by
   ``extraction.embed_files`` in mapInPandas, in one Spark job that commits the embeddings.
   Local files (``file:`` paths) are read by the executors' Python workers straight from disk;
   any other Hadoop filesystem path (s3a://, hdfs://, abfss://, ...) is listed and read through
   Spark's binaryFile source, whose bytes reach the workers in the Arrow batches.
3. rejects: every file that was not embedded is written with its reason.

Incremental runs. The embeddings table is keyed by clip_id and holds one extractor's vectors:
- same extractor version as the rows already there: files whose path is already embedded are
  skipped before their bytes are read; the new files' rows are appended in one commit;
- a different extractor version, or no table yet: the table is overwritten, in one commit, with
  this run's files (the old vectors are not comparable with the new ones).
A file is identified by its path: a file changed in place keeps its old embedding (delete its
rows, or change the extractor, to redo it).
The rejects table (shared with other stages, told apart by ``stage``) gets one commit per run:
a MERGE on path, so a file rejected in this run has its current reason and a file embedded (or
skipped as already embedded) loses any old 'extract' reject. After every run each input file is
in exactly one of the two tables; nothing is visible before its table's commit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from functools import reduce

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from audiohash.config import ExtractSettings
from audiohash.errors import AudiohashError
from audiohash.extraction import INPUT_COLUMNS, balanced_order, embed_files, plan_extract
from audiohash.schemas import EMBEDDINGS_DDL, EXTRACT_OUTPUT_DDL, REJECTS_DDL, column_names
from audiohash.spark.extract_inputs import embedded_files, is_local, listing_conf, read_inputs
from audiohash.spark.tables import (append_delta, overwrite_delta, session_conf, set_worker_threads, table_exists,
                                    table_version)

log = logging.getLogger("audiohash.extract")

MAX_FILE_BYTES = 2**31 - 1  # spark.sql.sources.binaryFile.maxLength: a larger file fails the read
MAX_ARROW_BATCH_BYTES = 64 << 20  # bounds a worker batch of long files, beside extract.batch_size
FILES_PER_TASK = 2000  # at most, for local files; fewer tasks start fewer Arrow streams
MAX_TASK_BYTES = 128 << 20  # at most, for binaryFile reads (Spark's maxPartitionBytes default)
INPUT_DDL = "clip_id string, path string, label string, split string, source string"
EMBEDDING_COLUMNS = column_names(EMBEDDINGS_DDL)
REJECT_COLUMNS = column_names(REJECTS_DDL)


@dataclass
class ExtractSummary:
    files: int  # input files = embedded + rejected + skipped
    embedded_files: int
    embedded_rows: int  # one per window
    rejected_files: int
    skipped_files: int  # already embedded by this extractor version
    seconds: float
    embeddings_version: int | None  # None when nothing was committed
    mode: str  # overwrite | append | none
    reasons: dict[str, int] = field(default_factory=dict)
    stages: list[str] = field(default_factory=list)
    unit: str = "files"  # what files and the other counts count: "rows" for external embeddings

    def line(self) -> str:
        rate = self.embedded_rows / self.seconds if self.seconds else 0.0
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items()))
        return (f"extract: {self.files} {self.unit} -> {self.embedded_files} embedded ({self.embedded_rows} rows), "
                f"{self.rejected_files} rejected{f' ({reasons})' if reasons else ''}, "
                f"{self.skipped_files} already embedded; {self.seconds:.1f} s ({rate:.0f} clips/s); "
                f"embeddings table version {self.embeddings_version} ({self.mode})")


class _Stages:
    """Wall time of each stage and one summary line per stage, printed and logged."""

    def __init__(self):
        self.lines: list[str] = []
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, spark: SparkSession, name: str):
        spark.sparkContext.setJobDescription(f"extract: {name}")  # names the progress bar's jobs
        t0, info = time.perf_counter(), {}
        try:
            yield info
        finally:
            spark.sparkContext.setJobDescription(None)
        seconds = time.perf_counter() - t0
        rate = f", {info['clips'] / seconds:.0f} clips/s" if info.get("clips") and seconds > 0 else ""
        line = f"extract [{name}] {info.get('text', '')} in {seconds:.2f} s{rate}"
        self.lines.append(line)
        print(line, flush=True)
        log.info(line)


# ---- embed ----------------------------------------------------------------------------------
def _local_files(spark: SparkSession, todo: pd.DataFrame) -> tuple[DataFrame, dict]:
    """Local files to embed: a driver-side table of paths and metadata; the workers read the bytes.

    Spark cuts a driver-side table into defaultParallelism slices of equal row counts; rows are
    ordered so that those slices also hold equal bytes, and tables of FILES_PER_TASK files per
    slice are unioned for big inputs."""
    slices = spark.sparkContext.defaultParallelism
    n_parts = max(1, -(-len(todo) // (slices * FILES_PER_TASK)))
    parts = np.array_split(np.arange(len(todo)), n_parts)
    tables = []
    for rows in parts:
        part = todo.iloc[rows]
        part = part.iloc[balanced_order(part["length"].to_numpy(), min(slices, len(part)))]
        tables.append(spark.createDataFrame(part[INPUT_COLUMNS], INPUT_DDL))
    return reduce(DataFrame.unionAll, tables), {}


def _spark_files(spark: SparkSession, relation: DataFrame | None, listed: pd.DataFrame,
                 todo: pd.DataFrame) -> tuple[DataFrame, dict]:
    """Files read through binaryFile: (path, content) joined with the metadata, and the settings
    that cut the read into byte-balanced tasks."""
    total = int(todo["length"].sum())
    split = max(1 << 20, min(MAX_TASK_BYTES, -(-total // (2 * spark.sparkContext.defaultParallelism))))
    conf = {
        "spark.sql.files.maxPartitionBytes": str(split),
        "spark.sql.files.openCostInBytes": str(16 << 10),
        # A file deleted or unreadable between listing and reading drops out of the read instead
        # of failing the job; the accounting in _embed_and_commit names it.
        "spark.sql.files.ignoreMissingFiles": "true",
        "spark.sql.files.ignoreCorruptFiles": "true",
        **listing_conf(spark),
    }
    if relation is None or len(todo) != len(listed) or set(todo["path"]) != set(listed["path"]):
        with session_conf(spark, conf):  # only the files to embed: skipped files' bytes stay unread
            relation = spark.read.format("binaryFile").load(todo["path"].tolist())
    meta = spark.createDataFrame(todo[INPUT_COLUMNS], INPUT_DDL)
    # Broadcast the metadata so the bytes are never shuffled, however many files there are.
    return relation.select("path", "content").join(F.broadcast(meta), on="path"), conf


def _embed_and_commit(spark: SparkSession, files: DataFrame, conf: dict, todo: pd.DataFrame, table: str,
                      extractor_name: str, extractor_params: dict, extractor, mode: str, max_windows: int,
                      batch_size: int, windows_per_call: int, run_at: dt.datetime):
    """Embed ``files`` and commit the embeddings; returns (table version, rows, files, rejects)."""
    from audiohash.features import get_extractor

    task_cpus = int(spark.sparkContext.getConf().get("spark.task.cpus", "1"))

    def embed_partition(batches):
        worker_extractor = get_extractor(extractor_name, **extractor_params)  # once per Python worker
        set_worker_threads(task_cpus)
        for batch in batches:
            yield embed_files(batch, worker_extractor, max_windows, windows_per_call)

    conf = {**conf, "spark.sql.execution.arrow.maxRecordsPerBatch": str(batch_size),
            "spark.sql.execution.arrow.maxBytesPerBatch": str(MAX_ARROW_BATCH_BYTES)}
    ok, first_window = F.col("reject_reason").isNull(), F.col("offset_s") == 0
    reject_columns = [*INPUT_COLUMNS, "reject_reason", "reject_message"]
    # Counted, and the reject rows gathered, while the write runs: one pass over the audio, no
    # cache and no second job. (The reject rows travel to the driver: one per rejected file.)
    observed = Observation()
    with session_conf(spark, conf):
        out = (files.mapInPandas(embed_partition, EXTRACT_OUTPUT_DDL)
               .observe(observed, F.count(F.when(ok, 1)).alias("rows"),
                        F.count(F.when(ok & first_window, 1)).alias("files"),
                        F.collect_list(F.when(~ok, F.struct(*reject_columns))).alias("rejects"))
               .filter(ok)
               .withColumns({"extractor": F.lit(extractor.name),
                             "extractor_version": F.lit(extractor.version),
                             "sample_rate": F.lit(extractor.sample_rate).cast("int"),
                             "extracted_at": F.lit(run_at).cast("timestamp")})
               .select(*EMBEDDING_COLUMNS))
        version = overwrite_delta(out, table) if mode == "overwrite" else append_delta(out, table)
    metrics = observed.get
    n_rows, n_embedded = int(metrics["rows"]), int(metrics["files"])
    rejects = pd.DataFrame([r.asDict() for r in metrics["rejects"]], columns=reject_columns)
    if n_embedded + len(rejects) < len(todo):
        # Files the binaryFile read dropped (deleted, or not permitted, since they were listed):
        # neither in the committed table nor among the rejects.
        embedded = set(spark.read.format("delta").load(table).filter(F.col("extractor_version") == extractor.version)
                       .select("path").distinct().toPandas()["path"])
        lost = todo.loc[~todo["path"].isin(embedded | set(rejects["path"])), INPUT_COLUMNS]
        lost = lost.assign(reject_reason="unreadable",
                           reject_message=lost["path"] + ": listed, but its bytes could not be read")
        rejects = pd.concat([rejects, lost], ignore_index=True)
    return version, n_rows, n_embedded, rejects


def _write_rejects(spark: SparkSession, rejects: pd.DataFrame, input_paths: pd.Series, table: str,
                   extractor_version: str, run_at: dt.datetime) -> str:
    """Bring the rejects table's 'extract' rows for this run's files up to date, in one commit.

    Files of this run that were embedded or skipped lose their old reject row; rejected ones get
    their current reason. Nothing is written when there is nothing to reject and no table yet.
    """
    exists = table_exists(spark, table)
    if rejects.empty and not exists:
        return "no rejects, no rejects table to update"
    frame = rejects.rename(columns={"reject_reason": "reason", "reject_message": "message"}).assign(
        stage="extract", extractor_version=extractor_version, run_at=pd.Timestamp(run_at))
    if not exists:
        version = append_delta(spark.createDataFrame(frame[REJECT_COLUMNS], REJECTS_DDL), table)
        return f"{len(frame)} rejects -> new table {table} version {version}"
    from delta.tables import DeltaTable

    # One source row per input file of this run; reason null for files not rejected now.
    status = pd.DataFrame({"path": input_paths.to_numpy(dtype=object)}).merge(
        frame[REJECT_COLUMNS], on="path", how="left").assign(stage="extract")
    (DeltaTable.forPath(spark, table).alias("t")
     .merge(spark.createDataFrame(status[REJECT_COLUMNS], REJECTS_DDL).alias("s"),
            "t.path = s.path AND t.stage = 'extract'")
     .whenMatchedDelete(condition="s.reason IS NULL")
     .whenMatchedUpdateAll()
     .whenNotMatchedInsertAll(condition="s.reason IS NOT NULL")
     .execute())
    return f"{len(frame)} rejects merged into {table}, version {table_version(spark, table)}"


@dataclass(frozen=True)
class ExtractParams:
    """What an extract run reads and writes, and how; defaults are ``config.ExtractSettings``'s.

    source: a manifest (.csv/.parquet) or a folder of class sub-folders. extractor_name /
    extractor_params: as ``features.get_extractor``. max_windows: windows kept per long file
    (0 = all). batch_size: files per Arrow batch handed to the worker. windows_per_call: windows
    per extractor call. spark_io: list and read local files through Spark's binaryFile source too
    (other filesystems always are). external_version: the name of embeddings computed elsewhere
    (``audiohash.external``), required when ``source`` holds embeddings instead of audio."""

    source: str
    embeddings_table: str
    rejects_table: str
    extractor_name: str = ExtractSettings.extractor
    extractor_params: dict = field(default_factory=dict)
    max_windows: int = ExtractSettings.max_windows
    batch_size: int = ExtractSettings.batch_size
    windows_per_call: int = ExtractSettings.windows_per_call
    spark_io: bool = False
    external_version: str = ""

    @classmethod
    def from_config(cls, cfg, **changes) -> "ExtractParams":
        settings = cfg.extract
        params = cls(cfg.extract_input, cfg.lake.table("embeddings"), cfg.lake.table("rejects"), settings.extractor,
                     settings.extractor_params(), settings.max_windows, settings.batch_size,
                     settings.windows_per_call, external_version=settings.external_version)
        return dataclasses.replace(params, **changes)


def extract_embeddings(spark: SparkSession, params: ExtractParams) -> ExtractSummary:
    """Embed the files of ``params.source`` not yet embedded by this extractor; commit the
    embeddings table once and the rejects table once. Returns counts, per-stage summary lines and
    the committed embeddings table version. A source of embeddings computed elsewhere goes to
    ``spark.extract_external`` instead (the same tables, summary and commits)."""
    from audiohash.external import input_layout

    if params.external_version or input_layout(params.source):
        from audiohash.spark.extract_external import extract_external

        return extract_external(spark, params)
    source, embeddings_table, rejects_table = params.source, params.embeddings_table, params.rejects_table
    extractor_name, extractor_params = params.extractor_name, params.extractor_params
    from audiohash.features import get_extractor

    extractor = get_extractor(extractor_name, **extractor_params)  # fail fast: bad name, bad model file
    stages, run_at = _Stages(), dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)

    with stages.stage(spark, "plan") as info:
        inputs, relation, listed = read_inputs(spark, source, params.spark_io)
        embedded = embedded_files(spark, embeddings_table, extractor.version)
        todo, plan_rejects, n_skipped = plan_extract(inputs, listed, embedded, MAX_FILE_BYTES)
        mode = "none" if todo.empty else ("append" if len(embedded) else "overwrite")
        info["text"] = (f"{len(inputs)} input files: {len(todo)} to embed ({todo['length'].sum() / 2**20:.0f} MiB), "
                        f"{n_skipped} already embedded by {extractor.version}, {len(plan_rejects)} rejected unread")

    version, n_rows, n_embedded, worker_rejects = None, 0, 0, plan_rejects.iloc[:0]
    if not todo.empty:
        with stages.stage(spark, "embed") as info:
            use_spark = params.spark_io or not todo["path"].map(is_local).all()
            files, conf = _spark_files(spark, relation, listed, todo) if use_spark else _local_files(spark, todo)
            version, n_rows, n_embedded, worker_rejects = _embed_and_commit(
                spark, files, conf, todo, embeddings_table, extractor_name, extractor_params, extractor, mode,
                params.max_windows, params.batch_size, params.windows_per_call, run_at)
            info["clips"] = n_rows
            info["text"] = (f"{len(todo)} files -> {n_embedded} embedded ({n_rows} rows), "
                            f"{len(worker_rejects)} rejected; embeddings table version {version} ({mode})")

    rejects = pd.concat([plan_rejects, worker_rejects], ignore_index=True)
    with stages.stage(spark, "rejects") as info:
        info["text"] = _write_rejects(spark, rejects, inputs["path"], rejects_table, extractor.version, run_at)
    reasons = {str(k): int(v) for k, v in rejects["reject_reason"].value_counts().items()}
    for reason, count in sorted(reasons.items()):
        log.warning("rejected %d files: %s (see %s)", count, reason, rejects_table)
    if n_embedded + len(rejects) + n_skipped != len(inputs):  # the accounting invariant, checked
        raise AudiohashError(f"extract {source}: {len(inputs)} input files but {n_embedded} embedded + "
                             f"{len(rejects)} rejected + {n_skipped} skipped; this is a bug, please report it")
    return ExtractSummary(len(inputs), n_embedded, n_rows, len(rejects), n_skipped,
                          time.perf_counter() - stages.started, version, mode, reasons, stages.lines)
