"""Query job vs one faiss index on the same codes.

    python benchmarks/query_speed.py --n 1000000 --queries 1000 --topk 100 --out FILE.json

Builds (or reuses, under benchmarks/.cache) a Delta code table of n 64-bit PQ codes: real logmel
embeddings of the GM benchmark dataset, replicated with small noise to reach n (scan cost does
not depend on the content). Then times, in one run and on the same codes and codebooks:
  (a) ours: the query job's search (spark/query.py: broadcast, per-partition faiss scan, merge)
      on local[2], from reading the Delta table to the merged top-k, session start excluded;
  (b) faiss: IndexPQ.search with 2 threads, codes in memory.
Each is timed ``--repeats`` times, ours and faiss alternating; the medians count. Our first (cold) run, which also starts
Spark's Python workers, is reported separately as ours_cold_s.
With ``--fastscan`` it also times the 4-bit fast-scan mode (pq_fastscan, 16 x 4 bits) against
faiss IndexPQ and reports its mAP@all cost on the real dataset.
Writes {"n", "queries", "topk", "ours_s", "faiss_s", "ratio", "exact_match", ...} to --out.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import statistics
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from real_data import CACHE, machine, real_embeddings, replicate

from audiohash.arrow_arrays import binary_column, code_matrix
from audiohash.bundle import ModelBundle
from audiohash.encoding import Lineage, shard_of
from audiohash.quantizers import make_quantizer
from audiohash.ranking import ranking_mismatch

log = logging.getLogger("benchmarks.query_speed")


def build_code_table(spark, bundle: ModelBundle, x_db: np.ndarray, n: int, n_shards: int, path: str) -> None:
    """Write n codes of replicated real embeddings as a Delta code table (reused when present)."""
    from audiohash.spark.tables import overwrite_delta, table_exists

    marker = Path(path) / "_benchmark.json"
    key = {"n": n, "method": bundle.method, "bits": bundle.quantizer.n_bits, "shards": n_shards, "lineage": 1}
    if table_exists(spark, path) and marker.exists() and json.loads(marker.read_text()) == key:
        return
    log.info("building code table of %d codes at %s", n, path)
    chunks = []
    for start in range(0, n, 250_000):
        stop = min(n, start + 250_000)
        codes = bundle.quantizer.encode(replicate(x_db, stop - start, seed=start))
        clip_ids = [f"c{i:09d}" for i in range(start, stop)]
        chunks.append(pa.table({
            "clip_id": pa.array(clip_ids), "shard": pa.array(shard_of(clip_ids, n_shards)),
            "code": binary_column(codes), "label": pa.nulls(stop - start, pa.string()),
            "model_name": pa.array([bundle.model_name] * (stop - start)),
            "model_version": pa.array(np.full(stop - start, bundle.model_version, np.int32)),
            "embedding_version": pa.array(np.zeros(stop - start, np.int64)),
            "encoded_at": pa.array([dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)] * (stop - start),
                                   pa.timestamp("us", tz="UTC")),
        }))
    frame = spark.createDataFrame(pa.concat_tables(chunks))
    # The lineage jobs/encode.py commits with its codes: the query job checks the model against it.
    lineage = Lineage(bundle.model_name, bundle.model_version, n_shards, ("db",), "benchmark (replicated)", 0)
    overwrite_delta(frame.repartition(n_shards, "shard"), path, partition_by=("shard",),
                    user_metadata=lineage.to_json())
    marker.write_text(json.dumps(key))


def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return times, out


def run_mode(spark, method: str, bits: int, data, n: int, queries: int, topk: int, repeats: int,
             query_batch: int, n_shards: int) -> dict:
    """Time our job and faiss for one quantizer; returns the JSON fields."""
    from audiohash.spark.query import ScanParams, search_codes

    _, _, x_db = data.split("db")
    xq = replicate(data.split("query")[2], queries, noise=0.0)
    quantizer = make_quantizer(method, bits, seed=0).fit(x_db)
    bundle = ModelBundle(quantizer, f"bench-{method}-{bits}b", 1, {})
    path = str(CACHE / f"codes-{method}-{bits}b-n{n}")
    build_code_table(spark, bundle, x_db, n, n_shards, path)

    search_codes(spark, bundle, xq[:1], ScanParams(path, topk, query_batch))  # start the Python workers
    cold = time.perf_counter()
    search_codes(spark, bundle, xq, ScanParams(path, topk, query_batch))
    cold = time.perf_counter() - cold
    table = spark.read.format("delta").load(path).select("clip_id", "code").toArrow()
    db_ids = table.column("clip_id").to_numpy(zero_copy_only=False)
    faiss.omp_set_num_threads(2)
    index = quantizer.filled_scan_index(code_matrix(table.column("code"), quantizer.code_size))
    zq = quantizer.query_side(xq)
    # Ours and faiss alternate, so both see the same machine (this VM's speed drifts by 20-30%).
    ours_times, faiss_times = [], []
    for _ in range(repeats):
        seconds, found = timed(lambda: search_codes(spark, bundle, xq, ScanParams(path, topk, query_batch)), 1)
        D_ours, ids_ours = found.distances, found.clip_ids
        ours_times += seconds
        seconds, (D_ref, I_ref) = timed(lambda: index.search(zq, topk), 1)
        faiss_times += seconds
    ours_s, faiss_s = statistics.median(ours_times), statistics.median(faiss_times)
    # Equal top-k lists, allowing swaps among equal distances (and at the cut).
    mismatch = ranking_mismatch(D_ours, ids_ours, D_ref, db_ids[I_ref], complete=False)
    return {"method": method, "bits": bits, "ours_s": ours_s, "faiss_s": faiss_s, "ratio": ours_s / faiss_s,
            "exact_match": mismatch is None, "mismatch": mismatch, "ours_cold_s": cold,
            "ours_times_s": ours_times, "faiss_times_s": faiss_times,
            "ours_queries_per_s": queries / ours_s, "faiss_queries_per_s": queries / faiss_s}


def map_all(method: str, bits: int, data) -> float:
    """mAP@all of a quantizer on the real dataset (queries vs database), ranked by faiss in-process."""
    from audiohash.evaluation import retrieval_metrics

    _, db_labels, x_db = data.split("db")
    _, q_labels, xq = data.split("query")
    quantizer = make_quantizer(method, bits, seed=0).fit(x_db)
    _, I = quantizer.scan(quantizer.encode(x_db), quantizer.query_side(xq), len(x_db))
    return retrieval_metrics(q_labels, db_labels, I)["map_all"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--topk", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each, alternating; medians count")
    parser.add_argument("--query-batch", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--fastscan", action="store_true", help="also time the 4-bit fast-scan mode")
    parser.add_argument("--out", default="benchmarks/results/query_speed.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from audiohash.config import SparkSettings
    from audiohash.spark.session import get_spark

    data = real_embeddings("gm")
    spark = get_spark(SparkSettings(master="local[2]", show_progress=False, extra={"spark.ui.enabled": "false"}))
    pq = run_mode(spark, "pq", 64, data, args.n, args.queries, args.topk, args.repeats, args.query_batch, args.shards)
    result = {"n": args.n, "queries": args.queries, "topk": args.topk, "ours_s": pq["ours_s"],
              "faiss_s": pq["faiss_s"], "ratio": pq["ratio"], "exact_match": pq["exact_match"],
              "ours_cold_s": pq["ours_cold_s"], "detail": pq, "machine": machine()}
    if args.fastscan:
        fs = run_mode(spark, "pq_fastscan", 64, data, args.n, args.queries, args.topk, args.repeats,
                      args.query_batch, args.shards)
        result["fastscan"] = {
            **fs, "faiss_throughput_vs_indexpq": pq["faiss_s"] / fs["faiss_s"],
            "ours_throughput_vs_indexpq": pq["faiss_s"] / fs["ours_s"],
            "map_all_pq8": map_all("pq", 64, data), "map_all_pq4_fastscan": map_all("pq_fastscan", 64, data)}
    spark.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("detail", "machine")}, indent=2))


if __name__ == "__main__":
    main()
