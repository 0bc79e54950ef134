"""One clip at a time through the search service (``python -m audiohash.serve``), against the
extractor alone plus faiss's own single-query search on the same codes.

    python benchmarks/search_latency.py --n 1000000 --out FILE.json

For PQ 64 bits and DQN 64 bits (10% labels): the real GM benchmark embeddings (the extract job's
default extractor), replicated with small noise to n rows as the other speed benchmarks do, are
encoded in batches straight into a Delta code table (``in_process.write_code_table``: the encode
job's files and commit) whose lineage names an embeddings table holding the clips' metadata (the
label, source and path of the GM clip each replica copies; no embeddings: search never reads them
for these clips). The model is registered in an MLflow store under the benchmark's lake. Then:

- cold_start_s: ``python -m audiohash.serve`` started as a process, until it answers (interpreter,
  imports, the model from the registry, the code table version and metadata read, faiss index);
  first_audio_answer_s: until its first answer to an audio query (the extractor, built in the
  background after start, is ready by then);
- 200 queries by audio file (the GM query split's files, real renders), one at a time over HTTP:
  p50_ms / p99_ms end to end at the client, and the service's own split (``split_p50_ms``:
  decode+extract, model, scan);
- in the same run, each timed right after the service's answer to the same file (the machine's
  speed drifts), extract_p50_ms: the extract worker alone (``extraction.embed_files``: decode,
  window, embed) on the same files' bytes; faiss_p50_ms: faiss's own single-query search (IndexPQ
  over the same codes, the query side computed beforehand); overhead_ratio = p50 / (extract_p50 +
  faiss_p50);
- filtered_p50_ms: the same queries with ``label=L``, L the label whose share of the codes is
  nearest 1% (its share in ``filter_share``);
- qps_8_clients: queries answered per second with 8 clients sending the same files at once.

JSON: {"n", "results": [{"method", "cold_start_s", "p50_ms", "p99_ms", "extract_p50_ms", "faiss_p50_ms",
"overhead_ratio", "filtered_p50_ms", "qps_8_clients", ...}], "machine"}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from real_data import CACHE, dataset_manifest, encode_input_batch, machine, real_embeddings, replicate

from audiohash.bundle import ModelBundle
from audiohash.quantizers import make_quantizer

log = logging.getLogger("benchmarks.search_latency")
BITS = 64
CHUNK = 250_000
N_SHARDS = 8
DQN_HYPER = {"steps": 600}  # as the other speed benchmarks: the speed does not depend on training length
REPO = Path(__file__).resolve().parents[1]


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, float), q))


def fit(method: str, data) -> ModelBundle:
    from audiohash.training import sample_labeled, seed_everything

    _, labels, x_db = data.split("db")
    seed_everything(0)
    quantizer = make_quantizer(method, BITS, seed=0, **(DQN_HYPER if method == "dqn" else {}))
    label_ids, _ = sample_labeled(labels, 0.1, 0)
    quantizer.fit(x_db, label_ids if quantizer.supervised else None)
    meta = {"embedding_dim": int(x_db.shape[1]), "extractor": "timbre", "extractor_version": data.extractor_version}
    return ModelBundle(quantizer, f"bench-search-{method}-{BITS}b", 0, meta)


def build_lake(cfg, bundle: ModelBundle, data, paths: dict, n: int) -> None:
    """Register the model, write the metadata table and n replicated codes (reused when present)."""
    from deltalake import write_deltalake

    from audiohash.encoding import Lineage, encode_batch
    from audiohash.in_process import write_code_table
    from audiohash.schemas import EMBEDDINGS_DDL, arrow_schema
    from audiohash.tracking import job_run, log_and_register_bundle

    codes_table, meta_table = cfg.lake.table("codes"), cfg.lake.table("embeddings")
    marker = Path(codes_table) / "_benchmark.json"
    key = {"n": n, "method": bundle.method, "bits": BITS, "shards": N_SHARDS, "layout": 1}
    if marker.exists() and json.loads(marker.read_text()) == key:
        return
    for old in (codes_table, meta_table):
        subprocess.run(["rm", "-rf", old], check=True)
    with job_run(cfg, "train", run_name=f"bench-{bundle.method}"):
        log_and_register_bundle(bundle)
    ids, labels, x_db = data.split("db")
    sources = data.sources[data.splits == "db"]
    clip_ids = np.asarray([f"c{i:09d}" for i in range(n)], object)
    copy = np.arange(n) % len(x_db)
    schema = arrow_schema(EMBEDDINGS_DDL)
    meta = pa.table({"clip_id": clip_ids, "path": [paths[c] for c in ids[copy]], "label": labels[copy],
                     "split": np.full(n, "db", object), "source": sources[copy], "offset_s": np.zeros(n),
                     "embedding": pa.nulls(n, pa.list_(pa.float32())), "extractor": np.full(n, "timbre", object),
                     "extractor_version": np.full(n, data.extractor_version, object),
                     "sample_rate": np.full(n, 16000, np.int32),
                     "extracted_at": pa.array([dt.datetime.now(dt.timezone.utc)] * n, pa.timestamp("us", tz="UTC"))})
    write_deltalake(meta_table, meta.cast(schema))
    log.info("encoding %d codes into %s", n, codes_table)
    encoded = []
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        x = replicate(x_db, stop - start, seed=start)
        batch = encode_input_batch(clip_ids[start:stop], labels[copy[start:stop]], x)
        encoded.append(encode_batch(batch, bundle.quantizer, N_SHARDS))
    lineage = Lineage(bundle.model_name, bundle.model_version, N_SHARDS, ("db",), meta_table, 0)
    write_code_table(codes_table, pa.Table.from_batches(encoded), lineage)
    marker.write_text(json.dumps(key))


def start_service(overrides: list[str]) -> tuple[subprocess.Popen, str, float, float]:
    """``python -m audiohash.serve`` as a process: (process, base URL, seconds until it answered,
    its perf_counter start)."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "audiohash.serve", *overrides, "serve.port=0",
                                "serve.refresh_s=0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    for line in process.stdout:
        found = re.search(r"open (http://[^/]+)/", line)
        if found:
            url = found.group(1)
            with urllib.request.urlopen(url + "/api/info", timeout=60) as r:
                r.read()
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
            return process, url, time.perf_counter() - started, started
    raise RuntimeError(f"the service exited with {process.wait()} before answering")


_CONNECTIONS = threading.local()


def post(url: str, data: bytes) -> tuple[float, dict]:
    """POST an audio file over this thread's kept-alive connection: (milliseconds, the answer)."""
    import http.client

    parsed = urllib.parse.urlsplit(url)
    started = time.perf_counter()
    connection = getattr(_CONNECTIONS, parsed.netloc, None)
    if connection is None:
        connection = http.client.HTTPConnection(parsed.netloc, timeout=120)
        setattr(_CONNECTIONS, parsed.netloc, connection)
    connection.request("POST", parsed.path + (f"?{parsed.query}" if parsed.query else ""), body=data,
                       headers={"Content-Type": "audio/wav"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    if response.status != 200:
        raise RuntimeError(f"{url}: {response.status} {answer}")
    return (time.perf_counter() - started) * 1e3, answer


def run_method(method: str, data, audio: list[bytes], paths: dict, n: int, lake: Path) -> dict:
    from audiohash.config import load_config
    from audiohash.extraction import embed_files
    from audiohash.features import get_extractor
    from audiohash.search import SearchEngine

    bundle = fit(method, data)
    overrides = [f"lake.root={lake / method}", f"model.name={bundle.model_name}", "query.nprobe=0"]
    cfg = load_config(None, overrides)
    build_lake(cfg, bundle, data, paths, n)
    # The same work without the service, in this process: the extract worker alone and faiss alone
    # over the same codes, timed alternately with the service's answers (the machine's speed drifts).
    extractor = get_extractor("timbre")
    snapshot = SearchEngine.open(cfg).snapshot  # the registered model and its codes, as the service has them
    quantizer = snapshot.bundle.quantizer
    index = quantizer.filled_scan_index(snapshot.codes)
    del snapshot

    def alone(i: int, clip: bytes) -> tuple[float, float]:
        files = pd.DataFrame({"clip_id": [f"q{i}"], "path": [f"q{i}.wav"], "label": [None], "split": [None],
                              "source": [None], "content": [clip]})
        started = time.perf_counter()
        rows = embed_files(files, extractor, max_windows=1)
        extract_ms = (time.perf_counter() - started) * 1e3
        z = quantizer.query_side(np.asarray(rows["embedding"].iloc[0], np.float32)[None])
        started = time.perf_counter()
        index.search(z, 10)
        return extract_ms, (time.perf_counter() - started) * 1e3

    process, url, cold_start_s, started = start_service(overrides)
    try:
        post(url + "/api/search", audio[0])  # the first audio answer (the extractor builds after start)
        first_audio_s = time.perf_counter() - started
        alone(0, audio[0])
        latencies, split, extract_ms, faiss_ms = [], {"extract": [], "model": [], "scan": []}, [], []
        for i, clip in enumerate(audio):
            ms, answer = post(url + "/api/search?top=10", clip)
            latencies.append(ms)
            for k in split:
                split[k].append(answer["timing_ms"][k])
            e_ms, f_ms = alone(i, clip)
            extract_ms.append(e_ms)
            faiss_ms.append(f_ms)
        db_labels = data.split("db")[1]
        shares = pd.Series(db_labels[np.arange(n) % len(db_labels)]).value_counts(normalize=True)  # as build_lake
        label = (shares - 0.01).abs().idxmin()
        filtered = [post(url + "/api/search?top=10&label=" + urllib.parse.quote(label), clip)[0] for clip in audio]
        with ThreadPoolExecutor(8) as pool:
            started = time.perf_counter()
            answered = list(pool.map(lambda clip: post(url + "/api/search?top=10", clip), audio * 2))
            qps = len(answered) / (time.perf_counter() - started)
    finally:
        process.terminate()
        process.wait(timeout=60)
    p50, extract_p50, faiss_p50 = percentile(latencies, 50), percentile(extract_ms, 50), percentile(faiss_ms, 50)
    row = {"method": method, "bits": BITS, "cold_start_s": round(cold_start_s, 2),
           "first_audio_answer_s": round(first_audio_s, 2), "p50_ms": round(p50, 2),
           "p99_ms": round(percentile(latencies, 99), 2), "extract_p50_ms": round(extract_p50, 2),
           "faiss_p50_ms": round(faiss_p50, 2), "overhead_ratio": round(p50 / (extract_p50 + faiss_p50), 3),
           "filtered_p50_ms": round(percentile(filtered, 50), 2), "filter": f"label={label}",
           "filter_share": round(float(shares[label]), 4), "qps_8_clients": round(qps, 1),
           "split_p50_ms": {k: round(percentile(v, 50), 2) for k, v in split.items()},
           "queries": len(audio)}
    log.info("%s: %s", method, row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--methods", default="pq,dqn")
    parser.add_argument("--out", default="benchmarks/results/search_latency.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    data = real_embeddings("gm")
    manifest_path = dataset_manifest("gm")
    manifest = pd.read_csv(manifest_path)
    paths = {c: str(manifest_path.parent / p) for c, p in zip(manifest["clip_id"], manifest["path"])}
    query_ids = data.split("query")[0]
    files = [paths[c] for c in query_ids]
    audio = [Path(files[i % len(files)]).read_bytes() for i in range(args.queries)]
    lake = CACHE / f"search-latency-n{args.n}"
    results = [run_method(method, data, audio, paths, args.n, lake) for method in args.methods.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n": args.n, "results": results, "query_files": len(set(files[:args.queries])),
                               "machine": machine()}, indent=2))
    print(json.dumps({"n": args.n, "results": results}, indent=2))


if __name__ == "__main__":
    main()
