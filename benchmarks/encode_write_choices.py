"""Two choices of the full encode's Spark write, measured: the shuffle by shard before the write,
and Delta's per-file min/max statistics on the code table. (Since the encode tasks write the code
files themselves where they can, ``spark.encode.write_code_files``, Spark's writer is the path for
the other code tables: remote storage, other protocols; this benchmark measures that path.)

    python benchmarks/encode_write_choices.py --n 1000000 --out FILE.json

Same embeddings table and model as encode_speed.py (real embeddings replicated to n rows, DQN or
PQ at 64 bits). It runs the full encode's steps as ``spark.encode._full`` composes them (direct
read by the tasks, encode, code rows, one Delta overwrite) in three variants, alternating, each
into a fresh code table on local[2], after one untimed run over the same rows:
  shipped:          the rows shuffled by shard (one file per shard), Delta's default statistics
                    (min/max of the first 32 columns): what the job does;
  without_shuffle:  each direct-read task writes its own shard files (tasks x shards files);
  without_stats:    shuffled, but ``delta.dataSkippingNumIndexedCols=0`` (row counts only; every
                    code file spans its shard's whole clip_id range, so min/max skip nothing).
Writes {"n", "method", "repeats", "<variant>_s" (median), "<variant>_times_s", "<variant>_files",
"without_shuffle_over_shipped", "without_stats_over_shipped", load average, machine} and prints it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from encode_speed import fit, open_tables
from real_data import CACHE, machine

N_SHARDS = 8
NO_MIN_MAX = {"delta.dataSkippingNumIndexedCols": "0"}


def encode_variant(spark, bundle, embeddings: str, version: int, out: str, shuffle: bool, stats: bool) -> int:
    """One full encode into ``out`` (``_full``'s steps, with the two choices as given); returns the
    number of code files written."""

    from audiohash.config import EncodeSettings
    from audiohash.encoding import Lineage
    from audiohash.spark.code_writer import code_rows, encode_frame
    from audiohash.spark.embedding_reader import embedding_rows
    from audiohash.spark.tables import session_conf, table_state

    state = table_state(spark, embeddings)
    lineage = Lineage(bundle.model_name, bundle.model_version, N_SHARDS, ("db",), embeddings, version)
    with session_conf(spark, {"spark.sql.maxConcurrentOutputFileWriters": str(N_SHARDS)}):
        rows = embedding_rows(spark, embeddings, version, ["db"], state)
        assert rows.file_groups is not None, "the benchmark table should be read by the tasks"
        encoded, _ = encode_frame(rows, bundle, N_SHARDS, EncodeSettings().batch_rows)
        if shuffle:
            encoded = encoded.repartition(N_SHARDS, "shard")
        codes = code_rows(encoded, lineage, dt.datetime.now(dt.timezone.utc))
        writer = (codes.write.format("delta").mode("overwrite").partitionBy("shard")
                  .option("userMetadata", lineage.to_json()))
        for key, value in ({} if stats else NO_MIN_MAX).items():  # delta.* options become table properties
            writer = writer.option(key, value)
        writer.save(out)
    return len(spark.read.format("delta").load(out).inputFiles())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--method", default="dqn", choices=["pq", "dqn"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant, alternating (medians)")
    parser.add_argument("--out", default="benchmarks/results/encode_write_choices.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)

    spark, data, (embeddings, version), (warmup, warmup_version) = open_tables(args.n)
    bundle = fit(args.method, data)
    variants = {"shipped": (True, True), "without_shuffle": (False, True), "without_stats": (True, False)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    files: dict[str, int] = {}
    work = Path(tempfile.mkdtemp(prefix="encode-write-", dir=CACHE))
    load = os.getloadavg()[0]
    try:
        encode_variant(spark, bundle, warmup, warmup_version, str(work / "warmup"), True, True)  # workers up
        # One untimed run over the n rows: the table's snapshot and the JIT warm, for every variant.
        encode_variant(spark, bundle, embeddings, version, str(work / "warmup-n"), True, True)
        for _ in range(args.repeats):
            for name, (shuffle, stats) in variants.items():
                out = work / name
                shutil.rmtree(out, ignore_errors=True)
                started = time.perf_counter()
                files[name] = encode_variant(spark, bundle, embeddings, version, str(out), shuffle, stats)
                times[name].append(round(time.perf_counter() - started, 3))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    spark.stop()
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {"n": args.n, "method": args.method, "repeats": args.repeats,
              **{f"{name}_s": round(m, 3) for name, m in medians.items()},
              **{f"{name}_times_s": t for name, t in times.items()},
              **{f"{name}_files": f for name, f in files.items()},
              "without_shuffle_over_shipped": round(medians["without_shuffle"] / medians["shipped"], 3),
              "without_stats_over_shipped": round(medians["without_stats"] / medians["shipped"], 3),
              "load_avg_start": round(load, 2), "load_avg_end": round(os.getloadavg()[0], 2), "machine": machine()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
