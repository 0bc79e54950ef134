"""An inverted file over the codes (IVF): a coarse quantizer in the space the codes live in, the
list of every code, the lists each query probes, and the scan of the probed lists only.

The coarse centroids are k-means centroids (faiss) of the training rows in the code space: the
standardized embedding for PQ/OPQ, the network output z for DQN and its successors, so lists
keep the semantics the supervised codes carry. Codes are not residuals: a code is the same with
and without lists, so a scan of every list ranks exactly as the exhaustive scan, and nprobe only
trades recall for time. The probed scan is faiss's own ``IndexIVFPQ`` (``by_residual`` off) over
the quantizer's codebooks, the codes added with their lists as they are (nothing re-encoded).
Binary codes (ITQ, SH, AGH) and 4-bit fast-scan codes have no lists: they stay exhaustive.
"""
from __future__ import annotations

import math

import faiss
import numpy as np

from audiohash.errors import AudiohashError

MIN_ROWS_PER_LIST = 39  # faiss's k-means asks for at least 39 training points per centroid


def default_nlist(n_train: int) -> int:
    """About 4 * sqrt(n) lists for n training rows (autofaiss's rule), at most n / 39."""
    return max(1, min(round(4 * math.sqrt(n_train)), n_train // MIN_ROWS_PER_LIST))


def train_centroids(z: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    """k-means centroids float32 (nlist, d) of training rows z float32 (n, d) in the code space."""
    z = np.ascontiguousarray(z, np.float32)
    if nlist < 1 or nlist > len(z):
        raise AudiohashError(f"ivf: {nlist} lists need between 1 and {len(z)} (the training rows) lists")
    kmeans = faiss.Kmeans(z.shape[1], nlist, niter=20, seed=seed, max_points_per_centroid=256)
    kmeans.train(z)
    return np.ascontiguousarray(kmeans.centroids, np.float32)


def nearest_lists(z: np.ndarray, centroids: np.ndarray, n: int = 1) -> np.ndarray:
    """The ``n`` nearest lists of each row z float32 (m, d): int64 (m, n), nearest first."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    _, lists = index.search(np.ascontiguousarray(z, np.float32), min(n, len(centroids)))
    return lists


def assign_lists(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The list of each row z float32 (m, d): int32 (m,)."""
    return nearest_lists(z, centroids, 1)[:, 0].astype(np.int32)


def ivf_index(centroids: np.ndarray, pq_centroids: np.ndarray) -> faiss.IndexIVFPQ:
    """An empty faiss IndexIVFPQ over these coarse centroids (nlist, d) and codebooks
    (M, 256, d / M), codes not residuals: ready for ``add_sa_codes`` with list prefixes."""
    nlist, d = centroids.shape
    M, K, dsub = pq_centroids.shape
    if M * dsub != d or K != 256:
        raise AudiohashError(f"ivf: codebooks {pq_centroids.shape} do not fit coarse centroids of dimension {d}")
    coarse = faiss.IndexFlatL2(d)
    coarse.add(np.ascontiguousarray(centroids, np.float32))
    index = faiss.IndexIVFPQ(coarse, d, nlist, M, 8)
    index.own_fields = True
    coarse.this.disown()  # the IVF index frees its quantizer
    index.by_residual = False
    faiss.copy_array_to_vector(np.ascontiguousarray(pq_centroids, np.float32).ravel(), index.pq.centroids)
    index.is_trained = True
    return index


def add_codes(index: faiss.IndexIVFPQ, codes: np.ndarray, list_ids: np.ndarray) -> None:
    """Add codes uint8 (n, M) to lists int32 (n,) of an ``ivf_index``, as they are (ids 0..n-1)."""
    codes = np.ascontiguousarray(codes, np.uint8)
    n = len(codes)
    if n == 0:
        return
    # faiss's standalone code of an IVF entry: the list number (little endian, coarse_code_size
    # bytes) and then the PQ code.
    width = index.coarse_code_size()
    prefix = np.ascontiguousarray(list_ids, "<i8").view(np.uint8).reshape(n, 8)[:, :width]
    index.add_sa_codes(np.ascontiguousarray(np.hstack([prefix, codes])), np.arange(n, dtype=np.int64))


def search_lists(index: faiss.IndexIVFPQ, query_side: np.ndarray, probes: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest codes of a filled ``ivf_index`` in the lists each query probes.

    probes: int64 (nq, nprobe) lists per query (``nearest_lists``). Returns D float32 (nq, k) and I
    int64 (nq, k) ids, padded with -1 / +inf where the probed lists hold fewer than k codes."""
    nq = len(query_side)
    if index.ntotal == 0 or k <= 0:
        return np.full((nq, max(k, 0)), np.inf, np.float32), np.full((nq, max(k, 0)), -1, np.int64)
    index.nprobe = probes.shape[1]
    D, I = index.search_preassigned(np.ascontiguousarray(query_side, np.float32), k,
                                    np.ascontiguousarray(probes, np.int64), None)
    return np.where(I < 0, np.inf, D).astype(np.float32), I.astype(np.int64)


def scan_lists(index: faiss.IndexIVFPQ, codes: np.ndarray, list_ids: np.ndarray, query_side: np.ndarray,
               probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank the codes uint8 (n, M) of lists int32 (n,) in the lists each query probes: ``add_codes``
    to the empty ``index`` then ``search_lists``; I are row numbers into ``codes``."""
    add_codes(index, codes, list_ids)
    return search_lists(index, query_side, probes, k)
