"""Encode job vs one in-process encode loop, same model, same embeddings.

    python benchmarks/encode_speed.py --n 1000000 --out FILE.json

Embeddings: the real logmel embeddings of the GM benchmark dataset (real_data.py, full size),
replicated with small noise to n rows and written once as a Delta embeddings table under
benchmarks/.cache, reused by later runs (its latest version holds the n rows). For PQ and DQN at
64 bits, fitted on the real db split, it times in one run:
  (a) ours_s: the encode stage on local[2] (spark/encode.py ``encode_codes``, full mode) from the
      embeddings table's latest version to the committed Delta code table: the tasks read the
      version's Parquet files (or Spark's reader feeds them, where the files do not qualify: "read" in the
      JSON), torch forward + faiss encode there, code rows by shard, one Delta commit. Session
      start and bundle loading are excluded; the Python workers are started by an untimed run on a
      tiny table;
  (b) reference_s: the same quantizer's ``encode`` over the same rows as an in-memory float32
      array, in chunks of ``encoding.ENCODE_CHUNK_ROWS`` rows (what each worker's encode call
      gets too), torch and faiss on 2 threads;
  then incremental_s: the median of as many incremental runs as full ones, each after another
  n/100 new clips were appended (untimed): they are encoded and appended (the same statistic as
  ours_s, whose first run is also the slowest); and noop_s: the rerun with nothing changed (writes
  nothing). The table is then restored to its n rows (a Delta RESTORE, untimed).
Writes a JSON list, one object per method: {"n", "method", "ours_s", "reference_s", "ratio"
(ours_s / reference_s), "clips_per_s" (n / ours_s), "incremental_s", "incremental_fraction"
(incremental_s / ours_s), "noop_s", "codes_equal" (our codes == the reference's), ...}.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from real_data import CACHE, machine, real_embeddings, replicate

from audiohash.bundle import ModelBundle
from audiohash.quantizers import make_quantizer

log = logging.getLogger("benchmarks.encode_speed")
CHUNK = 100_000  # rows generated per task; the reference array is built from the same chunks
BITS = 64
DQN_HYPER = {"steps": 300, "warmup_steps": 100}  # training length only; the network is the default one
EMBEDDINGS_FORMAT = 3  # bump when the generated table changes


def chunk_rows(x_base: np.ndarray, labels: np.ndarray, start: int, stop: int, seed: int) -> tuple[list, np.ndarray, list]:
    """Rows start..stop of a replicated table: (clip ids, embeddings float32 (stop-start, d), labels)."""
    x = replicate(x_base, stop - start, seed=seed + start)
    ids = [f"bench-{i:010d}" for i in range(start, stop)]
    return ids, x, labels[np.arange(start, stop) % len(labels)].tolist()


def arrow_rows(ids: list, x: np.ndarray, labels: list) -> pa.RecordBatch:
    """Rows of ``schemas.EMBEDDINGS_DDL``, as the extract job writes them."""
    m, dim = x.shape
    offsets = pa.array(np.arange(0, x.size + 1, dim, dtype=np.int32))
    return pa.RecordBatch.from_pydict({
        "clip_id": pa.array(ids), "path": pa.array([f"/bench/{i}.wav" for i in ids]), "label": pa.array(labels),
        "split": pa.array(["db"] * m), "source": pa.array(["bench"] * m), "offset_s": pa.array(np.zeros(m)),
        "embedding": pa.ListArray.from_arrays(offsets, pa.array(x.ravel(), pa.float32())),
        "extractor": pa.array(["logmel"] * m), "extractor_version": pa.array(["bench"] * m),
        "sample_rate": pa.array(np.full(m, 16000, np.int32)),
        "extracted_at": pa.array(np.full(m, np.datetime64("2026-01-01T00:00:00", "us")), pa.timestamp("us", tz="UTC")),
    })


def write_rows(spark, x_base: np.ndarray, labels: np.ndarray, first: int, stop: int, seed: int, path: str) -> int:
    """Append rows first..stop-1 of the replicated table in one commit; returns the new version.
    Generated in the executors, one file per chunk of 100,000 rows (~50 MB, like the extract
    job's task outputs)."""
    from pyspark import cloudpickle

    import real_data
    from audiohash.schemas import EMBEDDINGS_DDL
    from audiohash.spark.tables import table_version

    for module in {real_data, sys.modules[__name__]} - {sys.modules["__main__"]}:
        cloudpickle.register_pickle_by_value(module)  # the executors cannot import benchmarks/

    def chunks(batches):
        for batch in batches:
            for chunk in batch.column("id").to_pylist():
                start = first + chunk * CHUNK
                yield arrow_rows(*chunk_rows(x_base, labels, start, min(start + CHUNK, stop), seed))

    n_chunks = -(-(stop - first) // CHUNK)
    (spark.range(n_chunks, numPartitions=n_chunks).mapInArrow(chunks, EMBEDDINGS_DDL)
     .write.format("delta").mode("append").save(path))
    return table_version(spark, path)


def build_embeddings(spark, x_base: np.ndarray, labels: np.ndarray, n: int, path: str) -> int:
    """A Delta embeddings table whose latest version holds rows 0..n-1 (version 0, or a restore
    of it), reused when present; returns that version. The benchmark appends the new clips of the
    incremental run itself and restores the table afterwards, so that the timed full runs read
    the latest version, as the encode job does (time travel to an older version costs a snapshot
    of its own: about 1 s more at 1M rows)."""
    from delta.tables import DeltaTable

    from audiohash.spark.tables import table_exists, table_version

    marker = Path(path) / "_benchmark.json"
    key = {"n": n, "format": EMBEDDINGS_FORMAT, "base_rows": len(x_base)}
    if table_exists(spark, path) and marker.exists() and json.loads(marker.read_text()) == key:
        if spark.read.format("delta").load(path).count() != n:  # a run stopped before restoring it
            DeltaTable.forPath(spark, path).restoreToVersion(0)
        return table_version(spark, path)
    shutil.rmtree(path, ignore_errors=True)
    log.info("writing a Delta embeddings table of %d rows at %s", n, path)
    version = write_rows(spark, x_base, labels, 0, n, 0, path)
    marker.write_text(json.dumps(key))
    return version


def reference_matrix(x_base: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """The version-0 rows as one in-memory float32 (n, d) array, in clip_id order."""
    return np.concatenate([chunk_rows(x_base, labels, s, min(s + CHUNK, n), 0)[1] for s in range(0, n, CHUNK)])


def reference_encode(quantizer, x: np.ndarray) -> np.ndarray:
    import faiss
    import torch

    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    from audiohash.encoding import ENCODE_CHUNK_ROWS

    return np.concatenate([quantizer.encode(x[i: i + ENCODE_CHUNK_ROWS]) for i in range(0, len(x), ENCODE_CHUNK_ROWS)])


def fit(method: str, data) -> ModelBundle:
    from audiohash.training import sample_labeled, seed_everything

    _, labels, x_db = data.split("db")
    seed_everything(0)
    hyper = DQN_HYPER if method.startswith("dqn") else {}
    quantizer = make_quantizer(method, BITS, seed=0, **hyper)
    label_ids, _ = sample_labeled(labels, 0.1, 0)
    quantizer.fit(x_db, label_ids if quantizer.supervised else None)
    return ModelBundle(quantizer, f"bench-{method}-{BITS}b", 1, {})


def run_method(spark, method: str, data, n: int, embeddings: str, warmup_table: str, x_ref: np.ndarray,
               repeats: int) -> dict:
    from delta.tables import DeltaTable

    from audiohash.arrow_arrays import code_matrix
    from audiohash.config import EncodeSettings
    from audiohash.spark.encode import EncodeParams, encode_codes

    _, db_labels, x_db = data.split("db")
    base = build_embeddings(spark, x_db, db_labels, n, embeddings)
    bundle = fit(method, data)
    work = Path(tempfile.mkdtemp(prefix=f"encode-{method}-", dir=CACHE))
    try:
        params = EncodeParams(embeddings, str(work / "codes"), str(work / "rejects"), 8, ("db",), "full",
                              EncodeSettings().batch_rows)
        warmup = replace(params, embeddings_table=warmup_table, codes_table=str(work / "warmup-codes"))
        encode_codes(spark, bundle, warmup)  # starts the Python workers, loads the bundle there
        ours_times, ref_times, summary, ref_codes = [], [], None, None
        for _ in range(repeats):  # ours and the reference alternate, so both see the same machine load
            shutil.rmtree(work / "codes", ignore_errors=True)
            started = time.perf_counter()
            summary = encode_codes(spark, bundle, replace(params, embeddings_version=base))
            ours_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            ref_codes = reference_encode(bundle.quantizer, x_ref)
            ref_times.append(time.perf_counter() - started)
        assert summary.encoded == n, summary.line()
        # The nightly rerun: 1% new clips appended (untimed), encoded, again `repeats` times; then
        # a rerun with nothing new; the table is then restored to its n rows.
        new = n // 100
        incremental_times = []
        try:
            for r in range(repeats):
                appended = write_rows(spark, x_db, db_labels, n + r * new, n + (r + 1) * new, 1 + r, embeddings)
                started = time.perf_counter()
                incremental = encode_codes(spark, bundle, replace(params, mode="incremental",
                                                                  embeddings_version=appended))
                incremental_times.append(time.perf_counter() - started)
                assert incremental.mode == "append" and incremental.encoded == new, incremental.line()
            started = time.perf_counter()
            noop = encode_codes(spark, bundle, replace(params, mode="incremental", embeddings_version=appended))
            noop_s = time.perf_counter() - started
        finally:
            DeltaTable.forPath(spark, embeddings).restoreToVersion(base)
        assert not noop.wrote, noop.line()
        incremental_s = statistics.median(incremental_times)
        codes = spark.read.format("delta").option("versionAsOf", 0).load(str(work / "codes"))
        table = codes.select("clip_id", "code").orderBy("clip_id").toArrow()
        same = (code_matrix(table.column("code"), bundle.quantizer.code_size) == ref_codes).all(axis=1)
        n_files = len(codes.inputFiles())
        direct = summary.files_read is not None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours_s, reference_s = statistics.median(ours_times), statistics.median(ref_times)
    return {"n": n, "method": method, "bits": BITS, "ours_s": round(ours_s, 3), "reference_s": round(reference_s, 3),
            "ratio": round(ours_s / reference_s, 3), "clips_per_s": round(n / ours_s),
            "reference_clips_per_s": round(n / reference_s), "codes_equal": float(same.mean()),
            "codes_differing": int((~same).sum()), "code_files": n_files,
            "read": "files read by the tasks" if direct else "rows from Spark's Delta reader",
            "incremental_s": round(incremental_s, 3), "incremental_new_clips": new,
            "incremental_fraction": round(incremental_s / ours_s, 3), "noop_s": round(noop_s, 3),
            "incremental_times_s": [round(t, 3) for t in incremental_times],
            "ours_times_s": [round(t, 3) for t in ours_times], "reference_times_s": [round(t, 3) for t in ref_times]}


def open_tables(n: int):
    """What the encode benchmarks start from: the real embeddings, a local[2] session, and the
    embeddings tables of n rows and of 20,000 rows (for warm-up runs), built once under
    benchmarks/.cache. Returns (spark, data, (n-row table, its version), (warm-up table, its version))."""
    from audiohash.config import SparkSettings
    from audiohash.spark.session import get_spark

    data = real_embeddings("gm")
    _, db_labels, x_db = data.split("db")
    spark = get_spark(SparkSettings(master="local[2]", show_progress=False, extra={"spark.ui.enabled": "false"}))
    CACHE.mkdir(parents=True, exist_ok=True)
    tables = []
    for rows in (n, 20_000):
        path = str(CACHE / f"encode-embeddings-n{rows}")
        tables.append((path, build_embeddings(spark, x_db, db_labels, rows, path)))
    return spark, data, tables[0], tables[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--methods", default="pq,dqn")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of ours and the reference, alternating (medians)")
    parser.add_argument("--out", default="benchmarks/results/encode_speed.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)

    spark, data, (embeddings, _), (warmup, _) = open_tables(args.n)
    _, db_labels, x_db = data.split("db")
    x_ref = reference_matrix(x_db, db_labels, args.n)
    load = os.getloadavg()[0]
    results = [run_method(spark, m, data, args.n, embeddings, warmup, x_ref, args.repeats)
               for m in args.methods.split(",")]
    for r in results:
        r.update(load_avg_start=round(load, 2), load_avg_end=round(os.getloadavg()[0], 2), machine=machine())
    spark.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps([{k: v for k, v in r.items() if k != "machine"} for r in results], indent=2))


if __name__ == "__main__":
    main()
