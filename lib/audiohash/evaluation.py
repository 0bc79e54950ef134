"""Retrieval quality of a ranking: mAP@R, precision@R, and recall@R against exact float search."""
from __future__ import annotations

import faiss
import numpy as np

from audiohash import metrics


def ranked_positions(ranked_clip_ids: np.ndarray, db_clip_ids: np.ndarray) -> np.ndarray:
    """Clip ids object (nq, R) -> int64 positions in ``db_clip_ids`` (which must be sorted); -1 for
    None (a rank no code filled: an inverted-file scan found fewer codes in its probed lists)."""
    missing = np.equal(ranked_clip_ids, None)
    pos = np.searchsorted(db_clip_ids, np.where(missing, db_clip_ids[0] if len(db_clip_ids) else "", ranked_clip_ids))
    return np.where(missing, -1, pos).astype(np.int64)


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


def curve_points(R: int, n_points: int = 60) -> np.ndarray:
    """Log-spaced ranks 1..R (int64, unique, R included) at which curves are sampled."""
    return np.unique(np.round(np.logspace(0, np.log10(max(R, 1)), n_points)).astype(np.int64).clip(1, R))


def retrieval_curves(query_labels: np.ndarray, db_labels: np.ndarray, ranked: np.ndarray,
                     r_points: np.ndarray | None = None) -> dict[str, list]:
    """mAP@R, precision@R and recall@R (relevant found / relevant in the database) at ``r_points``.

    ranked: int64 (nq, R) positions into db_labels. Returns plain lists (JSON-ready):
    {"r", "map_at_r", "precision_at_r", "recall_at_r"}.
    """
    rel = metrics.relevance(query_labels, db_labels, ranked)
    R = rel.shape[1]
    r_points = curve_points(R) if r_points is None else np.asarray(r_points)
    hits = np.cumsum(rel, axis=1, dtype=np.int64)
    ranks = np.arange(1, R + 1)
    # AP@r for every r at once: running sum of precision at each hit, over hits so far.
    ap = np.cumsum(np.where(rel, hits / ranks, 0.0), axis=1) / np.maximum(hits, 1)
    labels, counts = np.unique(np.asarray(db_labels), return_counts=True)
    n_relevant = dict(zip(labels.tolist(), counts.tolist()))
    per_query = np.array([n_relevant.get(label, 0) for label in np.asarray(query_labels).tolist()], np.float64)
    cols = r_points - 1
    recall = hits[:, cols] / np.maximum(per_query, 1)[:, None]
    return {"r": r_points.tolist(), "map_at_r": ap[:, cols].mean(axis=0).tolist(),
            "precision_at_r": (hits[:, cols] / r_points).mean(axis=0).tolist(),
            "recall_at_r": recall.mean(axis=0).tolist()}


def class_group_metrics(query_labels: np.ndarray, db_labels: np.ndarray, ranked: np.ndarray,
                        seen_classes) -> dict[str, float]:
    """mAP over whole-database rankings ranked (nq, n_db), split by whether the query's class was
    labeled in training (``seen_classes``): map_all_seen and map_all_unseen, each where it has
    queries, and n_queries_unseen. Empty when the ranking is not the whole database."""
    if ranked.shape[1] < len(db_labels):
        return {}
    unseen = ~np.isin(np.asarray(query_labels, object), np.asarray(sorted(seen_classes), object))
    out = {"n_queries_unseen": int(unseen.sum())}
    for name, rows in (("map_all_unseen", unseen), ("map_all_seen", ~unseen)):
        if rows.any():
            out[name] = metrics.mean_average_precision(np.asarray(query_labels)[rows], db_labels, ranked[rows])
    return out
