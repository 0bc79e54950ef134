"""Where a warm probed search's time goes (issue 24): the query job's stages against the floor of
an empty Spark job and against faiss's IndexIVFPQ, measured in the same run.

    python benchmarks/ivf_profile.py --n 16000000 --method dqn --sweep 16,32 --out FILE.json

The code table and the model are ``benchmarks/ivf_speed.py``'s (same replicated real GM
embeddings, same cache under benchmarks/.cache, same lists). After one cold search fills the
workers' lists, each nprobe of the sweep is searched ``--repeats`` times (1000 queries, top-100,
local[2]); per search ``search_codes`` reports its driver stages (``spark.query.SEARCH_STAGES``:
plan, batch_plan, spark_job, merge) and every scan task its own seconds. Reported per nprobe,
medians over the repeats:
  - ours_s: the whole search, and stages: the seconds of each stage;
  - groups, tasks: the file groups scanned (each a unit of the workers' lists cache) and the
    tasks that scanned them (one per group); group_scan_s_max / group_scan_s_min: the slowest /
    fastest group's scan in its task (reading nothing once the lists are cached);
  - empty_job_s: a job of as many tasks that each return one empty scan record (the scan's own
    ``indexed_tasks`` + ``toArrow`` path): what Spark costs before any scanning;
  - faiss_s: IndexIVFPQ over the same codes and lists, same nprobe, 2 threads; ratio_to_faiss.
Writes {"n", "method", "nlist", "queries", "topk", "repeats", "sweep": [{"nprobe", "ours_s",
"stages": {...}, "groups", "tasks", "group_scan_s_max", "group_scan_s_min", "empty_job_s",
"faiss_s", "ratio_to_faiss", "all_ours_s"}...], "machine"}.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import faiss
from ivf_speed import BITS, build_code_table, faiss_ivf, fit, set_up
from real_data import CACHE, machine, replicate

log = logging.getLogger("benchmarks.ivf_profile")


def empty_job_seconds(spark, n_tasks: int, repeats: int) -> float:
    """Median seconds of a job of ``n_tasks`` tasks that each yield one empty scan record, through
    the scan's own path (``indexed_tasks(...).toArrow()``)."""
    import numpy as np
    import pyarrow as pa

    from audiohash.ranking import PartitionTopK, partition_record
    from audiohash.schemas import SCAN_OUTPUT_DDL
    from audiohash.spark.tables import indexed_tasks

    def task(i):
        yield partition_record(PartitionTopK(np.zeros((1000, 0), np.float32), np.zeros((1000, 0), np.int32),
                                             pa.array([], pa.string())))

    times = []
    for _ in range(repeats + 1):  # the first starts the workers' code: not counted
        started = time.perf_counter()
        indexed_tasks(spark, n_tasks, task, SCAN_OUTPUT_DDL).toArrow()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def profile(spark, method: str, data, n: int, queries: int, topk: int, nlist: int, repeats: int, n_shards: int,
            sweep: tuple[int, ...]) -> dict:
    from audiohash.spark.query import SEARCH_STAGES, ScanParams, search_codes

    _, _, x_db = data.split("db")
    xq = replicate(data.split("query")[2], queries, noise=0.0)
    bundle = fit(method, data, nlist, n)
    path = str(CACHE / f"ivf-codes-{method}-{BITS}b-n{n}-l{nlist}")
    build_code_table(bundle, x_db, n, n_shards, path)
    search_codes(spark, bundle, xq, ScanParams(path, topk, 1000, nprobe=max(sweep)))  # cold: fill the lists
    index, _ = faiss_ivf(bundle, path)
    faiss.omp_set_num_threads(2)
    zq = bundle.quantizer.query_side(xq)
    rows = []
    for nprobe in sweep:
        totals, stages, task_max, task_min, n_groups = [], {s: [] for s in SEARCH_STAGES}, [], [], 0
        for _ in range(repeats):
            stats = []
            started = time.perf_counter()
            found = search_codes(spark, bundle, xq, ScanParams(path, topk, 1000, nprobe=nprobe), stats)
            totals.append(time.perf_counter() - started)
            for stage in SEARCH_STAGES:
                stages[stage].append(found.stage_seconds[stage])
            task_max.append(max(s.seconds for s in stats))
            task_min.append(min(s.seconds for s in stats))
            n_groups = len(stats)
        index.nprobe = nprobe
        faiss_times = []
        for _ in range(repeats):
            started = time.perf_counter()
            index.search(zq, topk)
            faiss_times.append(time.perf_counter() - started)
        ours_s, faiss_s = statistics.median(totals), statistics.median(faiss_times)
        row = {"nprobe": nprobe, "ours_s": round(ours_s, 3),
               "stages": {s: round(statistics.median(v), 3) for s, v in stages.items()},
               "groups": n_groups, "tasks": n_groups,
               "group_scan_s_max": round(statistics.median(task_max), 3),
               "group_scan_s_min": round(statistics.median(task_min), 3),
               "empty_job_s": round(empty_job_seconds(spark, n_groups, repeats), 3),
               "faiss_s": round(faiss_s, 4), "ratio_to_faiss": round(ours_s / faiss_s, 2),
               "all_ours_s": [round(t, 3) for t in totals]}
        log.info("%s nprobe %d: %s", method, nprobe, row)
        rows.append(row)
    return {"n": n, "method": method, "bits": BITS, "nlist": bundle.quantizer.nlist, "queries": queries,
            "topk": topk, "repeats": repeats, "sweep": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--method", default="dqn", choices=("pq", "dqn"))
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--topk", type=int, default=100)
    parser.add_argument("--nlist", type=int, default=0, help="lists; 0 = about 4 sqrt(n), as ivf_speed.py")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each; medians count")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--sweep", default="16,32", help="nprobe values")
    parser.add_argument("--out", default="benchmarks/results/ivf_profile.json")
    args = parser.parse_args()
    spark, data, nlist, sweep = set_up(args)
    result = {**profile(spark, args.method, data, args.n, args.queries, args.topk, nlist, args.repeats, args.shards,
                        sweep), "machine": machine()}
    spark.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
