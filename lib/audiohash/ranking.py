"""Distributed ranking, the pure half: scan one partition's codes, merge partitions' top-R.

A partition returns its top-k per query as arrays (one record per partition, never a row per
candidate); the driver merges them into the global top-k. Ties at equal distance are broken by
clip_id, so the merged ranking is deterministic whatever the partitioning. Clip ids stay in
Arrow arrays throughout: a million Python strings per partition would cost more than the scan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from audiohash.arrow_arrays import code_matrix
from audiohash.bundle import ModelBundle
from audiohash.errors import AudiohashError
from audiohash.quantizers import Quantizer
from audiohash.schemas import RESULTS_DDL, column_names


@dataclass
class PartitionTopK:
    """One partition's answer: D float32 (nq, k_p), local int32 (nq, k_p) indexes into clip_ids."""

    distances: np.ndarray
    local_ids: np.ndarray
    clip_ids: pa.Array  # string array of the partition's clips that the ranking refers to
    scanned_rows: int = 0  # code rows the task read
    compared: int = 0  # (query, code) pairs whose distance it computed: scanned_rows x nq when exhaustive
    seconds: float = 0.0  # the task's time, set by the Spark layer (audiohash.spark.stats)


def scan_partition(batches: Iterable[pa.RecordBatch], quantizer: Quantizer, query_side: np.ndarray, k: int,
                   probes: np.ndarray | None = None) -> PartitionTopK:
    """Scan all (clip_id, code) rows of one partition against every query; keep the top k.
    probes: int64 (nq, nprobe) lists per query (``ivf.nearest_lists``): only the codes of those lists
    are scanned (the rows then carry list_id: ``list_codes``, ``probed_partition``); None: every code."""
    if probes is not None:
        return probed_partition(list_codes(batches, quantizer), query_side, probes, k)
    batches = [b for b in batches if b.num_rows]
    nq = len(query_side)
    if not batches:
        return PartitionTopK(np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int32), pa.array([], pa.string()))
    codes = np.concatenate([code_matrix(b.column("code"), quantizer.code_size) for b in batches])
    clip_ids = pa.concat_arrays([b.column("clip_id") for b in batches])
    D, I = partition_topk(quantizer, codes, clip_ids, query_side, k)
    return _ranked_part(D, I, clip_ids, len(codes), len(codes) * nq)


def _ranked_part(D: np.ndarray, I: np.ndarray, clip_ids: pa.Array, rows: int, compared: int) -> PartitionTopK:
    """A partition's top-k (D, I row numbers into clip_ids) as shipped: only the clips that made
    someone's top-k, renumbered 0..u-1 (fewer than k codes in the probed lists: I = -1, distance
    +inf, shipped as clip 0 and dropped by the merge)."""
    found = I >= 0
    if not found.any():
        nq = len(D)
        return PartitionTopK(np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int32), pa.array([], pa.string()),
                             rows, compared=compared)
    used = np.unique(I[found])
    local = np.where(found, np.searchsorted(used, np.where(found, I, used[0])), 0)
    return PartitionTopK(D, local.astype(np.int32), clip_ids.take(pa.array(used)), scanned_rows=rows,
                         compared=compared)


@dataclass
class ListedCodes:
    """One partition's codes in their inverted-file lists, ready to be scanned again and again:
    faiss's IVFPQ index holding them (row numbers = positions in clip_id order) and the clip ids."""

    index: object  # faiss.IndexIVFPQ, filled
    clip_ids: pa.Array  # sorted: faiss keeps the lowest row number among equal distances where it can
    list_sizes: np.ndarray  # int64 (nlist,): codes per list, for the count of codes each query compares
    rows: int
    nbytes: int = 0  # memory held: the codes and faiss's ids in the lists, the clip ids


def list_codes(batches: Iterable[pa.RecordBatch], quantizer: Quantizer) -> ListedCodes:
    """(clip_id, code, list_id) rows -> ``ListedCodes`` (``ivf.ivf_index`` over the quantizer's
    coarse centroids and codebooks; codes added as they are)."""
    from audiohash import ivf

    batches = [b for b in batches if b.num_rows]
    index = ivf.ivf_index(quantizer.ivf_centroids, quantizer.centroids)
    if not batches:
        return ListedCodes(index, pa.array([], pa.string()), np.zeros(quantizer.nlist, np.int64), 0)
    codes = np.concatenate([code_matrix(b.column("code"), quantizer.code_size) for b in batches])
    clip_ids = pa.concat_arrays([b.column("clip_id") for b in batches])
    lists = np.concatenate([b.column("list_id").to_numpy(zero_copy_only=False) for b in batches]).astype(np.int32)
    order = clip_id_order(clip_ids)
    if order is not None:
        codes, lists, clip_ids = codes[order], lists[order], clip_ids.take(pa.array(order))
    ivf.add_codes(index, codes, lists)
    return ListedCodes(index, clip_ids, np.bincount(lists, minlength=quantizer.nlist), len(codes),
                       codes.nbytes + 8 * len(codes) + clip_ids.nbytes)


def probed_partition(listed: ListedCodes, query_side: np.ndarray, probes: np.ndarray, k: int) -> PartitionTopK:
    """The top k of the codes in the lists each query probes (``ivf.search_lists``)."""
    from audiohash import ivf

    D, I = ivf.search_lists(listed.index, query_side, probes, min(k, listed.rows))
    return _ranked_part(D, I, listed.clip_ids, listed.rows, int(listed.list_sizes[probes].sum()))


# Per Python worker: the partitions last listed, by (quantizer, data files), most recently used
# last. Delta data files never change once written, so a query batch or a later search over the
# same files of the same model scans the lists already in memory instead of reading and adding
# them again. They are kept while their memory fits the budget each search ships
# (``query.lists_cache_mb``); the least recently used leave first, the newest always stays.
_LISTED: dict[tuple, tuple[Quantizer, ListedCodes]] = {}
LISTS_CACHE_BYTES = 1024 << 20  # config.QuerySettings.lists_cache_mb's default


def cached_list_codes(files: tuple[str, ...], quantizer: Quantizer, read: Callable[[], Iterable[pa.RecordBatch]],
                      budget_bytes: int = LISTS_CACHE_BYTES) -> ListedCodes:
    """``list_codes`` of the rows ``read()`` gives for these data files, kept per worker within
    ``budget_bytes`` (the quantizer is held with the entry, so its id cannot name another model
    while the entry lives)."""
    key = (id(quantizer), files)
    _LISTED[key] = _LISTED.pop(key) if key in _LISTED else (quantizer, list_codes(read(), quantizer))
    while len(_LISTED) > 1 and sum(entry.nbytes for _, entry in _LISTED.values()) > budget_bytes:
        _LISTED.pop(next(iter(_LISTED)))  # the least recently used; this one, the newest, stays
    return _LISTED[key][1]


def partition_topk(quantizer: Quantizer, codes: np.ndarray, clip_ids: pa.Array, query_side: np.ndarray,
                   k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows per query by (distance, clip_id): D float32 (nq, k'), I int64 (nq, k').

    faiss keeps the lowest row number among equal distances, so the rows are scanned in clip_id
    order (one sort of the partition's ids). Otherwise, where equal distances
    straddle the k-th place (duplicate codes are common: a DQN puts a class on a few codewords),
    a partition could keep another clip than the one the global merge would pick, and rankings
    would depend on the partitioning.
    """
    order = clip_id_order(clip_ids)
    if order is not None:
        D, I = quantizer.scan(codes[order], query_side, min(k, len(codes)))
        return D, order[I]
    return quantizer.scan(codes, query_side, min(k, len(codes)))


def clip_id_order(clip_ids: pa.Array) -> np.ndarray | None:
    """int64 row order that sorts ``clip_ids``; None where they are sorted already (faiss keeps the
    lowest row number among equal distances, so scans run over rows in clip_id order)."""
    if len(clip_ids) > 1 and not pc.all(pc.less_equal(clip_ids[:-1], clip_ids[1:])).as_py():
        return pc.sort_indices(clip_ids).to_numpy().astype(np.int64)
    return None


def partition_record(part: PartitionTopK) -> pa.RecordBatch:
    """PartitionTopK -> one Arrow row of ``schemas.SCAN_OUTPUT_DDL``."""
    offsets = pa.array([0, len(part.clip_ids)], pa.int32())
    return pa.RecordBatch.from_arrays([
        pa.array([part.distances.shape[1]], pa.int64()),
        pa.array([np.ascontiguousarray(part.distances, np.float32).tobytes()], pa.binary()),
        pa.array([np.ascontiguousarray(part.local_ids, np.int32).tobytes()], pa.binary()),
        pa.ListArray.from_arrays(offsets, part.clip_ids.cast(pa.string())),
        pa.array([part.scanned_rows], pa.int64()),
        pa.array([part.seconds], pa.float64()),
        pa.array([part.compared], pa.int64()),
    ], names=["n_rows", "distances", "local_ids", "clip_ids", "scanned_rows", "scan_s", "compared"])


def partitions_from_table(table: pa.Table, nq: int) -> list[PartitionTopK]:
    """The collected scan records (``schemas.SCAN_OUTPUT_DDL``) -> PartitionTopK per partition."""
    out = []
    clip_lists = table.column("clip_ids").combine_chunks()
    for row in range(table.num_rows):
        k = table.column("n_rows")[row].as_py()
        out.append(PartitionTopK(
            np.frombuffer(table.column("distances")[row].as_py(), np.float32).reshape(nq, k),
            np.frombuffer(table.column("local_ids")[row].as_py(), np.int32).reshape(nq, k),
            clip_lists[row].values,
            scanned_rows=table.column("scanned_rows")[row].as_py(),
            compared=table.column("compared")[row].as_py(),
            seconds=table.column("scan_s")[row].as_py(),
        ))
    return out


def check_models(seen: list[str], codes_table: str, bundle: ModelBundle) -> None:
    """Refuse to scan a code table written by another model (or an empty one).

    seen: the "name:version" of every model whose codes the table holds (the query job passes the
    one model named by the table's encode lineage).
    """
    if not seen:
        raise AudiohashError(f"code table {codes_table} is empty; run jobs/encode.py first")
    expected = f"{bundle.model_name}:{bundle.model_version}"
    if sorted(seen) != [expected]:
        raise AudiohashError(
            f"code table {codes_table} holds codes of model {', '.join(sorted(seen))} (name:version), but the "
            f"query bundle is {expected}; re-encode with jobs/encode.py model.version={bundle.model_version}, "
            f"or query with the model.version the table was encoded with"
        )


def check_lineage(lineage, codes_table: str, version: int, bundle: ModelBundle) -> None:
    """Refuse to scan a code table version that encode did not write (``lineage`` None: nobody
    knows which model made its codes) or that another model wrote (``check_models``)."""
    if lineage is None:
        raise AudiohashError(f"code table {codes_table} (version {version}) was not written by jobs/encode.py: "
                             f"no lineage in its commits, so nobody knows which model made its codes; re-encode")
    check_models([f"{lineage.model_name}:{lineage.model_version}"], codes_table, bundle)


def plan_query_batches(n_queries: int, requested: int, k: int, n_partitions: int, table_bytes_per_query: int,
                       budget_bytes: int) -> list[tuple[int, int]]:
    """Split queries into [start, stop) batches of at most ``requested`` queries whose driver-side
    footprint fits ``budget_bytes``: per query, the partitions' candidates (k x n_partitions x
    12 bytes: distance + id) plus its lookup tables."""
    per_query = k * max(1, n_partitions) * 12 + table_bytes_per_query
    size = max(1, min(requested, budget_bytes // per_query))
    return [(start, min(n_queries, start + size)) for start in range(0, n_queries, size)]


def merge_topk(parts: list[PartitionTopK], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge partitions' top-k into the global top-k per query.

    Returns D float32 (nq, k') and clip ids object (nq, k'), k' = min(k, candidates), sorted by
    (distance, clip_id).

    Only the candidates at or under a query's k-th smallest distance can reach its top k, so
    only their clip ids are sorted (the tie-breaker); the order is one integer key per candidate,
    the distance's bits then the clip id's rank, partially sorted per query.
    """
    parts = [p for p in parts if p.distances.shape[1]]
    if not parts:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), object)
    D = np.hstack([p.distances for p in parts]).astype(np.float32) + np.float32(0)  # -0.0 -> +0.0
    offsets = np.cumsum([0] + [len(p.clip_ids) for p in parts[:-1]])
    G = np.hstack([off + p.local_ids.astype(np.int64) for off, p in zip(offsets, parts)])  # into all_ids
    keep = min(k, D.shape[1])
    contenders = D <= np.partition(D, keep - 1, axis=1)[:, keep - 1:keep]
    all_ids = pa.concat_arrays([p.clip_ids.cast(pa.string()) for p in parts])
    is_needed = np.zeros(len(all_ids), bool)
    is_needed[G[contenders]] = True
    needed = np.flatnonzero(is_needed)
    order = pc.sort_indices(all_ids.take(pa.array(needed))).to_numpy()
    rank = np.full(len(all_ids), len(needed), np.int64)  # the rest: after every contender
    rank[needed[order]] = np.arange(len(needed))
    key = (_sortable_bits(D) << np.uint64(32)) | rank[G].astype(np.uint64)
    pick = np.argpartition(key, keep - 1, axis=1)[:, :keep]
    pick = np.take_along_axis(pick, np.argsort(np.take_along_axis(key, pick, axis=1), axis=1), axis=1)
    D, G = np.take_along_axis(D, pick, axis=1), np.take_along_axis(G, pick, axis=1)
    # Only the kept ids become Python strings; places no code filled (fewer than k codes in the
    # probed lists) hold None at distance +inf.
    ids = all_ids.take(pa.array(G.ravel())).to_numpy(zero_copy_only=False).reshape(G.shape)
    ids[~np.isfinite(D)] = None
    return D, ids


def _sortable_bits(D: np.ndarray) -> np.ndarray:
    """float32 -> uint64 holding 32 bits in the floats' order (negative floats' bits flipped, the
    others' sign bit set), so that integer order is distance order."""
    bits = np.ascontiguousarray(D, np.float32).view(np.uint32)
    return np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31)).astype(np.uint64)


def ranking_mismatch(D: np.ndarray, ids: np.ndarray, D_ref: np.ndarray, ids_ref: np.ndarray, complete: bool,
                     rtol: float = 1e-5) -> str | None:
    """Compare a top-k (D, ids: (nq, k)) with a reference ranking (D_ref, ids_ref: (nq, k_ref >= k),
    sorted by distance); None when they agree, else what differs, naming the query row.

    Distances may differ by rounding: faiss builds the lookup tables by BLAS as ||x||^2 + ||c||^2
    - 2 x.c, whose last bits depend on the batch's shape and threads, so they must agree within
    ``rtol`` of the row's largest distance. Clip ids must be equal, except that within a run of
    (near-)equal reference distances they may come in any order; a run cut by the k-th place may
    keep any of its members (any clip at all if the reference is not ``complete`` and ends in it).
    """
    nq, k = ids.shape
    if D.shape != (nq, k) or D_ref.shape[0] != nq or D_ref.shape[1] < k:
        return f"shapes differ: {D.shape} vs reference {D_ref.shape}"
    for row in range(nq):
        d = D_ref[row]
        tol = rtol * max(1.0, float(np.abs(d[np.isfinite(d)]).max(initial=0.0)))
        worst = np.abs(D[row] - d[:k]).max(initial=0.0)
        if not worst <= tol:
            return f"query {row}: distances differ by {worst:.3g} (tolerance {tol:.3g})"
        breaks = np.flatnonzero(np.diff(d) > tol) + 1
        for start, stop in zip([0, *breaks], [*breaks, len(d)]):
            if start >= k:
                break
            got, want = set(ids[row, start:min(stop, k)].tolist()), set(ids_ref[row, start:stop].tolist())
            if stop == len(d) and not complete:
                continue  # the run may go on past the reference's end
            if not (got == want if stop <= k else got <= want):
                return f"query {row}: ranks {start + 1}-{min(stop, k)} hold {sorted(got)[:5]}, expected {sorted(want)[:5]}"
    return None


def results_batch(query_ids: np.ndarray, ranked_ids: np.ndarray, distances: np.ndarray, run_id: str,
                  model_name: str, model_version: int) -> pa.RecordBatch:
    """Rows of ``schemas.RESULTS_DDL`` for some queries: query_ids (nq,), ranked_ids and distances
    (nq, r), best first; one row per (query, rank), ranks from 1."""
    nq, r = ranked_ids.shape
    return pa.RecordBatch.from_arrays([
        pa.array(np.repeat(np.asarray(query_ids, object), r), pa.string()),
        pa.array(np.tile(np.arange(1, r + 1, dtype=np.int32), nq)),
        pa.array(np.asarray(ranked_ids, object).ravel(), pa.string()),
        pa.array(np.asarray(distances, np.float32).ravel()),
        pa.array([run_id] * (nq * r), pa.string()),
        pa.array([model_name] * (nq * r), pa.string()),
        pa.array(np.full(nq * r, model_version, np.int32)),
    ], names=column_names(RESULTS_DDL))


def probed_recall(D: np.ndarray, D_exhaustive: np.ndarray, rtol: float = 1e-5) -> float:
    """Recall@k of a probed top-k (D float32 (nq, k'), +inf where no code was found) against the
    exhaustive top-k of the same codes (nq, k), ties counted as found: the share of the k places
    holding a code no farther than the exhaustive k-th distance. (Codes repeat, so many codes can
    share the k-th distance, and which of them a top-k keeps is arbitrary.)"""
    nq, k = D_exhaustive.shape
    if k == 0:
        return 1.0
    D = np.hstack([D[:, :k], np.full((nq, max(0, k - D.shape[1])), np.inf, np.float32)])
    kth = D_exhaustive[:, -1:]
    return float(np.mean(D <= kth + rtol * np.abs(kth)))
