"""What the inverted file costs in retrieval quality on the real GM benchmark: mAP@100 per nprobe
against the exhaustive scan of the same codes.

    python benchmarks/ivf_quality.py --out FILE.json [--methods pq,dqn,dqn_cls] [--bits 32]

Per method: the train job's own training (``training.train_bundle``: 10% labels, seed 0) on the
database split, lists as the train job makes them with ``train.ivf_lists=-1`` (about 4 sqrt(n)
of the training rows), the database encoded with its lists, and every query ranked by the query
job's own scan and merge (``ranking.scan_partition`` / ``merge_topk``, what each Spark task and
the in-process runner run) with nprobe 0 (every code) and the sweep. Writes one object per
method: {"method", "bits", "nlist", "sweep": [{"nprobe", "map_at_100", "recall_at_100",
"codes_per_query"}...], "map_at_100_exhaustive"} and prints the table.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
from real_data import machine, real_embeddings

from audiohash.arrow_arrays import binary_column
from audiohash.evaluation import ranked_positions, retrieval_metrics
from audiohash.ivf import default_nlist, nearest_lists
from audiohash.ranking import merge_topk, scan_partition
from audiohash.training import train_bundle

log = logging.getLogger("benchmarks.ivf_quality")
SWEEP = (1, 2, 4, 8, 16, 32, 64)
TOP = 100


def run_method(method: str, bits: int, data, sweep) -> dict:
    ids, labels, x = data.split("db")
    order = np.argsort(ids)  # as the jobs read the database: by clip_id
    ids, labels, x = ids[order], labels[order], x[order]
    _, yq, xq = data.split("query")
    bundle, _ = train_bundle(method, bits, x, labels, 0.1, 0, {}, f"ivf-{method}", {})
    q = bundle.quantizer
    q.fit_lists(x, default_nlist(len(x)))
    codes, lists = q.encode_with_lists(x)
    batch = pa.RecordBatch.from_arrays([pa.array(ids.tolist()), binary_column(codes), pa.array(lists, pa.int32())],
                                       names=["clip_id", "code", "list_id"])
    zq = q.query_side(xq)

    def ranked(nprobe: int):
        probes = nearest_lists(zq, q.ivf_centroids, nprobe) if nprobe else None
        part = scan_partition([batch], q, zq, TOP, probes)
        return merge_topk([part], TOP)[1], part.compared / len(zq)

    exhaustive, _ = ranked(0)
    map_exhaustive = retrieval_metrics(yq, labels, ranked_positions(exhaustive, ids))[f"map_at_{TOP}"]
    rows = []
    for nprobe in sweep:
        if nprobe > q.nlist:
            break
        found, per_query = ranked(nprobe)
        recall = np.mean([len(set(a) & set(b)) / TOP for a, b in zip(found.tolist(), exhaustive.tolist())])
        rows.append({"nprobe": nprobe, "map_at_100": round(retrieval_metrics(
            yq, labels, ranked_positions(found, ids))[f"map_at_{TOP}"], 4), "recall_at_100": round(float(recall), 4),
            "codes_per_query": round(per_query)})
        log.info("%s nprobe %d: %s", method, nprobe, rows[-1])
    return {"method": method, "bits": bits, "nlist": q.nlist, "n_db": len(ids), "n_queries": len(xq),
            "map_at_100_exhaustive": round(map_exhaustive, 4), "sweep": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="pq,dqn,dqn_cls")
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--sweep", default=",".join(map(str, SWEEP)))
    parser.add_argument("--out", default="benchmarks/results/ivf_quality.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    data = real_embeddings("gm")
    sweep = tuple(int(v) for v in args.sweep.split(","))
    results = [run_method(m, args.bits, data, sweep) for m in args.methods.split(",")]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"results": results, "machine": machine()}, indent=2))
    for r in results:
        print(f"{r['method']} {r['bits']} bits, {r['nlist']} lists: mAP@100 exhaustive {r['map_at_100_exhaustive']:.4f}")
        for s in r["sweep"]:
            print(f"  nprobe {s['nprobe']:3d}: mAP@100 {s['map_at_100']:.4f} (delta "
                  f"{100 * (s['map_at_100'] - r['map_at_100_exhaustive']):+.2f} points), recall@100 "
                  f"{s['recall_at_100']:.3f}, {s['codes_per_query']} codes per query")


if __name__ == "__main__":
    main()
