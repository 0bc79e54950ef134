"""Query stage on Spark: broadcast the queries' code-space vectors, scan every partition of the
code table with faiss, merge the partitions' top-R on the driver.

Per query batch the driver broadcasts the query side (the M x 256 lookup tables are built from
it inside faiss's scan, per task: nq * 256 * D flops, negligible next to the scan, and 256/dsub
times less to ship than the tables themselves).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass

import numpy as np
from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from audiohash import faults, ivf
from audiohash.bundle import ModelBundle, bundle_to_bytes, refuse_other_extractor
from audiohash.config import QuerySettings
from audiohash.encoding import shard_of_lists
from audiohash.ranking import (cached_list_codes, check_lineage, merge_topk, partition_record, partitions_from_table,
                               plan_query_batches, probed_partition, probed_recall, scan_partition)
from audiohash.schemas import RESULTS_DDL, SCAN_OUTPUT_DDL
from audiohash.spark.code_table import code_table_state
from audiohash.spark.stats import PartitionStat, partition_stats, report_partition_stats
from audiohash.spark.tables import (append_delta, direct_read_groups, indexed_tasks, session_conf,
                                    set_worker_threads, table_state)
from audiohash.table_files import SCAN_TASK_BYTES, read_parquet_files

log = logging.getLogger("audiohash.query")
# Rows per Arrow batch sent to a scan task: fewer, larger batches cut the per-batch overhead of
# moving a million codes from the JVM (the scan concatenates a partition's batches anyway).
SCAN_BATCH_ROWS = 131072


@dataclass(frozen=True)
class ScanParams:
    """One search over a code table: ``k`` ranks per query (larger than the table = all), queries
    per scan (``query_batch``; fewer where ``memory_budget_mb`` of driver memory for one batch's
    candidates and tables asks), ``direct_read`` False: rows from Spark's Delta reader always.
    Defaults are ``config.QuerySettings``'s."""

    codes_table: str
    k: int
    query_batch: int = QuerySettings.query_batch
    memory_budget_mb: int = QuerySettings.memory_budget_mb
    direct_read: bool = True
    # Lists of the inverted file each query probes (``audiohash.ivf``), for a model that has lists;
    # 0, or a model without lists: every code is scanned.
    nprobe: int = QuerySettings.nprobe
    lists_cache_mb: int = QuerySettings.lists_cache_mb  # per Python worker: listed codes kept for the next scan


@dataclass
class ScanResult:
    """What ``search_codes`` found and how: the ranking, the one version scanned, the read path."""

    distances: np.ndarray  # float32 (nq, k'), best first
    clip_ids: np.ndarray  # object (nq, k'): ties at equal distance by clip_id
    version: int  # the code table version every query batch read
    files_read: int | None  # data files the scan tasks read themselves; None: Spark's Delta reader fed them
    codes_per_query: float  # codes each query was compared with (mean over queries)
    nprobe: int = 0  # lists probed per query; 0: exhaustive
    # Where the driver's time went, summed over query batches (``SEARCH_STAGES``).
    stage_seconds: dict = dataclasses.field(default_factory=dict)


# The stages of ``search_codes`` as the driver sees them: "plan" = the table's state, its files
# and the bundle's broadcast; "batch_plan" = per query batch, the query side, the probed lists,
# their broadcast and the probed shards' files; "spark_job" = the scan job, from submitting it to
# its collected rows (the tasks' own scan seconds are in ``stats``); "merge" = the global top-k.
SEARCH_STAGES = ("plan", "batch_plan", "spark_job", "merge")


def search_codes(spark: SparkSession, bundle: ModelBundle, queries: np.ndarray, scan: ScanParams,
                 stats: list[PartitionStat] | None = None) -> ScanResult:
    """Top-k of every query over the code table.

    queries: float32 (nq, d) embeddings. Every query batch reads one version, so a reindex committed
    meanwhile never mixes into the answer. ``stats``, if given, receives every scan task's rows and
    seconds (one record per partition and query batch, from successful task attempts only).

    Where the table version is plain Parquet on local files (``table_files.direct_readable``), each
    scan task reads its share of the version's data files itself with pyarrow: moving the rows
    from the JVM through Spark's row-to-Arrow conversion cost a scan task more than a tenth of
    its time. Otherwise (``direct_read`` False, deletion vectors, remote storage) the tasks get
    the rows from Spark's Delta reader.
    """
    codes_table, k, query_batch, memory_budget_mb = scan.codes_table, scan.k, scan.query_batch, scan.memory_budget_mb
    seconds = dict.fromkeys(SEARCH_STAGES, 0.0)
    clock = time.perf_counter()

    def lap(stage: str) -> None:  # the time since the last lap goes to ``stage``
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] += now - clock
        clock = now

    # Which model wrote the rows is in the lineage encode commits with them (one model per table
    # version: a new model version is a full reindex); checked before anything is scanned.
    version, lineage = code_table_state(spark, codes_table)
    check_lineage(lineage, codes_table, version, bundle)
    quantizer = bundle.quantizer
    nprobe = min(scan.nprobe, quantizer.nlist)
    columns = ["clip_id", "code", "list_id"] if nprobe else ["clip_id", "code"]

    @functools.cache
    def read_rows(shards: tuple[int, ...] | None = None) -> DataFrame:
        """The version's rows (of these shards only) on Spark's Delta reader: for the tasks when
        they do not read the files themselves, or for the file listing of an older version. Built
        only where used: a warm probed search of the latest version needs no DataFrame at all."""
        rows = spark.read.format("delta").option("versionAsOf", version).load(codes_table)
        return (rows if shards is None else rows.filter(F.col("shard").isin(list(shards)))).select(*columns)

    if k >= 100_000:  # "whole database": size the batches by the table (a metadata-only count)
        k = min(k, read_rows().count())
    sc = spark.sparkContext
    payload = sc.broadcast(bundle_to_bytes(bundle))
    task_cpus = int(spark.conf.get("spark.task.cpus", "1"))
    cache_bytes = scan.lists_cache_mb << 20
    # Files per scan task: a task reads its group at once, and with lists the group is the unit a
    # worker keeps for later searches (``ranking.cached_list_codes``): up to half the lists cache
    # (listed codes take about 1.7 x their Parquet bytes), so that one task per core covers the
    # table where the cache can hold it. At 16M codes the 128 MB groups of an exhaustive scan made
    # 4 probed tasks in two waves on 2 cores, each wave paying Spark's per-task time
    # (``benchmarks/ivf_profile.py``). An exhaustive scan keeps 128 MB: nothing is kept there.
    group_bytes = max(SCAN_TASK_BYTES, cache_bytes // 2) if nprobe else SCAN_TASK_BYTES
    state = table_state(spark, codes_table)
    groups = None  # data files per scan task, when the tasks read them directly
    if scan.direct_read:
        groups = direct_read_groups(spark, read_rows, state, columns, group_bytes, version)
    if groups is not None:
        groups = groups or [[]]  # an empty table: one task that scans nothing
        n_files = len(groups)
    else:
        # The table's file count bounds its scan partitions (Spark packs small files together) and
        # is read from Delta's metadata, while counting the partitions would plan the whole scan.
        n_files = DeltaTable.forPath(spark, codes_table).detail().select("numFiles").first()[0]
    log.info("scanning %s v%d: %s%s", codes_table, version, f"{sum(map(len, groups))} files read by {len(groups)} "
             f"tasks" if groups is not None else "rows from Spark's Delta reader",
             f", {nprobe} of {quantizer.nlist} lists per query" if nprobe else "")
    batches = plan_query_batches(len(queries), query_batch, k, n_files, quantizer.code_size * 256 * 4,
                                 memory_budget_mb << 20)
    all_D, all_ids, compared, files_read = [], [], 0, set()
    lap("plan")
    for b, (start, stop) in enumerate(batches):
        started = time.time()
        query_side = quantizer.query_side(queries[start:stop])
        probes = ivf.nearest_lists(query_side, quantizer.ivf_centroids, nprobe) if nprobe else None
        shipped = sc.broadcast((query_side, probes))
        batch_groups, batch_rows = groups, read_rows
        if nprobe:  # only the shards of the probed lists (a shard holds a range of lists)
            shards = set(shard_of_lists(probes, quantizer.nlist, lineage.n_shards).ravel().tolist())
            batch_rows = functools.partial(read_rows, tuple(sorted(shards)))
            if groups is not None:
                batch_groups = direct_read_groups(spark, batch_rows, state, columns, group_bytes, version,
                                                  keep=lambda partition: partition.get("shard") in shards) or [[]]

        def scan(read, files=None, shipped=shipped):
            """In a task: scan the rows ``read()`` gives (the data files ``files``, where the task
            reads them itself: their lists stay in the worker for the next batch or search)."""
            from audiohash.bundle import cached_bundle_from_bytes

            task_started = time.perf_counter()
            faults.point("scan.task")
            task_quantizer = cached_bundle_from_bytes(payload.value).quantizer
            set_worker_threads(task_cpus)
            query_side, probes = shipped.value
            if probes is not None and files is not None:
                part = probed_partition(cached_list_codes(files, task_quantizer, read, cache_bytes), query_side,
                                        probes, k)
            else:
                part = scan_partition(read(), task_quantizer, query_side, k, probes)
            part.seconds = time.perf_counter() - task_started
            return part

        if batch_groups is not None:
            def scan_files(i, scan=scan, batch_groups=batch_groups):  # runs in task i: reads and scans its files
                files = tuple(batch_groups[i])
                yield partition_record(scan(lambda: read_parquet_files(files, columns), files))

            rows = indexed_tasks(spark, len(batch_groups), scan_files, SCAN_OUTPUT_DDL)
            files_read.update(uri for group in batch_groups for uri in group)
        else:
            def scan_rows(batches, scan=scan):
                yield partition_record(scan(lambda: batches))

            rows = batch_rows().mapInArrow(scan_rows, SCAN_OUTPUT_DDL)
        lap("batch_plan")
        with session_conf(spark, {"spark.sql.execution.arrow.maxRecordsPerBatch": str(SCAN_BATCH_ROWS)}):
            parts = partitions_from_table(rows.toArrow(), stop - start)
        lap("spark_job")
        if stats is not None:
            stats += partition_stats(f"scan batch {b + 1}/{len(batches)}", [p.scanned_rows for p in parts],
                                     [p.seconds for p in parts])
        D, ids = merge_topk(parts, k)
        lap("merge")
        compared += sum(p.compared for p in parts)
        all_D.append(D)
        all_ids.append(ids)
        shipped.unpersist()
        log.info("query batch %d/%d: %d queries, top-%d of %s v%d in %.2f s", b + 1, len(batches), stop - start,
                 D.shape[1], codes_table, version, time.time() - started)
        lap("batch_plan")
    payload.unpersist()
    lap("plan")
    log.info("search stages (s): %s", ", ".join(f"{stage} {t:.3f}" for stage, t in seconds.items()))
    return ScanResult(_stack(all_D, np.inf), _stack(all_ids, None), version,
                      None if groups is None else len(files_read), compared / max(1, len(queries)), nprobe,
                      seconds)


def _stack(blocks: list[np.ndarray], fill) -> np.ndarray:
    """Query batches' (nq_b, k_b) rankings as one (nq, max k_b) array: an inverted-file scan may
    fill fewer ranks in one batch than in another (the rest: ``fill``)."""
    width = max(block.shape[1] for block in blocks)
    return np.vstack([np.pad(block.astype(object) if fill is None else block, ((0, 0), (0, width - block.shape[1])),
                             constant_values=fill) for block in blocks])


def append_results(spark: SparkSession, results_table: str, query_ids: np.ndarray, ranked_ids: np.ndarray,
                   distances: np.ndarray, run_id: str, bundle: ModelBundle) -> int:
    """Append one row per (query, rank) to the results table in one commit; returns its version.
    The rows are built in the executors from broadcast arrays (``ranking.results_batch``), a slice
    of queries per task: a DataFrame made on the driver would carry its rows inside the write's
    tasks (Spark warns of tasks of many MB once there are thousands of queries)."""
    shipped = spark.sparkContext.broadcast((query_ids, ranked_ids, distances))
    n_tasks = max(1, min(spark.sparkContext.defaultParallelism, len(query_ids)))
    bounds = np.linspace(0, len(query_ids), n_tasks + 1).astype(int)
    name, version = bundle.model_name, int(bundle.model_version)

    def build(i):  # runs in task i: the rows of queries bounds[i] .. bounds[i + 1] - 1
        from audiohash.ranking import results_batch

        q, ids, d = shipped.value
        lo, hi = bounds[i], bounds[i + 1]
        yield results_batch(q[lo:hi], ids[lo:hi], d[lo:hi], run_id, name, version)

    try:
        return append_delta(indexed_tasks(spark, n_tasks, build, RESULTS_DDL), results_table)
    finally:
        shipped.unpersist()


@dataclass
class QueryOutcome:
    """What one query run produced: metrics for MLflow, curves (evaluation with R = all), counts."""

    metrics: dict
    curves: dict | None
    codes_version: int
    n_queries: int


@dataclass(frozen=True)
class QueryParams:
    """What a query run reads, writes and scores (``from_config``: the values of ``config.QuerySettings``
    and the encode splits as the database)."""

    embeddings_table: str
    codes_table: str
    results_table: str
    query_split: str
    db_splits: tuple[str, ...]  # the rows the code table holds: the float reference's database
    top_r: int = QuerySettings.top_r  # 0 = the whole database (mAP@all)
    query_batch: int = QuerySettings.query_batch
    memory_budget_mb: int = QuerySettings.memory_budget_mb
    results_r: int = QuerySettings.results_r  # ranks per query written to the results table
    evaluate: bool = QuerySettings.evaluate
    float_reference: bool = QuerySettings.float_reference  # recall@R against exact float search
    nprobe: int = QuerySettings.nprobe  # inverted-file lists per query (a model with lists); 0 = every code
    lists_cache_mb: int = QuerySettings.lists_cache_mb
    run_id: str = ""  # the MLflow run, written with every result row

    @classmethod
    def from_config(cls, cfg, **changes) -> "QueryParams":
        q = cfg.query
        params = cls(cfg.lake.table("embeddings"), cfg.lake.table("codes"), cfg.lake.table("results"), q.split,
                     tuple(cfg.encode.splits), q.top_r, q.query_batch, q.memory_budget_mb, q.results_r, q.evaluate,
                     q.float_reference, q.nprobe, q.lists_cache_mb)
        return dataclasses.replace(params, **changes)


def query_and_evaluate(spark: SparkSession, bundle: ModelBundle, params: QueryParams) -> QueryOutcome:
    """Rank the code table for every clip of the query split, append the top ``results_r`` per query
    to the results table, and (``evaluate``) score the ranking against the labels of the database
    and, with ``float_reference``, against exact float search over the database embeddings."""
    p = params
    embeddings_table, codes_table, query_split, db_splits = p.embeddings_table, p.codes_table, p.query_split, \
        list(p.db_splits)
    from audiohash.evaluation import (class_group_metrics, exact_float_topk, ranked_positions, retrieval_curves,
                                      retrieval_metrics)
    from audiohash.spark.tables import embeddings_extractor, read_embeddings

    query_ids, query_labels, xq, embeddings_version = read_embeddings(spark, embeddings_table, [query_split])
    # Queries embedded by another extractor than the model's would be ranked without a word.
    extractor = embeddings_extractor(spark, embeddings_table, [query_split], embeddings_version)
    refuse_other_extractor(extractor[1] if extractor else None, bundle, embeddings_table)
    started = time.time()
    scan_stats: list[PartitionStat] = []
    # R = the whole database (mAP@all) needs every code ranked: no inverted file then.
    scan = ScanParams(codes_table, p.top_r or 2**62, p.query_batch, p.memory_budget_mb,
                      nprobe=p.nprobe if p.top_r else 0, lists_cache_mb=p.lists_cache_mb)
    found = search_codes(spark, bundle, xq, scan, scan_stats)
    D, ranked_ids, codes_version = found.distances, found.clip_ids, found.version
    seconds = time.time() - started
    R = ranked_ids.shape[1]
    metrics = {"query_s": seconds, "queries_per_s": len(xq) / seconds, "n_queries": len(xq), "R": R,
               "codes_per_query": found.codes_per_query, "nprobe": found.nprobe,
               **{f"search_{stage}_s": t for stage, t in found.stage_seconds.items()}}
    metrics.update(report_partition_stats(scan_stats, "scan"))  # executors' rows and seconds
    if p.evaluate and found.nprobe:  # what the lists cost: recall against every code's ranking
        every = search_codes(spark, bundle, xq, dataclasses.replace(scan, nprobe=0))
        metrics[f"ivf_recall_at_{R}"] = probed_recall(D, every.distances)
    append_results(spark, p.results_table, query_ids, ranked_ids[:, :min(R, p.results_r)],
                   D[:, :min(R, p.results_r)], p.run_id, bundle)
    curves = None
    if p.evaluate:
        db = (spark.read.format("delta").option("versionAsOf", codes_version).load(codes_table)
              .select("clip_id", "label").orderBy("clip_id").toPandas())
        db_ids, db_labels = db["clip_id"].to_numpy(object), db["label"].to_numpy(object)
        ranked = ranked_positions(ranked_ids, db_ids)
        reference = None
        if p.float_reference:
            xb_ids, _, xb, _ = read_embeddings(spark, embeddings_table, db_splits)
            if np.array_equal(xb_ids, db_ids):
                reference = exact_float_topk(xq, xb, R)
            else:
                log.warning("embeddings and code table hold different clips: recall@R skipped")
        metrics.update(retrieval_metrics(query_labels, db_labels, ranked, reference))
        for r in (100, 1000):
            if r < R:
                metrics.update(retrieval_metrics(query_labels, db_labels, ranked[:, :r]))
        if R == len(db_ids):
            curves = retrieval_curves(query_labels, db_labels, ranked)
            # Query classes outside the training labels (train.unlabeled_classes): scored apart. For
            # an unsupervised method, "classes" are those a supervised one would have seen labeled.
            seen = bundle.meta.get("classes")
            if seen and not np.isin(query_labels, seen).all():
                metrics.update(class_group_metrics(query_labels, db_labels, ranked, seen))
    return QueryOutcome(metrics, curves, codes_version, len(xq))
