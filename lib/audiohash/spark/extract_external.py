"""Extract stage for embeddings computed elsewhere (PANNs, CLAP, ...): a Parquet file or folder
with clip_id and embedding columns, or a folder of NAME.npy + NAME.parquet (``audiohash.external``)
-> the embeddings table (extractor 'external', extractor_version 'external-<name>') and the
rejects table, with the audio path's commits and summary (``spark.extract``).

    spark-submit jobs/extract.py --conf-file conf/local.yaml extract.input=/data/clap/embeddings.parquet \\
        extract.external_version=clap-2023

1. plan (driver): the files' headers cut them into pieces; the clip_id column alone is read, to
   reject rows without a clip_id or with one listed twice (every copy) and to skip rows whose
   clip_id the table already holds for this version. The input's dimension: the table's when
   appending to it, else the input's first embedding's.
2. write (executors): one task per piece reads its rows with pyarrow, checks them
   (``external.external_rows``: null, another dimension, NaN/inf) and the good rows are
   committed in one commit: appended to a table of the same version, else overwriting it.
3. rejects: this input's 'extract' rejects (locators ``<file>#row=<n>`` under the input) are
   replaced by this run's, in one commit.
"""
from __future__ import annotations

import datetime as dt
import time

import pandas as pd
from pyspark.sql import Observation, SparkSession
from pyspark.sql import functions as F

from audiohash import external
from audiohash.errors import AudiohashError
from audiohash.schemas import EXTRACT_OUTPUT_DDL, REJECTS_DDL
from audiohash.spark.extract import EMBEDDING_COLUMNS, REJECT_COLUMNS, ExtractParams, ExtractSummary, _Stages
from audiohash.spark.tables import append_delta, indexed_tasks, overwrite_delta, replace_where_delta, table_exists


def _held_rows(spark: SparkSession, table: str, version: str) -> tuple[set, int | None]:
    """(clip ids, dimension of one row) of the table's rows of this extractor version; (set(), None)
    when there is no table or it holds another version."""
    if not table_exists(spark, table):
        return set(), None
    rows = (spark.read.format("delta").load(table).filter(F.col("extractor_version") == version)
            .select("clip_id", F.size("embedding").alias("dimension")).toPandas())  # one Spark job
    return set(rows["clip_id"]), (int(rows["dimension"].iloc[0]) if len(rows) else None)


def _commit_rows(spark: SparkSession, pieces: list, excluded: dict, dim: int, table: str, version: str,
                 mode: str, run_at: dt.datetime) -> tuple[int | None, int, pd.DataFrame]:
    """Check and write every piece's rows in one commit; returns (table version, rows written,
    reject rows of the executors)."""
    def task(i: int):
        batch = external.external_rows(pieces[i], excluded.get(i), dim)
        if batch.num_rows:
            yield batch

    ok = F.col("reject_reason").isNull()
    observed = Observation()  # counted, and the rejects gathered, while the write runs: one pass
    out = (indexed_tasks(spark, len(pieces), task, EXTRACT_OUTPUT_DDL)
           .observe(observed, F.count(F.when(ok, 1)).alias("rows"),
                    F.collect_list(F.when(~ok, F.struct(*external.REJECT_COLUMNS))).alias("rejects"))
           .filter(ok)
           .withColumns({"extractor": F.lit(external.EXTRACTOR), "extractor_version": F.lit(version),
                         "sample_rate": F.lit(None).cast("int"), "extracted_at": F.lit(run_at).cast("timestamp")})
           .select(*EMBEDDING_COLUMNS))
    committed = overwrite_delta(out, table) if mode == "overwrite" else append_delta(out, table)
    metrics = observed.get
    rejects = pd.DataFrame([r.asDict() for r in metrics["rejects"]], columns=external.REJECT_COLUMNS)
    return committed, int(metrics["rows"]), rejects


def _write_rejects(spark: SparkSession, rejects: pd.DataFrame, source: str, table: str, version: str,
                   run_at: dt.datetime) -> str:
    """Replace this input's 'extract' rejects (rows located under ``source``) by ``rejects``, in
    one commit: a row fixed since the last run loses its reject."""
    exists = table_exists(spark, table)
    if rejects.empty and not exists:
        return "no rejects, no rejects table to update"
    frame = rejects.rename(columns={"reject_reason": "reason", "reject_message": "message"}).assign(
        stage="extract", extractor_version=version, run_at=pd.Timestamp(run_at))
    rows = spark.createDataFrame(frame[REJECT_COLUMNS], REJECTS_DDL)
    if not exists:
        return f"{len(frame)} rejects -> new table {table} version {append_delta(rows, table)}"
    # The prefix as hex: a path's quotes or backslashes stay literal in the SQL predicate.
    prefix = external.locator_prefix(source).encode().hex()
    where = (f"stage = 'extract' AND contains(path, '#row=') AND "
             f"startswith(path, decode(unhex('{prefix}'), 'UTF-8'))")
    version_after = replace_where_delta(rows, table, where)
    return f"{len(frame)} rejects replace this input's in {table}, version {version_after}"


def extract_external(spark: SparkSession, params: ExtractParams) -> ExtractSummary:
    """Write the rows of ``params.source`` (embeddings computed elsewhere) not yet in the table for
    ``external-<params.external_version>``; commit the embeddings table once and the rejects
    table once. Counts are rows: every input row is embedded, rejected or skipped."""
    source, table = params.source, params.embeddings_table
    layout = external.input_layout(source)
    if layout is None:
        raise AudiohashError(f"extract.external_version is set, but extract.input {source!r} holds no embeddings (or "
                             f"pyarrow cannot open it: local paths, s3://, gs://, hdfs://): give a Parquet file or folder with clip_id and embedding columns, or a folder of "
                             f"NAME.npy + NAME.parquet (or drop extract.external_version to embed audio)")
    if not params.external_version.strip():
        raise AudiohashError(f"extract.input {source!r} holds embeddings ({layout} layout): name their model and "
                             f"version with extract.external_version=NAME (e.g. clap-2023)")
    version = external.extractor_version(params.external_version)
    stages, run_at = _Stages(), dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)

    with stages.stage(spark, "plan") as info:
        pieces = external.list_pieces(source, layout)
        ids = {f: external.read_clip_ids(f) for f in dict.fromkeys(p.ids_file for p in pieces)}
        n_input = sum(len(v) for v in ids.values())
        held, held_dim = _held_rows(spark, table, version)
        excluded, plan_rejects, n_skipped = external.plan_rows(pieces, ids, held)
        dim = held_dim or external.first_dimension(pieces) or 0  # 0: no embedding at all, every row rejected
        # A piece whose every row is left out is not read at all.
        todo = [k for k, p in enumerate(pieces) if len(excluded.get(k, ())) < p.stop - p.start]
        mode = "none" if not todo else ("append" if held else "overwrite")
        info["text"] = (f"{n_input} rows in {len(ids)} {layout} files ({len(todo)} pieces to read), dimension {dim}: "
                        f"{n_skipped} already in the table for {version}, {len(plan_rejects)} rejected by clip_id")

    committed, n_rows, worker_rejects = None, 0, plan_rejects.iloc[:0]
    if todo:
        with stages.stage(spark, "write") as info:
            committed, n_rows, worker_rejects = _commit_rows(
                spark, [pieces[k] for k in todo], {i: excluded[k] for i, k in enumerate(todo) if k in excluded},
                dim, table, version, mode, run_at)
            info["clips"] = n_rows
            info["text"] = (f"{n_rows} rows written, {len(worker_rejects)} rejected; embeddings table version "
                            f"{committed} ({mode})")

    rejects = pd.concat([plan_rejects, worker_rejects], ignore_index=True)
    with stages.stage(spark, "rejects") as info:
        info["text"] = _write_rejects(spark, rejects, source, params.rejects_table, version, run_at)
    reasons = {str(k): int(v) for k, v in rejects["reject_reason"].value_counts().items()}
    if n_rows + len(rejects) + n_skipped != n_input:  # the accounting invariant, checked
        raise AudiohashError(f"extract {source}: {n_input} input rows but {n_rows} written + {len(rejects)} rejected "
                             f"+ {n_skipped} skipped; this is a bug, please report it")
    return ExtractSummary(n_input, n_rows, n_rows, len(rejects), n_skipped, time.perf_counter() - stages.started,
                          committed, mode, reasons, stages.lines, unit="rows")
