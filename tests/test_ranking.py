"""The pure half of the distributed query: partition scans and the exact top-k merge."""
import faiss
import numpy as np
import pyarrow as pa
import pytest

from audiohash.arrow_arrays import binary_column, code_matrix, embedding_matrix
from audiohash.errors import AudiohashError
from audiohash.quantizers import make_quantizer
from audiohash.ranking import merge_topk, partition_from_record, partition_record, scan_partition


@pytest.fixture(scope="module")
def pq_setup():
    rng = np.random.default_rng(0)
    xb = rng.normal(size=(3000, 32)).astype(np.float32)
    xq = rng.normal(size=(25, 32)).astype(np.float32)
    q = make_quantizer("pq", 32, seed=1).fit(xb)
    return q, q.encode(xb), xq


def batches_of(codes, ids, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(pa.RecordBatch.from_arrays([pa.array(ids[start:start + s]), binary_column(codes[start:start + s])],
                                              names=["clip_id", "code"]))
        start += s
    return out


def test_partitioned_scan_and_merge_equal_one_faiss_index(pq_setup):
    q, codes, xq = pq_setup
    ids = np.array([f"clip{i:05d}" for i in range(len(codes))], dtype=object)
    k = 50
    # Reference: one faiss IndexPQ over all codes, searched with the query side.
    index = q.scan_index()
    index.add_sa_codes(codes)
    D_ref, I_ref = index.search(q.query_side(xq), k)
    # Ours: 3 partitions of uneven size, each in 2 Arrow batches, through the record round trip.
    parts, start = [], 0
    for size in (1000, 1700, 300):
        batches = batches_of(codes[start:start + size], ids[start:start + size], [size // 2, size - size // 2])
        record = partition_record(scan_partition(batches, q, q.query_side(xq), k)).to_pylist()[0]
        parts.append(partition_from_record(record, len(xq)))
        start += size
    D, got = merge_topk(parts, k)
    np.testing.assert_allclose(D, D_ref, rtol=1e-5)
    # Same id lists up to swaps among equal distances.
    for row in range(len(xq)):
        for d in np.unique(D_ref[row]):
            if d == D_ref[row].max():
                continue  # the last distance's ties may be cut differently at the boundary
            assert set(got[row][D[row] == d]) == set(ids[I_ref[row][D_ref[row] == d]])


def test_merge_breaks_ties_by_clip_id():
    from audiohash.ranking import PartitionTopK

    a = PartitionTopK(np.array([[1.0, 2.0]], np.float32), np.array([[0, 1]], np.int32), np.array(["z", "b"], object))
    b = PartitionTopK(np.array([[1.0, 2.0]], np.float32), np.array([[0, 1]], np.int32), np.array(["c", "a"], object))
    D, ids = merge_topk([a, b], 3)
    assert ids.tolist() == [["c", "z", "a"]]
    np.testing.assert_array_equal(D, [[1.0, 1.0, 2.0]])
    # Same answer whatever the order of the partitions.
    assert merge_topk([b, a], 3)[1].tolist() == ids.tolist()


def test_empty_partition_and_k_larger_than_partition(pq_setup):
    q, codes, xq = pq_setup
    empty = scan_partition([], q, q.query_side(xq), 10)
    small = scan_partition(batches_of(codes[:4], np.array(list("abcd"), object), [4]), q, q.query_side(xq), 10)
    assert small.distances.shape == (len(xq), 4)
    D, ids = merge_topk([empty, small], 10)
    assert ids.shape == (len(xq), 4) and set(ids[0]) == set("abcd")


def test_arrow_views_round_trip_and_name_bad_rows():
    codes = np.arange(24, dtype=np.uint8).reshape(4, 6)
    col = binary_column(codes)
    np.testing.assert_array_equal(code_matrix(col, 6), codes)
    np.testing.assert_array_equal(code_matrix(col.slice(1, 2), 6), codes[1:3])
    with pytest.raises(AudiohashError, match="has 6 bytes"):
        code_matrix(col, 8)
    emb = pa.array([[1.0, 2.0], [3.0, 4.0], [5.0]], pa.list_(pa.float32()))
    np.testing.assert_array_equal(embedding_matrix(emb.slice(0, 2), 2), [[1, 2], [3, 4]])
    with pytest.raises(AudiohashError, match="row 2 has 1 values, expected 2"):
        embedding_matrix(emb, 2)
