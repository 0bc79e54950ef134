"""The encode worker and the encode planner, without Spark."""
import zlib

import numpy as np
import pyarrow as pa
import pytest

from audiohash.arrow_arrays import code_matrix
from audiohash.encoding import (EncodePlan, Lineage, encode_batch, fingerprint, plan_encode,
                                select_splits, shard_of)
from audiohash.errors import AudiohashError
from audiohash.quantizers import make_quantizer


@pytest.fixture(scope="module")
def pq():
    rng = np.random.default_rng(5)
    return make_quantizer("pq", 32, seed=0).fit(rng.normal(size=(3000, 16)).astype(np.float32))


def batch_of(x: np.ndarray, clip_ids: list[str], labels: list) -> pa.RecordBatch:
    offsets = pa.array(np.arange(0, x.size + 1, x.shape[1], dtype=np.int32))
    return pa.RecordBatch.from_arrays(
        [pa.array(clip_ids), pa.array(labels, pa.string()),
         pa.ListArray.from_arrays(offsets, pa.array(x.ravel(), pa.float32()))],
        names=["clip_id", "label", "embedding"])


def test_encode_batch_matches_the_quantizer_and_crc32_shards(pq):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(257, 16)).astype(np.float32)
    clip_ids = [f"bank/label/clip-{i}" for i in range(len(x))]
    labels = [None if i % 7 == 0 else f"class{i % 3}" for i in range(len(x))]
    out = encode_batch(batch_of(x, clip_ids, labels), pq, n_shards=5)
    assert out.schema.names == ["clip_id", "shard", "code", "label", "source_hash", "list_id"]
    assert out.column("list_id").null_count == len(x)  # this model has no inverted file
    np.testing.assert_array_equal(code_matrix(out.column("code"), 4), pq.encode(x))
    assert out.column("shard").to_pylist() == [zlib.crc32(c.encode("utf-8")) % 5 for c in clip_ids]
    assert out.column("label").to_pylist() == labels
    batch = batch_of(x, clip_ids, labels)
    assert out.column("source_hash").to_pylist() == fingerprint(batch.column("embedding"), batch.column("label")).tolist()


def test_encode_batch_with_lists_gives_each_code_its_list_and_the_lists_range_as_shard(pq):
    import copy

    from audiohash import ivf

    rng = np.random.default_rng(8)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    with_lists = copy.deepcopy(pq).fit_lists(x, 7)
    out = encode_batch(batch_of(x, [f"c{i}" for i in range(len(x))], ["a"] * len(x)), with_lists, n_shards=3)
    lists = ivf.assign_lists(pq.query_side(x), with_lists.ivf_centroids)
    assert out.column("list_id").to_pylist() == lists.tolist()
    assert out.column("shard").to_pylist() == (lists * 3 // 7).tolist()
    np.testing.assert_array_equal(code_matrix(out.column("code"), 4), pq.encode(x))  # codes as without lists


def test_encode_batch_leaves_out_rows_it_cannot_encode(pq):
    rng = np.random.default_rng(7)
    good = rng.normal(size=(4, 16)).astype(np.float32)
    rows = [good[0], None, good[1], np.zeros(15), [np.nan] + [0.0] * 15, [None] + [0.0] * 15, good[2],
            [np.inf] + [0.0] * 15, good[3]]
    embeddings = pa.array([None if r is None else [None if v is None else float(v) for v in r] for r in rows],
                          pa.list_(pa.float32()))
    ids = [f"c{i}" for i in range(len(rows))]
    batch = pa.RecordBatch.from_arrays(
        [pa.array(ids), pa.array(["l"] * len(rows)), embeddings], names=["clip_id", "label", "embedding"])
    for sliced in (batch, pa.Table.from_batches([batch.slice(0, 3), batch.slice(3)]).to_batches()[1]):
        out = encode_batch(sliced, pq, 4)
        kept = [i for i in ("c0", "c2", "c6", "c8") if i in sliced.column("clip_id").to_pylist()]
        assert out.column("clip_id").to_pylist() == kept
        which = {"c0": 0, "c2": 1, "c6": 2, "c8": 3}
        expected = pq.encode(good[[which[i] for i in kept]])
        np.testing.assert_array_equal(code_matrix(out.column("code"), 4), expected)
        kept_rows = [r for r in sliced.to_pylist() if r["clip_id"] in kept]
        assert out.column("source_hash").to_pylist() == [reference_fingerprint(r["embedding"], r["label"])
                                                         for r in kept_rows]
    with pytest.raises(AudiohashError, match=r"missing columns \['label'\]"):
        encode_batch(batch.drop_columns(["label"]), pq, 4)


def reference_fingerprint(row, label) -> int:
    """encoding.fingerprint's definition, one row at a time in Python integers (mod 2**64)."""
    mask = 2**64 - 1

    def mix(h):
        h ^= h >> 30
        h = (h * 0xBF58476D1CE4E5B9) & mask
        h ^= h >> 27
        h = (h * 0x94D049BB133111EB) & mask
        return h ^ (h >> 31)

    total = 0
    values = [] if row is None else np.asarray([np.nan if v is None else v for v in row], np.float32).view(np.uint32)
    for position, bits in enumerate(values, start=1):
        key = mix((position * 0x9E3779B97F4A7C15) & mask) | 1
        total = (total + int(bits) * key) & mask
    length = (-1 if row is None else len(values)) & mask
    h = mix(total ^ mix((length + 0x632BE59BD9B4E019) & mask))
    import hashlib
    label_key = 0 if label is None else int.from_bytes(hashlib.blake2b(label.encode(), digest_size=8).digest(), "little")
    return int(np.uint64(mix(h ^ label_key)).view(np.int64))


def test_fingerprint_follows_its_definition_and_sees_every_change():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    rows = [list(map(float, r)) for r in x] + [None, [], [1.0, None, 2.0], list(map(float, x[0][:4]))]
    labels = ["a", "b", None, "a", "a", "b", "a", None, "c", "a"]
    column = pa.array(rows, pa.list_(pa.float32()))
    got = fingerprint(column, pa.array(labels))
    assert got.dtype == np.int64
    assert got.tolist() == [reference_fingerprint(r, lab) for r, lab in zip(rows, labels)]
    assert len(set(got.tolist())) == len(rows)  # the prefix row, the null and the empty row differ too
    # Equal rows of equal labels agree, whatever the batch (the uniform fast path vs the general one).
    uniform = pa.ListArray.from_arrays(pa.array(np.arange(0, 31, 5, dtype=np.int32)), pa.array(x.ravel()))
    assert fingerprint(uniform, pa.array(labels[:6])).tolist() == got[:6].tolist()
    assert fingerprint(uniform.slice(2, 3), pa.array(labels[2:5])).tolist() == got[2:5].tolist()
    # One bit of one value, the label, the order of two values: each changes it.
    flipped = x.copy()
    flipped.view(np.uint32)[1, 3] ^= 1
    swapped = x.copy()
    swapped[2, [0, 1]] = swapped[2, [1, 0]]
    for changed, changed_labels in ((flipped, labels[:6]), (swapped, labels[:6]), (x, ["z"] + labels[1:6])):
        column = pa.ListArray.from_arrays(pa.array(np.arange(0, 31, 5, dtype=np.int32)), pa.array(changed.ravel()))
        assert (fingerprint(column, pa.array(changed_labels)) != got[:6]).sum() == 1


def test_select_splits_keeps_the_named_splits():
    batch = pa.RecordBatch.from_pydict({"clip_id": ["a", "b", "c", "d"], "split": ["db", "query", None, "db"]})
    assert select_splits(batch, ["db"]).column("clip_id").to_pylist() == ["a", "d"]
    assert select_splits(batch, ("db", "query")).num_rows == 3
    assert select_splits(batch, []).num_rows == 4


def test_first_duplicate_names_the_smallest_repeated_value():
    from audiohash.encoding import first_duplicate

    assert first_duplicate(pa.array(["c", "a", "b"])) is None
    assert first_duplicate(pa.array([], pa.string())) is None
    assert first_duplicate(pa.chunked_array([["d", "b", "d"], ["b", "e"]])) == "b"


def test_shard_of_is_stable_and_in_range():
    ids = [f"clip-{i}" for i in range(1000)]
    shards = shard_of(ids, 8)
    assert shards.dtype == np.int32 and shards.min() == 0 and shards.max() == 7
    assert shard_of(["clip-0"], 8)[0] == zlib.crc32(b"clip-0") % 8 == shards[0]
    assert np.bincount(shards).min() > 90  # spread, not lumped


LINEAGE = Lineage("audiohash-pq-64b", 3, 8, ("db",), "/lake/embeddings", 10, "table-1", "run-a", "train-run")


def test_lineage_round_trips_and_ignores_foreign_metadata():
    assert Lineage.from_json(LINEAGE.to_json()) == LINEAGE
    for foreign in (None, "", "nightly backfill", '{"model_name": "x"}', "[1, 2]", '{"audiohash_codes": 1}'):
        assert Lineage.from_json(foreign) is None


def requested(**changes) -> Lineage:
    values = {**LINEAGE.__dict__, "run_id": "run-b", **changes}
    return Lineage(**values)


NOTHING_ADDED = ((), "0 file(s) appended to the embeddings table")


def test_plan_full_when_no_table_or_another_index():
    assert plan_encode(requested(), None, "incremental", None).mode == "full"
    assert plan_encode(requested(), LINEAGE, "full", NOTHING_ADDED).mode == "full"
    switch = plan_encode(requested(model_version=4, embeddings_version=12), LINEAGE, "incremental", NOTHING_ADDED)
    assert switch.mode == "full" and "model_version 3 -> 4" in switch.reason
    assert plan_encode(requested(n_shards=16), LINEAGE, "incremental", NOTHING_ADDED).mode == "full"
    assert plan_encode(requested(splits=("db", "query")), LINEAGE, "incremental", NOTHING_ADDED).mode == "full"
    # The same splits in another order are the same index.
    same = Lineage(**{**LINEAGE.__dict__, "splits": ("query", "db")})
    assert plan_encode(same, Lineage(**{**LINEAGE.__dict__, "splits": ("db", "query")}), "incremental", NOTHING_ADDED).mode == "none"


def test_plan_nothing_when_the_embeddings_did_not_change():
    plan = plan_encode(requested(), LINEAGE, "incremental", NOTHING_ADDED)
    assert plan == EncodePlan("none", "embeddings table unchanged since version 10")
    # Versions that added no file (a commit of settings alone would come as (None, why)).
    assert plan_encode(requested(embeddings_version=11), LINEAGE, "incremental", NOTHING_ADDED).mode == "none"


def test_plan_append_reads_only_the_appended_files():
    files = ("file:/lake/embeddings/part-0001-a.snappy.parquet", "file:/lake/embeddings/part-0003-c.snappy.parquet")
    plan = plan_encode(requested(embeddings_version=12), LINEAGE, "incremental", (files, "2 file(s) appended"))
    assert plan == EncodePlan("append", "2 file(s) appended", files)


def test_plan_compares_every_row_after_anything_but_appends():
    why = "rows were removed or rewritten in the embeddings table"
    plan = plan_encode(requested(embeddings_version=12), LINEAGE, "incremental", (None, why))
    assert plan == EncodePlan("compare", why)


def test_plan_follows_the_table_not_its_path():
    moved = plan_encode(requested(embeddings_table="s3a://bucket/lake/embeddings"), LINEAGE, "incremental", NOTHING_ADDED)
    assert moved.mode == "none"
    other = plan_encode(requested(embeddings_table_id="table-2"), LINEAGE, "incremental", NOTHING_ADDED)
    assert other.mode == "compare" and "table-1 -> table-2" in other.reason


def test_plan_compares_when_the_log_is_gone_or_the_table_went_back():
    assert plan_encode(requested(embeddings_version=12), LINEAGE, "incremental", None).mode == "compare"
    older = plan_encode(requested(embeddings_version=4), LINEAGE, "incremental", NOTHING_ADDED)
    assert older.mode == "compare" and "older" in older.reason


def test_plan_rejects_an_unknown_mode():
    with pytest.raises(AudiohashError, match="encode.mode.*'incremental', 'full'.*'nightly'"):
        plan_encode(requested(), LINEAGE, "nightly", [])


def test_code_table_batch_adds_the_runs_shared_columns_in_table_order():
    import datetime as dt

    from audiohash.encoding import CODES_COLUMNS, Lineage, code_table_batch

    encoded = pa.RecordBatch.from_pydict({
        "clip_id": ["a", "b"], "shard": pa.array([0, 3], pa.int32()), "code": pa.array([b"\x01\x02", b"\x03\x04"]),
        "label": ["dog", None], "source_hash": pa.array([7, -8], pa.int64()), "list_id": pa.array([5, 2], pa.int32())})
    lineage = Lineage("m", 3, 4, ("db",), "/lake/embeddings", 12, "table-id", "run-9", "model-run")
    at = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)
    rows = code_table_batch(encoded, lineage, at)
    assert rows.schema.names == CODES_COLUMNS
    assert rows.column("clip_id").to_pylist() == ["a", "b"] and rows.column("label").to_pylist() == ["dog", None]
    assert rows.column("list_id").to_pylist() == [5, 2]
    assert rows.column("model_version").type == pa.int32() and rows.column("model_version").to_pylist() == [3, 3]
    assert rows.column("embedding_version").to_pylist() == [12, 12] and rows.column("encode_run_id").to_pylist() == ["run-9"] * 2
    assert rows.column("encoded_at").type == pa.timestamp("us", tz="UTC") and rows.column("encoded_at")[0].as_py() == at
    assert code_table_batch(encoded.slice(0, 0), lineage, at).num_rows == 0
