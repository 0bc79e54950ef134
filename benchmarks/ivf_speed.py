"""The query job with an inverted file (IVF) vs its own exhaustive scan and vs faiss's IndexIVFPQ.

    python benchmarks/ivf_speed.py --n 1000000 --queries 1000 --topk 100 --out FILE.json

For PQ 64 bits and DQN 64 bits (10% labels): the real GM benchmark embeddings (the extract job's
default extractor), replicated with small noise to n rows as the other speed benchmarks do, are
encoded in batches straight into a Delta code table (``in_process.write_code_table``: the encode
job's task writer and commit, so no n-row embeddings table is needed), with ``--nlist`` lists
(default about 4 sqrt(n)) trained on a replicated sample in the code space (``--train-rows-per-list``
rows per list). Then, in one run on
local[2] with the same codes and coarse centroids:
  - exhaustive_s: our query job's scan of every code (``search_codes``, nprobe 0);
  - ours_cold_s: the first probed search over the table: the scan tasks read the files and add
    the codes to their lists (kept in the Python workers for the searches after it);
  - per nprobe of the sweep: ours_s (the job's probed scan, the lists in the workers: the median
    of --repeats), codes_per_query, recall_at_100 of its top-100 against the exhaustive top-100 of
    the same codes (ties counted as found, ``ranking.probed_recall``: replicated embeddings share
    codes, so by clip id recall stays below 1 even with every list probed; id_recall_at_100 by
    clip id);
    faiss_s and faiss_recall_at_100: faiss's own IndexIVFPQ (same centroids and codebooks, codes
    not residuals, 2 threads, codes in memory) with the same nprobe.
Writes a JSON list, one object per method: {"n", "method", "exhaustive_s", "sweep": [{"nprobe",
"ours_s", "faiss_s", "recall_at_100", "faiss_recall_at_100", "codes_per_query"}...], ...}, and a plot
of recall vs time next to it (.png).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
from real_data import CACHE, encode_input_batch, machine, real_embeddings, replicate

from audiohash.bundle import ModelBundle
from audiohash.quantizers import make_quantizer
from audiohash.ranking import probed_recall

log = logging.getLogger("benchmarks.ivf_speed")
BITS = 64
CHUNK = 250_000
DQN_HYPER = {"steps": 600}  # as benchmarks/encode_speed.py: the speed does not depend on training length
SWEEP = (1, 2, 4, 8, 16, 32, 64)


def fit(method: str, data, nlist: int, n: int, rows_per_list: int = 64) -> ModelBundle:
    """The model (10% labels for DQN) and its lists, trained on a replicated sample of the database."""
    from audiohash.training import sample_labeled, seed_everything

    _, labels, x_db = data.split("db")
    seed_everything(0)
    quantizer = make_quantizer(method, BITS, seed=0, **(DQN_HYPER if method == "dqn" else {}))
    label_ids, _ = sample_labeled(labels, 0.1, 0)
    quantizer.fit(x_db, label_ids if quantizer.supervised else None)
    quantizer.fit_lists(replicate(x_db, min(n, rows_per_list * nlist), seed=99), nlist)
    return ModelBundle(quantizer, f"bench-ivf-{method}-{BITS}b", 1, {})


def build_code_table(bundle: ModelBundle, x_db: np.ndarray, n: int, n_shards: int, path: str) -> None:
    """n codes of replicated real embeddings, encoded batch by batch (``encoding.encode_batch``: codes,
    lists, shards by list range) and committed as the encode job does; reused when present."""
    from audiohash.encoding import Lineage, encode_batch
    from audiohash.in_process import write_code_table

    marker = Path(path) / "_benchmark.json"
    q = bundle.quantizer
    key = {"n": n, "method": bundle.method, "bits": q.n_bits, "shards": n_shards, "nlist": q.nlist,
           "centroids": float(np.abs(q.ivf_centroids).sum()), "layout": 1}
    if marker.exists() and json.loads(marker.read_text()) == key:
        return
    log.info("encoding %d codes into %s", n, path)
    encoded = []
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        x = replicate(x_db, stop - start, seed=start)
        batch = encode_input_batch([f"c{i:09d}" for i in range(start, stop)], None, x)
        encoded.append(encode_batch(batch, q, n_shards))
    lineage = Lineage(bundle.model_name, bundle.model_version, n_shards, ("db",), "benchmark (replicated)", 0)
    write_code_table(path, pa.Table.from_batches(encoded), lineage)
    marker.write_text(json.dumps(key))


def faiss_ivf(bundle: ModelBundle, path: str):
    """faiss's IndexIVFPQ over the table's codes, in memory (same centroids, codebooks, lists), and
    the clip ids of its row numbers."""
    from deltalake import DeltaTable

    from audiohash.arrow_arrays import code_matrix
    from audiohash.ivf import add_codes, ivf_index

    q = bundle.quantizer
    table = DeltaTable(path).to_pyarrow_table(columns=["clip_id", "code", "list_id"])
    codes = code_matrix(table.column("code"), q.code_size)
    lists = table.column("list_id").to_numpy()
    index = ivf_index(q.ivf_centroids, q.centroids)
    add_codes(index, codes, lists)
    return index, table.column("clip_id").to_numpy(zero_copy_only=False)


def id_recall_at(ids: np.ndarray, reference: np.ndarray) -> float:
    """Mean over queries of |ids ∩ reference| / k, by clip id (ties not counted as found)."""
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids.tolist(), reference.tolist())]))


def run_method(spark, method: str, data, n: int, queries: int, topk: int, nlist: int, repeats: int,
               n_shards: int, sweep: tuple[int, ...], rows_per_list: int) -> dict:
    from audiohash.spark.query import ScanParams, search_codes

    _, _, x_db = data.split("db")
    xq = replicate(data.split("query")[2], queries, noise=0.0)
    bundle = fit(method, data, nlist, n, rows_per_list)
    path = str(CACHE / f"ivf-codes-{method}-{BITS}b-n{n}-l{nlist}")
    build_code_table(bundle, x_db, n, n_shards, path)
    search_codes(spark, bundle, xq[:1], ScanParams(path, topk, 1000, nprobe=0))  # start the Python workers

    def ours(nprobe):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            found = search_codes(spark, bundle, xq, ScanParams(path, topk, 1000, nprobe=nprobe))
            times.append(time.perf_counter() - started)
        return statistics.median(times), found

    exhaustive_s, exhaustive = ours(0)
    started = time.perf_counter()  # the first probed search reads the files and fills the lists
    search_codes(spark, bundle, xq, ScanParams(path, topk, 1000, nprobe=sweep[0]))
    cold_s = time.perf_counter() - started
    index, db_ids = faiss_ivf(bundle, path)
    faiss.omp_set_num_threads(2)
    zq = bundle.quantizer.query_side(xq)
    rows = []
    for nprobe in sweep:
        if nprobe > bundle.quantizer.nlist:
            break
        ours_s, found = ours(nprobe)
        index.nprobe = nprobe
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            D, I = index.search(zq, topk)
            times.append(time.perf_counter() - started)
        faiss_ids = np.where(I >= 0, db_ids[np.maximum(I, 0)], None)
        faiss_s = statistics.median(times)
        row = {"nprobe": nprobe, "ours_s": round(ours_s, 3), "faiss_s": round(faiss_s, 4),
               "recall_at_100": round(probed_recall(found.distances, exhaustive.distances), 4),
               "faiss_recall_at_100": round(probed_recall(np.where(I >= 0, D, np.inf), exhaustive.distances), 4),
               "codes_per_query": round(found.codes_per_query), "speedup": round(exhaustive_s / ours_s, 2),
               "ratio_to_faiss": round(ours_s / faiss_s, 2),
               "id_recall_at_100": round(id_recall_at(found.clip_ids, exhaustive.clip_ids), 4),
               "faiss_id_recall_at_100": round(id_recall_at(faiss_ids, exhaustive.clip_ids), 4)}
        log.info("%s nprobe %d: %s", method, nprobe, row)
        rows.append(row)
    return {"n": n, "method": method, "bits": BITS, "nlist": bundle.quantizer.nlist, "queries": queries,
            "topk": topk, "exhaustive_s": round(exhaustive_s, 3), "sweep": rows, "repeats": repeats,
            "ours_cold_s": round(cold_s, 3)}


def plot(results: list[dict], path: Path) -> None:
    from audiohash.plots import plot_metric_vs

    rows = [{"method": f"{r['method']} ours", "ours_s": s["ours_s"], "recall": s["recall_at_100"]}
            for r in results for s in r["sweep"]]
    rows += [{"method": f"{r['method']} faiss IVFPQ", "ours_s": s["faiss_s"], "recall": s["faiss_recall_at_100"]}
             for r in results for s in r["sweep"]]
    plot_metric_vs(rows, "ours_s", "recall", path, f"IVF at {results[0]['n']:,} codes: recall@100 vs time",
                   "seconds for the queries", "recall@100 vs exhaustive", logx=True)


def set_up(args):
    """What the IVF benchmarks (this one, ivf_profile.py) start from, given their --n, --nlist and
    --sweep: logging, a local[2] session, the real GM embeddings, the lists (0 = about 4 sqrt(n))
    and the nprobe values."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from audiohash.config import SparkSettings
    from audiohash.spark.session import get_spark

    spark = get_spark(SparkSettings(master="local[2]", show_progress=False, extra={"spark.ui.enabled": "false"}))
    return (spark, real_embeddings("gm"), args.nlist or round(4 * math.sqrt(args.n)),
            tuple(int(v) for v in args.sweep.split(",")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--topk", type=int, default=100)
    parser.add_argument("--nlist", type=int, default=0, help="lists; 0 = about 4 sqrt(n)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; medians count")
    parser.add_argument("--train-rows-per-list", type=int, default=64,
                        help="replicated rows the coarse k-means trains on, per list (faiss wants 39 to 256)")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--methods", default="pq,dqn")
    parser.add_argument("--sweep", default=",".join(map(str, SWEEP)), help="nprobe values")
    parser.add_argument("--out", default="benchmarks/results/ivf_speed.json")
    args = parser.parse_args()
    spark, data, nlist, sweep = set_up(args)
    results = [{**run_method(spark, method, data, args.n, args.queries, args.topk, nlist, args.repeats, args.shards,
                             sweep, args.train_rows_per_list), "train_rows_per_list": args.train_rows_per_list,
                "machine": machine()} for method in args.methods.split(",")]
    spark.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(json.dumps([{k: v for k, v in r.items() if k != "machine"} for r in results], indent=2))


if __name__ == "__main__":
    main()
