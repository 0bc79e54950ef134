"""The pure half of the distributed query: partition scans and the exact top-k merge."""
import faiss
import numpy as np
import pyarrow as pa
import pytest

from audiohash.arrow_arrays import binary_column, code_matrix, embedding_matrix
from audiohash.errors import AudiohashError
from audiohash.quantizers import make_quantizer
from audiohash.ranking import merge_topk, partition_record, partitions_from_table, scan_partition


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
        out.append(pa.RecordBatch.from_arrays(
            [pa.array(ids[start:start + s]), binary_column(codes[start:start + s]),
             pa.array(["m"] * s), pa.array([3] * s, pa.int32())],
            names=["clip_id", "code", "model_name", "model_version"]))
        start += s
    return out


def test_partitioned_scan_and_merge_equal_one_faiss_index(pq_setup):
    q, codes, xq = pq_setup
    ids = [f"clip{i:05d}" for i in range(len(codes))]
    k = 50
    # Reference: one faiss IndexPQ over all codes, searched with the query side.
    index = q.scan_index()
    index.add_sa_codes(codes)
    D_ref, I_ref = index.search(q.query_side(xq), k)
    # Ours: 3 partitions of uneven size, each in 2 Arrow batches, through the record round trip.
    parts, start = [], 0
    for size in (1000, 1700, 300):
        batches = batches_of(codes[start:start + size], ids[start:start + size], [size // 2, size - size // 2])
        parts.append(partition_record(scan_partition(batches, q, q.query_side(xq), k)))
        start += size
    parts = partitions_from_table(pa.Table.from_batches(parts), len(xq))
    assert [p.scanned_rows for p in parts] == [1000, 1700, 300]
    D, got = merge_topk(parts, k)
    np.testing.assert_allclose(D, D_ref, rtol=1e-5)
    # Same id lists up to swaps among equal distances.
    for row in range(len(xq)):
        for d in np.unique(D_ref[row]):
            if d == D_ref[row].max():
                continue  # the last distance's ties may be cut differently at the boundary
            assert set(got[row][D[row] == d]) == {ids[i] for i in I_ref[row][D_ref[row] == d]}


def test_merge_breaks_ties_by_clip_id():
    from audiohash.ranking import PartitionTopK

    a = PartitionTopK(np.array([[1.0, 2.0]], np.float32), np.array([[0, 1]], np.int32), pa.array(["z", "b"]))
    b = PartitionTopK(np.array([[1.0, 2.0]], np.float32), np.array([[0, 1]], np.int32), pa.array(["c", "a"]))
    D, ids = merge_topk([a, b], 3)
    assert ids.tolist() == [["c", "z", "a"]]
    np.testing.assert_array_equal(D, [[1.0, 1.0, 2.0]])
    # Same answer whatever the order of the partitions.
    assert merge_topk([b, a], 3)[1].tolist() == ids.tolist()


@pytest.mark.parametrize("method", ["pq", "itq"])
def test_ties_at_the_cut_do_not_depend_on_the_partitioning(method):
    """Many duplicate codes (as a DQN makes): the merged top-k must be the k smallest by
    (distance, clip_id) however the rows are split and ordered, equal to a brute-force sort."""
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(6, 16)).astype(np.float32)
    xb = centers[rng.integers(0, 6, 400)]  # 6 distinct vectors -> 6 distinct codes
    q = make_quantizer(method, 16, seed=0).fit(xb + rng.normal(scale=0.3, size=xb.shape).astype(np.float32))
    codes, xq = q.encode(xb), rng.normal(size=(7, 16)).astype(np.float32)
    ids = np.array([f"c{i:04d}" for i in rng.permutation(len(xb))], object)  # ids not in row order
    D_all, I_all = q.scan(codes, q.query_side(xq), len(codes))
    k = 25
    for sizes in ([400], [150, 250], [37, 163, 200]):
        shuffled = rng.permutation(len(codes))
        parts, start = [], 0
        for size in sizes:
            rows = shuffled[start:start + size]
            parts.append(scan_partition(batches_of(codes[rows], list(ids[rows]), [size]), q, q.query_side(xq), k))
            start += size
        D, got = merge_topk(parts, k)
        for row in range(len(xq)):
            expected = sorted(zip(D_all[row].tolist(), ids[I_all[row]].tolist()))[:k]
            assert list(zip(D[row].tolist(), got[row].tolist())) == expected, (sizes, row)


def test_merge_equals_a_sort_by_distance_then_clip_id():
    """Random partitions with many equal, negative, signed-zero and unfilled (+inf) distances:
    the merge keeps the k smallest (distance, clip_id) pairs of each query, in that order."""
    from audiohash.ranking import PartitionTopK

    rng = np.random.default_rng(5)
    nq, values = 9, np.array([-2.5, -0.0, 0.0, 0.5, 1.0, 3.0, np.inf], np.float32)
    for k in (1, 4, 12, 40):
        parts, pairs = [], [[] for _ in range(nq)]
        pool = rng.permutation(1000)  # each partition's clips sorted, interleaved with the others'
        for p in range(3):
            ids = np.array(sorted(f"c{i:04d}" for i in pool[30 * p:30 * p + 30]), object)
            width = min(k, len(ids))
            local = np.stack([rng.choice(len(ids), width, replace=False) for _ in range(nq)]).astype(np.int32)
            D = np.sort(values[rng.integers(0, len(values), (nq, width))], axis=1)
            parts.append(PartitionTopK(D, local, pa.array(list(ids))))
            for row in range(nq):
                pairs[row] += [(0.0 if d == 0 else float(d), ids[i]) for d, i in zip(D[row], local[row])]
        D, got = merge_topk(parts, k)
        for row in range(nq):
            expected = sorted(pairs[row])[:k]
            assert D[row].tolist() == [d for d, _ in expected], (k, row)
            finite = np.isfinite(D[row])
            assert got[row][finite].tolist() == [c for d, c in expected if np.isfinite(d)], (k, row)
            assert all(c is None for c in got[row][~finite])


def test_empty_partition_and_k_larger_than_partition(pq_setup):
    q, codes, xq = pq_setup
    empty = scan_partition([], q, q.query_side(xq), 10)
    small = scan_partition(batches_of(codes[:4], list("abcd"), [4]), q, q.query_side(xq), 10)
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


def test_fast_scan_codes_round_trip_and_rank_like_faiss():
    rng = np.random.default_rng(5)
    xb = rng.normal(size=(4000, 32)).astype(np.float32)
    xq = rng.normal(size=(10, 32)).astype(np.float32)
    q = make_quantizer("pq_fastscan", 64, seed=0).fit(xb)
    codes = q.encode(xb)
    assert codes.shape == (4000, 8)  # 16 sub-codes of 4 bits
    index = q.filled_scan_index(codes)
    np.testing.assert_array_equal(index.sa_encode(q.transform(xb)), codes)
    # Reference: faiss's own fast-scan index fed the same vectors.
    ref = faiss.IndexPQFastScan(32, 16, 4)
    ref.pq = index.pq
    ref.is_trained = True
    ref.add(q.transform(xb))
    D_ref, I_ref = ref.search(q.query_side(xq), 20)
    D, I = q.scan(codes, q.query_side(xq), 20)
    np.testing.assert_array_equal(I, I_ref)


def test_model_check_names_both_versions():
    from audiohash.bundle import ModelBundle
    from audiohash.ranking import check_models

    bundle = ModelBundle(make_quantizer("pq", 8), "audiohash-pq-8b", 2, {})
    with pytest.raises(AudiohashError, match=r"audiohash-pq-8b:1.*bundle is audiohash-pq-8b:2"):
        check_models(["audiohash-pq-8b:1"], "lake/codes", bundle)
    with pytest.raises(AudiohashError, match=r"audiohash-pq-8b:1, audiohash-pq-8b:2 \(name:version\)"):
        check_models(["audiohash-pq-8b:2", "audiohash-pq-8b:1"], "lake/codes", bundle)  # a mix is refused too
    with pytest.raises(AudiohashError, match="empty"):
        check_models([], "lake/codes", bundle)
    check_models(["audiohash-pq-8b:2"], "lake/codes", bundle)


def test_query_batches_fit_the_budget():
    from audiohash.ranking import plan_query_batches

    # 10 queries, k=100 over 4 partitions = 4,800 B/query + 1,000 B of tables: 5,800 B each.
    assert plan_query_batches(10, 1000, 100, 4, 1000, 10**9) == [(0, 10)]
    assert plan_query_batches(10, 3, 100, 4, 1000, 10**9) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert plan_query_batches(10, 1000, 100, 4, 1000, 5800 * 4 + 1) == [(0, 4), (4, 8), (8, 10)]
    assert plan_query_batches(3, 1000, 10**9, 4, 1000, 10) == [(0, 1), (1, 2), (2, 3)]  # never empty
    for n, req in [(1, 1), (999, 7), (1000, 1000), (1001, 1000)]:
        spans = plan_query_batches(n, req, 50, 2, 0, 10**9)
        assert spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_code_files_read_directly_rank_like_the_batches(pq_setup, tmp_path):
    import pyarrow.parquet as pq

    from audiohash.table_files import read_parquet_files

    q, codes, xq = pq_setup
    ids = [f"clip{i:05d}" for i in range(len(codes))]
    uris = []
    for n, (start, stop) in enumerate([(0, 1200), (1200, 3000)]):  # the way Spark names data files
        path = tmp_path / "shard=0" / f"part {n}.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_batches(batches_of(codes[start:stop], ids[start:stop], [stop - start])), path)
        uris.append("file:" + str(path).replace(" ", "%20"))
    from_files = scan_partition(read_parquet_files(uris, ["clip_id", "code"]), q, q.query_side(xq), 30)
    from_batches = scan_partition(batches_of(codes, ids, [3000]), q, q.query_side(xq), 30)
    assert from_files.scanned_rows == 3000
    np.testing.assert_array_equal(from_files.distances, from_batches.distances)
    assert merge_topk([from_files], 30)[1].tolist() == merge_topk([from_batches], 30)[1].tolist()


WORKER_WITHOUT_TORCH = """
import sys
import numpy as np
import pyarrow as pa
from audiohash.arrow_arrays import binary_column
from audiohash.bundle import ModelBundle, bundle_to_bytes, cached_bundle_from_bytes
from audiohash.quantizers import make_quantizer
from audiohash.ranking import scan_partition
from audiohash.spark.tables import set_worker_threads

x = np.random.default_rng(0).standard_normal((600, 16)).astype(np.float32)
payload = bundle_to_bytes(ModelBundle(make_quantizer("pq", 16).fit(x), "m", 1, {}))
quantizer = cached_bundle_from_bytes(payload).quantizer  # what a scan task does, in this order
set_worker_threads(1)
codes = quantizer.encode(x)
batch = pa.RecordBatch.from_arrays([pa.array([f"c{i:04d}" for i in range(600)]), binary_column(codes)],
                                   names=["clip_id", "code"])
part = scan_partition([batch], quantizer, quantizer.query_side(x[:3]), 5)
assert part.scanned_rows == 600
print("torch imported:", "torch" in sys.modules)
"""


def test_a_pq_scan_worker_never_imports_torch():
    """torch's import costs a fresh Python worker seconds; a PQ scan needs only faiss."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", WORKER_WITHOUT_TORCH], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stdout


def test_results_batch_has_one_row_per_query_and_rank():
    from audiohash.ranking import results_batch
    from audiohash.schemas import RESULTS_DDL

    ids = np.array([["a", "b", "c"], ["c", "a", "b"]], object)
    batch = results_batch(np.array(["q1", "q2"], object), ids, np.array([[0.1, 0.2, 0.3], [1, 2, 3]], np.float64),
                          "run-1", "m", 7)
    assert batch.schema.names == [c.split()[0] for c in RESULTS_DDL.split(", ")]
    assert batch.column("query_id").to_pylist() == ["q1"] * 3 + ["q2"] * 3
    assert batch.column("rank").to_pylist() == [1, 2, 3, 1, 2, 3]
    assert batch.column("clip_id").to_pylist() == ["a", "b", "c", "c", "a", "b"]
    assert batch.column("distance").type == pa.float32() and batch.column("distance").to_pylist()[3] == 1.0
    assert set(batch.column("model_version").to_pylist()) == {7} and batch.column("model_version").type == pa.int32()
    empty = results_batch(np.array([], object), np.zeros((0, 3), object), np.zeros((0, 3)), "r", "m", 1)
    assert empty.num_rows == 0


def test_listed_partitions_are_kept_per_worker_by_model_and_files():
    """A second search over the same data files with the same model scans the lists in memory; another
    model or other files list them again; the least recently used leave when the kept memory passes
    the budget."""
    from audiohash import ranking
    from audiohash.quantizers import make_quantizer

    rng = np.random.default_rng(3)
    x = rng.normal(size=(600, 16)).astype(np.float32)
    models = [make_quantizer("pq", 32, seed=s).fit(x).fit_lists(x, 6) for s in (0, 1)]
    reads = []

    def reader(model, name):
        def read():
            reads.append(name)
            codes, lists = model.encode_with_lists(x)
            yield pa.RecordBatch.from_pydict({"clip_id": [f"{name}-{i:04d}" for i in range(len(x))],
                                              "code": [bytes(c) for c in codes], "list_id": pa.array(lists)})
        return read

    ranking._LISTED.clear()
    first = ranking.cached_list_codes(("a.parquet",), models[0], reader(models[0], "a"))
    again = ranking.cached_list_codes(("a.parquet",), models[0], reader(models[0], "a"))
    assert again is first and reads == ["a"] and first.rows == 600 and first.list_sizes.sum() == 600
    assert first.nbytes == 600 * (4 + 8) + first.clip_ids.nbytes  # 32 bits: 4-byte codes, faiss's 8-byte ids
    budget = int(2.5 * first.nbytes)  # room for two such partitions
    ranking.cached_list_codes(("a.parquet",), models[1], reader(models[1], "a1"), budget)  # another model
    assert len(ranking._LISTED) == 2
    ranking.cached_list_codes(("b.parquet",), models[0], reader(models[0], "b"), budget)  # other files
    assert reads == ["a", "a1", "b"] and len(ranking._LISTED) == 2  # "a" left: least recently used
    ranking.cached_list_codes(("a.parquet",), models[0], reader(models[0], "a"), budget)  # evicted: read again
    assert reads == ["a", "a1", "b", "a"]
    ranking.cached_list_codes(("b.parquet",), models[0], reader(models[0], "b"), 1)  # newest stays alone
    assert len(ranking._LISTED) == 1 and reads == ["a", "a1", "b", "a"]
    # The kept lists rank as a fresh scan of the same rows does.
    zq = models[0].query_side(x[:5])
    probes = np.array([[0, 1]] * 5)
    kept = ranking.probed_partition(ranking.cached_list_codes(("a.parquet",), models[0], reader(models[0], "a")),
                                    zq, probes, 10)
    fresh = ranking.scan_partition(reader(models[0], "a")(), models[0], zq, 10, probes)
    assert np.array_equal(kept.distances, fresh.distances) and kept.clip_ids.equals(fresh.clip_ids)
    ranking._LISTED.clear()


def test_probed_recall_counts_ties_at_the_kth_distance_as_found():
    from audiohash.ranking import probed_recall

    exhaustive = np.array([[1.0, 2.0, 2.0], [0.5, 0.5, 0.5]], np.float32)
    # Query 0: a tie member other than the exhaustive one at place 3, then a code too far;
    # query 1: one code found in the probed lists only (padding +inf).
    probed = np.array([[1.0, 2.0, 3.0], [0.5, np.inf, np.inf]], np.float32)
    assert probed_recall(probed, exhaustive) == pytest.approx(3 / 6)
    assert probed_recall(exhaustive, exhaustive) == 1.0
    assert probed_recall(probed[:, :1], exhaustive) == pytest.approx(2 / 6)  # fewer columns: the rest missing
