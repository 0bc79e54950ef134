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
import datetime as dt
import logging
import os
import time
from dataclasses import dataclass, field
from functools import reduce

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark.sql import DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from audiohash.errors import AudiohashError
from audiohash.extraction import (AUDIO_SUFFIXES, INPUT_COLUMNS, balanced_order, base_clip_ids, embed_files,
                                  folder_inputs, hadoop_path, manifest_inputs, plan_extract)
from audiohash.schemas import EMBEDDINGS_DDL, EXTRACT_OUTPUT_DDL, REJECTS_DDL, column_names
from audiohash.spark.tables import (append_delta, overwrite_delta, session_conf, set_worker_threads, table_exists,
                                    table_version)

log = logging.getLogger("audiohash.extract")

MAX_FILE_BYTES = 2**31 - 1  # spark.sql.sources.binaryFile.maxLength: a larger file fails the read
MAX_ARROW_BATCH_BYTES = 64 << 20  # bounds a worker batch of long files, beside extract.batch_size
FILES_PER_TASK = 2000  # at most, for local files; fewer tasks start fewer Arrow streams
MAX_TASK_BYTES = 128 << 20  # at most, for binaryFile reads (Spark's maxPartitionBytes default)
MAX_STATUS_LOOKUPS = 10_000  # manifest files Spark's listing missed, looked up one by one
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

    def line(self) -> str:
        rate = self.embedded_rows / self.seconds if self.seconds else 0.0
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items()))
        return (f"extract: {self.files} files -> {self.embedded_files} embedded ({self.embedded_rows} rows), "
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


# ---- plan: inputs, listing, what is already embedded ---------------------------------------
def _is_local(path: str) -> bool:
    return path.startswith("file:")


def _listing_conf(spark: SparkSession) -> dict[str, str]:
    # Spark lists more than 32 root paths with a job of one task per path (up to 10,000):
    # thousands of tiny tasks for a list of files. Two tasks per core list them as fast.
    return {"spark.sql.sources.parallelPartitionDiscovery.parallelism": str(2 * spark.sparkContext.defaultParallelism)}


def suffix_glob(suffixes) -> str | None:
    """A case-insensitive Hadoop glob on file names with these suffixes (``*.{[wW][aA][vV],...}``);
    None when some suffix is empty (list every file)."""
    suffixes = sorted({s.lower() for s in suffixes})
    if not suffixes or any(not s.startswith(".") or len(s) < 2 for s in suffixes):
        return None
    classes = ["".join(f"[{c}{c.upper()}]" if c.isalpha() else c for c in s[1:]) for s in suffixes]
    return "*.{" + ",".join(classes) + "}"


def _exists(spark: SparkSession, path: str) -> bool:
    if _is_local(path):
        return os.path.exists(path[len("file:"):])
    return _file_info(path) is not None


def _file_info(path: str):
    """pyarrow's FileInfo of a path on other storage (s3://, gs://, hdfs://, ...), None where it does
    not exist or pyarrow has no filesystem for it (Spark's reader then reports what it finds)."""
    from pyarrow import fs

    try:
        filesystem, inner = fs.FileSystem.from_uri(path)
        info = filesystem.get_file_info(inner)
    except (OSError, ValueError, pa.ArrowException):
        return None
    return None if info.type == fs.FileType.NotFound else info


def _local_sizes(paths) -> pd.DataFrame:
    """path, length of the given local files that exist (one stat each, on the driver)."""
    rows = []
    for p in paths:
        try:
            st = os.stat(p[len("file:"):])
        except OSError:
            continue
        if not os.path.isdir(p[len("file:"):]):
            rows.append((p, st.st_size))
    return pd.DataFrame(rows, columns=["path", "length"]).astype({"length": "int64"})


def _local_tree(root: str) -> list[str]:
    """Files under a local folder, skipping names Spark's listing hides (``.*``, ``_*``)."""
    out = []
    for folder, dirs, names in os.walk(root[len("file:"):]):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        out += ["file:" + os.path.join(folder, n) for n in sorted(names) if not n.startswith((".", "_"))]
    return out


def list_with_spark(spark: SparkSession, folders: list[str], glob: str | None) -> tuple[DataFrame | None, pd.DataFrame]:
    """List the files under ``folders`` (recursively, names matching ``glob``) through Spark's
    binaryFile source, reading no bytes. Returns the relation (reused to read the bytes when
    every listed file is to be embedded, so nothing is listed twice) and path, length."""
    folders = sorted(set(folders))
    folders = [f for f in folders if not any(f.startswith(g.rstrip("/") + "/") for g in folders)]  # no nesting
    folders = [f for f in folders if _exists(spark, f)]  # a missing folder's files become 'missing'
    if not folders:
        return None, pd.DataFrame({"path": pd.Series(dtype=object), "length": pd.Series(dtype="int64")})
    reader = spark.read.format("binaryFile").option("recursiveFileLookup", "true")
    if glob:
        reader = reader.option("pathGlobFilter", glob)
    with session_conf(spark, _listing_conf(spark)):
        relation = reader.load(folders)
        listed = relation.select("path", "length").toPandas()
    return relation, listed


def read_inputs(spark: SparkSession, source: str, spark_io: bool) -> tuple[pd.DataFrame, DataFrame | None, pd.DataFrame]:
    """The input files of a manifest or a folder tree and their sizes: (inputs, binaryFile
    relation of the listing or None, listed path/length).

    spark_io: list (and later read) local files through Spark too, as any other filesystem.
    """
    location = hadoop_path(source)
    if not _exists(spark, location):
        raise AudiohashError(f"extract input {source!r} does not exist (give a manifest .csv/.parquet or a folder)")
    suffix = os.path.splitext(location)[1].lower()
    is_folder = os.path.isdir(location[len("file:"):]) if _is_local(location) else not suffix
    if is_folder:
        if _is_local(location) and not spark_io:
            inputs = folder_inputs(_local_tree(location), location)
            return inputs, None, _local_sizes(inputs["path"])
        relation, listed = list_with_spark(spark, [location], suffix_glob(AUDIO_SUFFIXES))
        return folder_inputs(listed["path"], location), relation, listed
    if suffix not in (".csv", ".parquet", ".pq"):
        raise AudiohashError(f"extract input {source!r}: expected a .csv or .parquet manifest or a folder")
    inputs = manifest_inputs(_read_manifest_table(spark, location, suffix), location)
    local = inputs["path"].map(_is_local)
    if local.all() and not spark_io:
        return inputs, None, _local_sizes(inputs["path"])
    folders = sorted({p.rsplit("/", 1)[0] for p in inputs["path"]})
    relation, listed = list_with_spark(spark, folders, suffix_glob({os.path.splitext(p)[1] for p in inputs["path"]}))
    # Spark's file listing leaves out zero-byte and hidden (``.*``, ``_*``) files: look those up
    # one by one, so they are rejected as 'empty' or read, not misreported as 'missing'.
    unlisted = inputs.loc[~inputs["path"].isin(set(listed["path"])), "path"].tolist()
    found = [(p, n) for p in unlisted[:MAX_STATUS_LOOKUPS] if (n := _file_length(spark, p)) is not None]
    if found:
        listed = pd.concat([listed, pd.DataFrame(found, columns=["path", "length"])], ignore_index=True)
    return inputs, relation, listed


def _file_length(spark: SparkSession, path: str) -> int | None:
    """Size of one file on other storage; None if it does not exist, is a folder, or pyarrow has no
    filesystem for it."""
    from pyarrow import fs

    info = _file_info(path)
    return None if info is None or info.type != fs.FileType.File else int(info.size)


def _read_manifest_table(spark: SparkSession | None, location: str, suffix: str) -> pd.DataFrame:
    """A local manifest through pandas (no Spark job); a remote one through Spark's readers."""
    try:
        if _is_local(location):
            local = location[len("file:"):]
            if suffix == ".csv":
                return pd.read_csv(local, dtype=str, keep_default_na=False)
            return pd.read_parquet(local)
        if suffix == ".csv":
            return spark.read.option("header", "true").csv(location).toPandas()
        return spark.read.parquet(location).toPandas()
    except (OSError, ValueError) as exc:
        raise AudiohashError(f"manifest {location}: cannot read it: {exc}") from exc


def read_manifest(manifest: str) -> pd.DataFrame:
    """A local manifest file -> input files (``extraction.INPUT_COLUMNS``)."""
    location = hadoop_path(manifest)
    suffix = os.path.splitext(location)[1].lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise AudiohashError(f"manifest {manifest!r}: expected a .csv or .parquet file")
    return manifest_inputs(_read_manifest_table(None, location, suffix), location)


def embedded_files(spark: SparkSession, table: str, extractor_version: str) -> pd.DataFrame:
    """path, clip_id (the file's, not a window's) of the files ``table`` holds for this
    extractor version; empty when there is no table or it holds another extractor's vectors."""
    if not table_exists(spark, table):
        return pd.DataFrame({"path": pd.Series(dtype=object), "clip_id": pd.Series(dtype=object)})
    rows = (spark.read.format("delta").load(table)
            .filter(F.col("extractor_version") == extractor_version).select("path", "clip_id").toPandas())
    ids = base_clip_ids(rows["clip_id"], rows["path"])
    return pd.DataFrame({"path": ids.index.to_numpy(dtype=object), "clip_id": ids.to_numpy(dtype=object)})


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
        **_listing_conf(spark),
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


def extract_embeddings(spark: SparkSession, source: str, embeddings_table: str, rejects_table: str,
                       extractor_name: str, extractor_params: dict, max_windows: int = 0, batch_size: int = 256,
                       windows_per_call: int = 4, spark_io: bool = False) -> ExtractSummary:
    """Embed the files of ``source`` (a manifest or a folder of class sub-folders) not yet
    embedded by this extractor; commit the embeddings table once and the rejects table once.

    extractor_name / extractor_params: as ``features.get_extractor``. max_windows: windows kept
    per long file (0 = all). batch_size: files per Arrow batch handed to the worker.
    windows_per_call: windows per extractor call. spark_io: list and read local files through
    Spark's binaryFile source too (other filesystems always are).
    Returns counts, per-stage summary lines and the committed embeddings table version.
    """
    from audiohash.features import get_extractor

    extractor = get_extractor(extractor_name, **extractor_params)  # fail fast: bad name, bad model file
    stages, run_at = _Stages(), dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)

    with stages.stage(spark, "plan") as info:
        inputs, relation, listed = read_inputs(spark, source, spark_io)
        embedded = embedded_files(spark, embeddings_table, extractor.version)
        todo, plan_rejects, n_skipped = plan_extract(inputs, listed, embedded, MAX_FILE_BYTES)
        mode = "none" if todo.empty else ("append" if len(embedded) else "overwrite")
        info["text"] = (f"{len(inputs)} input files: {len(todo)} to embed ({todo['length'].sum() / 2**20:.0f} MiB), "
                        f"{n_skipped} already embedded by {extractor.version}, {len(plan_rejects)} rejected unread")

    version, n_rows, n_embedded, worker_rejects = None, 0, 0, plan_rejects.iloc[:0]
    if not todo.empty:
        with stages.stage(spark, "embed") as info:
            use_spark = spark_io or not todo["path"].map(_is_local).all()
            files, conf = _spark_files(spark, relation, listed, todo) if use_spark else _local_files(spark, todo)
            version, n_rows, n_embedded, worker_rejects = _embed_and_commit(
                spark, files, conf, todo, embeddings_table, extractor_name, extractor_params, extractor, mode,
                max_windows, batch_size, windows_per_call, run_at)
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
