"""Retrieval quality of a ranking: mAP@R, precision@R, and recall@R against exact float search."""
from __future__ import annotations

import faiss
import numpy as np

from audiohash import metrics


def ranked_positions(ranked_clip_ids: np.ndarray, db_clip_ids: np.ndarray) -> np.ndarray:
    """Clip ids object (nq, R) -> int64 positions in ``db_clip_ids`` (which must be sorted)."""
    pos = np.searchsorted(db_clip_ids, ranked_clip_ids)
    return pos.astype(np.int64)


def exact_float_topk(xq: np.ndarray, xb: np.ndarray, k: int) -> np.ndarray:
    """Exact L2 top-k of float32 xq (nq, d) over xb (n, d): int64 (nq, k) positions in xb."""
    index = faiss.IndexFlatL2(xb.shape[1])
    index.add(np.ascontiguousarray(xb, np.float32))
    return index.search(np.ascontiguousarray(xq, np.float32), k)[1]


def retrieval_metrics(query_labels: np.ndarray, db_labels: np.ndarray, ranked: np.ndarray,
                      reference: np.ndarray | None = None) -> dict[str, float]:
    """ranked: int64 (nq, R) positions into db_labels; reference: exact float top-R, same shape."""
    R = ranked.shape[1]
    out = {
        f"map_at_{R}": metrics.mean_average_precision(query_labels, db_labels, ranked),
        f"precision_at_{R}": metrics.precision_at_r(query_labels, db_labels, ranked),
    }
    if R >= len(db_labels):
        out["map_all"] = out[f"map_at_{R}"]
    if reference is not None:
        out[f"recall_at_{R}"] = metrics.recall_at_r(ranked, reference)
    return out
