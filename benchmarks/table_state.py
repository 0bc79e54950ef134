"""Reading a freshly appended Delta version's state: ``tables.table_state`` vs delta-spark's calls.

    python benchmarks/table_state.py --n 1000000 --out FILE.json

What the encode job needs of a table version before it reads it: version, table id, reader
protocol, partitioning, properties and the data files. On the n-row embeddings table of
encode_speed.py (real embeddings, replicated; built once under benchmarks/.cache), each round
appends n/100 rows twice (untimed, as the extract job would) and times, each on a version nobody
has read yet:
  ours: ``table_state`` (``delta_tables``: delta-rs over the Delta log, no JVM, no Spark job);
  reference: ``DeltaTable.detail()`` and ``DataFrame.inputFiles()``, what the jobs called before.
Both must give the same version, id and files. The table is restored to its n rows at the end.
Writes {"n", "rounds", "ours_s", "reference_s" (medians), "ratio" (ours_s / reference_s), the
per-round times, ...}.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

from encode_speed import open_tables, write_rows
from real_data import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/table_state.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    from delta.tables import DeltaTable

    from audiohash.spark.tables import table_state

    spark, data, (embeddings, base), _ = open_tables(args.n)
    _, labels, x = data.split("db")
    new = args.n // 100
    ours, reference = [], []
    try:
        for r in range(args.rounds):
            first = args.n + 2 * r * new
            version = write_rows(spark, x, labels, first, first + new, 1 + 2 * r, embeddings)
            started = time.perf_counter()
            state = table_state(spark, embeddings)
            ours.append(time.perf_counter() - started)
            assert state.version == version and state.files is not None, "no file listing"

            version = write_rows(spark, x, labels, first + new, first + 2 * new, 2 + 2 * r, embeddings)
            started = time.perf_counter()
            detail = DeltaTable.forPath(spark, embeddings).detail().first()
            files = spark.read.format("delta").option("versionAsOf", version).load(embeddings).inputFiles()
            reference.append(time.perf_counter() - started)
            assert detail["id"] == state.table_id and detail["minReaderVersion"] == state.min_reader_version
            after = table_state(spark, embeddings)
            assert after.version == version and sorted(after.files) == sorted(files), "listings differ"
    finally:
        DeltaTable.forPath(spark, embeddings).restoreToVersion(base)
    ours_s, reference_s = statistics.median(ours), statistics.median(reference)
    result = {"n": args.n, "appended_rows": new, "rounds": args.rounds, "ours_s": round(ours_s, 4),
              "reference_s": round(reference_s, 4), "ratio": round(ours_s / reference_s, 4),
              "ours_times_s": [round(t, 4) for t in ours], "reference_times_s": [round(t, 4) for t in reference],
              "load_avg_end": round(os.getloadavg()[0], 2), "machine": machine()}
    spark.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
