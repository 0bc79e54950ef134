"""Mean and spread over several class splits of the unseen setting (one split is one draw).

    python benchmarks/quality.py --setting unseen --seed S --bits 32 --no-sweep --out unseen_S.json   # S = 0, 1, 2
    python benchmarks/quality_splits.py --out FILE.json unseen_0.json unseen_1.json unseen_2.json

Per method (32 bits and the references): mean, standard deviation and the per-split values of
mAP@all on all queries, on the queries of classes without labels in training (``unseen``), on
the others (``seen``), the points over PQ on unseen-class queries, and the seen-class retention
(mAP on seen-class queries over the same method's with every label). ``checks`` names the
supervised method with the best mean unseen-class mAP and its margin over PQ and retention.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from audiohash.report import SUPERVISED

BITS = 32


def summarize(reports: list[dict]) -> dict:
    settings = {r["dataset"]["setting"] for r in reports}
    if settings != {"unseen"}:
        raise SystemExit(f"expected quality.py results of --setting unseen, got settings {sorted(settings)}")
    datasets = {(r["dataset"]["name"], r["dataset"]["extractor"]) for r in reports}
    if len(datasets) != 1:
        raise SystemExit(f"results of different datasets/extractors: {sorted(datasets)}")
    per_method: dict[str, dict[str, list[float]]] = {}
    for report in reports:
        rows = {r["method"]: r for r in report["results"] if r["bits"] in (BITS, None)}
        pq_unseen = rows["pq"]["map_all_unseen"]
        for method, row in rows.items():
            values = {"map_all": row["map_all"], "map_all_unseen": row["map_all_unseen"],
                      "map_all_seen": row["map_all_seen"], "unseen_minus_pq_points": 100 * (row["map_all_unseen"] - pq_unseen)}
            if row.get("map_all_seen_default"):
                values["seen_retention"] = row["map_all_seen"] / row["map_all_seen_default"]
            for key, value in values.items():
                per_method.setdefault(method, {}).setdefault(key, []).append(value)
    methods = {m: {k: {"mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, 4),
                       "values": [round(x, 4) for x in v]} for k, v in metrics.items()}
               for m, metrics in per_method.items()}
    supervised = [m for m in SUPERVISED if m in methods and len(methods[m]["map_all_unseen"]["values"]) == len(reports)]
    checks = {}
    if supervised:
        best = max(supervised, key=lambda m: methods[m]["map_all_unseen"]["mean"])
        checks = {"best_on_unseen": best, "unseen_minus_pq_points": methods[best]["unseen_minus_pq_points"]["mean"],
                  "seen_retention": methods[best].get("seen_retention", {}).get("mean"),
                  "below_pq_on_unseen": [m for m in supervised if methods[m]["unseen_minus_pq_points"]["mean"] < 0]}
    name, extractor = datasets.pop()
    return {"benchmark": "quality_splits", "dataset": name, "extractor": extractor, "bits": BITS,
            "splits": [r["dataset"]["split_seed"] for r in reports],
            "unseen_classes": [r["dataset"].get("unseen_classes") for r in reports], "methods": methods, "checks": checks}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON summary")
    ap.add_argument("inputs", nargs="+", help="quality.py JSON files of --setting unseen, one per --seed")
    args = ap.parse_args(argv)
    summary = summarize([json.loads(Path(p).read_text()) for p in args.inputs])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"{summary['dataset']} / {summary['extractor']}, {BITS} bits, splits {summary['splits']}: mean (std) over splits, %")
    print("| method | all | unseen-class queries | seen-class queries | unseen minus PQ | seen retention |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, m in summary["methods"].items():
        def cell(key, scale=100.0):
            return f"{scale * m[key]['mean']:.1f} ({scale * m[key]['std']:.1f})" if key in m else ""
        print(f"| {method} | {cell('map_all')} | {cell('map_all_unseen')} | {cell('map_all_seen')} | "
              f"{cell('unseen_minus_pq_points', 1.0)} | {cell('seen_retention')} |")
    print("checks:", json.dumps(summary["checks"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
