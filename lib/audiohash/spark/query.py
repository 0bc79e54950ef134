"""Query stage on Spark: broadcast the queries' code-space vectors, scan every partition of the
code table with faiss, merge the partitions' top-R on the driver.

Per query batch the driver broadcasts the query side (the M x 256 lookup tables are built from
it inside faiss's scan, per task: nq * 256 * D flops, negligible next to the scan, and 256/dsub
times less to ship than the tables themselves).
"""
from __future__ import annotations

import logging
import time

import numpy as np
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from audiohash.bundle import ModelBundle, bundle_to_bytes
from audiohash.errors import AudiohashError
from audiohash.ranking import merge_topk, partition_from_record, partition_record, scan_partition
from audiohash.schemas import SCAN_OUTPUT_DDL
from audiohash.spark.tables import set_worker_threads

log = logging.getLogger("audiohash.query")


def check_code_table(spark: SparkSession, codes_table: str, bundle: ModelBundle) -> int:
    """Refuse a code table written by another model; returns its row count.

    min/max/count over Delta columns are answered from the log's file statistics, not a scan.
    """
    row = (spark.read.format("delta").load(codes_table)
           .agg(F.min("model_name"), F.max("model_name"), F.min("model_version"), F.max("model_version"),
                F.count(F.lit(1))).first())
    names, versions, count = {row[0], row[1]}, {row[2], row[3]}, row[4]
    if count == 0:
        raise AudiohashError(f"code table {codes_table} is empty; run jobs/encode.py first")
    if names != {bundle.model_name} or versions != {bundle.model_version}:
        raise AudiohashError(
            f"code table {codes_table} holds codes of model {sorted(names)} version {sorted(versions)}, "
            f"but the query bundle is {bundle.model_name} version {bundle.model_version}; "
            f"re-encode with jobs/encode.py model.version={bundle.model_version} or query with "
            f"model.version={max(versions)}"
        )
    return int(count)


def search_codes(spark: SparkSession, bundle: ModelBundle, codes_table: str, queries: np.ndarray, k: int,
                 query_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of every query over the code table: D float32 (nq, k), clip ids object (nq, k)."""
    n_db = check_code_table(spark, codes_table, bundle)
    k = min(k, n_db)
    codes = spark.read.format("delta").load(codes_table).select("clip_id", "code")
    sc = spark.sparkContext
    payload = sc.broadcast(bundle_to_bytes(bundle))
    task_cpus = int(spark.conf.get("spark.task.cpus", "1"))
    all_D, all_ids = [], []
    n_batches = -(-len(queries) // query_batch)
    for b, start in enumerate(range(0, len(queries), query_batch)):
        started = time.time()
        query_side = bundle.quantizer.query_side(queries[start: start + query_batch])
        shipped = sc.broadcast(query_side)
        nq = len(query_side)

        def scan(batches, shipped=shipped):
            from audiohash.bundle import cached_bundle_from_bytes

            set_worker_threads(task_cpus)
            quantizer = cached_bundle_from_bytes(payload.value).quantizer
            yield partition_record(scan_partition(batches, quantizer, shipped.value, k))

        records = codes.mapInArrow(scan, SCAN_OUTPUT_DDL).toArrow().to_pylist()
        D, ids = merge_topk([partition_from_record(r, nq) for r in records], k)
        all_D.append(D)
        all_ids.append(ids)
        shipped.unpersist()
        log.info("query batch %d/%d: %d queries x %d codes, top-%d in %.2f s", b + 1, n_batches, nq, n_db, k,
                 time.time() - started)
    payload.unpersist()
    return np.vstack(all_D), np.vstack(all_ids)
