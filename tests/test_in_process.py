"""The in-process runner (no Spark, no JVM): its encode equals the quantizer's own encode of the
encodable rows, its search equals asymmetric distances summed by hand from the lookup tables
ranked by (distance, clip_id), and it refuses what the jobs refuse (another extractor, codes of
another model or of no encode, tables it cannot read as plain Parquet)."""
from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pytest

from audiohash import in_process
from audiohash.bundle import ModelBundle
from audiohash.errors import AudiohashError
from audiohash.quantizers import make_quantizer
from audiohash.ranking import ranking_mismatch

DIM, N_SHARDS = 16, 3


def embedding_rows(rng, n: int, first: int, split: str, extractor: str = "timbre-v1") -> pa.Table:
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    x[:, 0] += np.arange(n) % 4 * 3.0  # four clusters: codes and rankings with structure
    x[5::10] = x[4::10]  # clips with the same vector: equal distances, ranked by clip_id
    vectors = [row.tolist() for row in x]
    if split == "db":
        vectors[1] = None  # a missing embedding and a NaN one: dropped, as the encode job does
        vectors[2] = [float("nan")] * DIM
    return pa.table({"clip_id": [f"{split}{first + i:05d}" for i in range(n)],
                     "label": [f"class{i % 4}" for i in range(n)], "split": [split] * n,
                     "embedding": pa.array(vectors, pa.list_(pa.float32())),
                     "extractor_version": [extractor] * n})


@pytest.fixture
def lake(tmp_path):
    """An embeddings table of three files written by delta-rs (db rows in two, queries in one), and a
    PQ bundle trained on its db rows."""
    from deltalake import write_deltalake

    rng = np.random.default_rng(0)
    table = str(tmp_path / "embeddings")
    for part in (embedding_rows(rng, 300, 0, "db"), embedding_rows(rng, 200, 300, "db"),
                 embedding_rows(rng, 20, 0, "query")):
        write_deltalake(table, part, mode="append")
    x = np.stack([v for v in embedding_rows(np.random.default_rng(1), 500, 0, "q").column("embedding").to_pylist()])
    bundle = ModelBundle(make_quantizer("pq", 32, seed=0).fit(x.astype(np.float32)), "audiohash-pq-32b", 3,
                         {"extractor_version": "timbre-v1"})
    return tmp_path, table, bundle


def db_rows(table: str) -> pa.Table:
    from deltalake import DeltaTable

    rows = DeltaTable(table).to_pyarrow_table()
    return rows.filter(pa.compute.equal(rows.column("split"), "db"))


def test_encode_table_equals_the_quantizers_encode_of_the_encodable_rows(lake):
    _, table, bundle = lake
    encoded, state = in_process.encode_table(table, bundle, N_SHARDS, ("db",), batch_rows=64)
    assert state.version == 2
    rows = db_rows(table)
    good = [i for i, v in enumerate(rows.column("embedding").to_pylist()) if v is not None and np.isfinite(v).all()]
    assert len(good) == 496  # two bad rows in each db file
    ids = rows.column("clip_id").take(good).to_pylist()
    x = np.array([rows.column("embedding")[i].as_py() for i in good], np.float32)
    expected = dict(zip(ids, map(bytes, bundle.quantizer.encode(x))))
    got = dict(zip(encoded.column("clip_id").to_pylist(), encoded.column("code").to_pylist()))
    assert got == expected
    assert encoded.column("shard").to_pylist() == [zlib.crc32(c.encode()) % N_SHARDS for c in encoded.column("clip_id").to_pylist()]


def test_encode_refuses_embeddings_of_another_extractor(lake):
    _, table, bundle = lake
    other = ModelBundle(bundle.quantizer, bundle.model_name, 3, {"extractor_version": "timbre-v0"})
    with pytest.raises(AudiohashError, match=r"extractor timbre-v1.*trained on timbre-v0"):
        in_process.encode_table(table, other, N_SHARDS)


def test_search_ranks_by_hand_summed_adc_distance_then_clip_id(lake):
    root, table, bundle = lake
    codes_table = str(root / "codes")
    version = in_process.encode_into(table, codes_table, bundle, N_SHARDS, ("db",))
    assert version == 0
    assert in_process.encode_into(table, codes_table, bundle, N_SHARDS, ("db",)) == 1  # a full replace
    encoded, _ = in_process.encode_table(table, bundle, N_SHARDS, ("db",))
    xq = np.array(embedding_rows(np.random.default_rng(5), 20, 0, "query").column("embedding").to_pylist(), np.float32)
    k = 50
    D, ids, scanned = in_process.search_table(codes_table, bundle, xq, k)
    assert scanned == 1 and D.shape == ids.shape == (20, k)
    # Reference: the asymmetric distance summed from the quantizer's M x 256 lookup tables.
    codes = np.frombuffer(b"".join(encoded.column("code").to_pylist()), np.uint8).reshape(encoded.num_rows, -1)
    clip_ids = np.array(encoded.column("clip_id").to_pylist(), object)
    tables = bundle.quantizer.lookup_tables(xq)  # (nq, M, 256)
    dist = tables[:, np.arange(codes.shape[1]), codes].sum(axis=2)  # (nq, n)
    order = np.stack([np.lexsort((clip_ids, row)) for row in dist])
    D_ref, ids_ref = np.take_along_axis(dist, order, 1), clip_ids[order]
    assert ranking_mismatch(D, ids, D_ref, ids_ref, complete=True) is None
    tied = D[:, 1:] == D[:, :-1]
    assert tied.any(), "no equal distances: the clip_id tie-break is not exercised"
    assert (ids[:, 1:][tied] > ids[:, :-1][tied]).all()
    # Time travel: version 0 holds the same codes.
    D0, ids0, v0 = in_process.search_table(codes_table, bundle, xq, k, version=0)
    assert v0 == 0 and (ids0 == ids).all()


def test_search_refuses_codes_of_another_model_and_tables_encode_did_not_write(lake):
    from deltalake import write_deltalake

    root, table, bundle = lake
    codes_table = str(root / "codes")
    in_process.encode_into(table, codes_table, bundle, N_SHARDS, ("db",))
    newer = ModelBundle(bundle.quantizer, bundle.model_name, 4, bundle.meta)
    xq = np.zeros((1, DIM), np.float32)
    with pytest.raises(AudiohashError, match=r"audiohash-pq-32b:3.*audiohash-pq-32b:4"):
        in_process.search_table(codes_table, newer, xq, 5)
    plain = str(root / "plain")
    write_deltalake(plain, pa.table({"clip_id": ["a"], "code": [b"\x00" * 4]}))
    with pytest.raises(AudiohashError, match=r"plain \(version 0\) was not written by jobs/encode.py"):
        in_process.search_table(plain, bundle, xq, 5)


def test_tables_not_plain_parquet_or_not_local_are_refused_by_name(tmp_path):
    from deltalake import write_deltalake

    partitioned = str(tmp_path / "by_code")
    write_deltalake(partitioned, pa.table({"clip_id": ["a"], "code": ["x"]}), partition_by=["code"])
    with pytest.raises(AudiohashError, match=r"by_code version 0: .*partitioned by \['code'\]"):
        in_process.version_state(partitioned, None, ["clip_id", "code"])
    with pytest.raises(AudiohashError, match=r"s3a://bucket/codes is not on local storage"):
        in_process.version_state("s3a://bucket/codes", None, ["clip_id"])
