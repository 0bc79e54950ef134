"""What moving embeddings from Spark's JVM to the Python workers costs, by column type.

    python benchmarks/embedding_transfer.py --n 1000000 --out FILE.json

The encode job reads every embedding (``array<float>``) out of the JVM into its Python workers
(mapInArrow). This measures that step alone, on local[2]: the encode benchmark's embeddings table
(real embeddings replicated to n rows, ``encode_speed.build_embeddings``, reused from
benchmarks/.cache) read with (clip_id, label, embedding) into a worker that only counts rows,
  (a) array_s: embedding as Spark's ``array<float>`` (what the tables hold today);
  (b) binary_s: the same floats as one little-endian ``binary`` value per row (a copy of the
      table, written once and cached), the fixed-width column issue 5's notes propose;
  (c) no_embedding_s: (clip_id, label) only: the floor of reading the rows at all.
Runs alternate, ``--repeats`` each; medians count. Wall seconds and CPU seconds of the whole
process tree (JVM and workers: what each costs whatever the machine's load). Writes {"n",
"array_s", "binary_s", "no_embedding_s", "ratio" (array_s / binary_s), the CPU twins, every run}
and prints it.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from encode_speed import build_embeddings
from extract_speed import process_tree_cpu_s
from real_data import CACHE, machine, real_embeddings

log = logging.getLogger("benchmarks.embedding_transfer")


def as_binary(batches):
    """(clip_id, label, embedding list<float>) batches -> the same with one binary value per row."""
    for batch in batches:
        column = batch.column("embedding")
        values = column.values.to_numpy(zero_copy_only=False).astype("<f4", copy=False)
        width = 4 * (len(values) // max(len(column), 1))
        offsets = pa.array(np.arange(0, len(column) * width + 1, width, dtype=np.int32))
        blob = pa.BinaryArray.from_buffers(pa.binary(), len(column), [None, offsets.buffers()[1], pa.py_buffer(values)])
        yield pa.RecordBatch.from_arrays([batch.column("clip_id"), batch.column("label"), blob],
                                         names=["clip_id", "label", "embedding"])


def count_rows(batches):
    yield pa.RecordBatch.from_arrays([pa.array([sum(b.num_rows for b in batches)], pa.int64())], names=["rows"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/embedding_transfer.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    from audiohash.config import SparkSettings
    from audiohash.spark.session import get_spark

    _, labels, x_db = real_embeddings("gm").split("db")
    spark = get_spark(SparkSettings(master="local[2]", show_progress=False, extra={"spark.ui.enabled": "false"}))
    table = str(CACHE / f"encode-embeddings-n{args.n}")
    build_embeddings(spark, x_db, labels, args.n, table)
    array_rows = spark.read.format("delta").option("versionAsOf", 0).load(table).select("clip_id", "label", "embedding")
    binary_table = CACHE / f"binary-embeddings-n{args.n}"
    if not (binary_table / "_delta_log").exists():
        log.info("writing the binary copy of %s", table)
        array_rows.mapInArrow(as_binary, "clip_id string, label string, embedding binary") \
            .write.format("delta").save(str(binary_table))
    binary_rows = spark.read.format("delta").load(str(binary_table))
    variants = {"array": array_rows, "binary": binary_rows, "no_embedding": array_rows.select("clip_id", "label")}

    def run(frame) -> tuple[float, float]:
        c0, t0 = process_tree_cpu_s(), time.perf_counter()
        rows = frame.mapInArrow(count_rows, "rows long").groupBy().sum("rows").first()[0]
        seconds, cpu = time.perf_counter() - t0, process_tree_cpu_s() - c0
        assert rows == args.n, f"read {rows} rows, expected {args.n}"
        return seconds, cpu

    for frame in variants.values():
        run(frame)  # untimed: workers started, classes loaded, page cache warm
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # alternating, so machine load hits all alike
        for name, frame in variants.items():
            runs[name].append(run(frame))
    spark.stop()
    med = {name: (statistics.median(w for w, _ in r), statistics.median(c for _, c in r)) for name, r in runs.items()}
    result = {"n": args.n, **{f"{name}_s": round(w, 3) for name, (w, _) in med.items()},
              **{f"{name}_cpu_s": round(c, 2) for name, (_, c) in med.items()},
              "ratio": round(med["array"][0] / med["binary"][0], 3),
              "cpu_ratio": round(med["array"][1] / med["binary"][1], 3),
              "runs": {name: [[round(w, 3), round(c, 2)] for w, c in r] for name, r in runs.items()},
              "master": "local[2]", "machine": machine()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "machine")}, indent=1))


if __name__ == "__main__":
    main()
