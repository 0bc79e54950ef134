"""Retrieval metrics over ranked result lists: mAP@R, precision@R and recall against exact search.

Ranked lists are int (nq, R) row numbers into the database, best first; -1 marks padding (fewer
than R results) and never counts as relevant. Inputs are never modified.
"""
from __future__ import annotations

import numpy as np

from audiohash.errors import AudiohashError


def _ranked(ranked_ids: np.ndarray, nq: int | None = None) -> np.ndarray:
    ranked = np.asarray(ranked_ids)
    if ranked.ndim != 2:
        raise AudiohashError(f"ranked ids: expected a 2-d array (nq, R), got shape {ranked.shape}")
    if nq is not None and len(ranked) != nq:
        raise AudiohashError(f"ranked ids: {len(ranked)} rows for {nq} queries")
    return ranked.astype(np.int64, copy=False)


def relevance(query_labels: np.ndarray, db_labels: np.ndarray, ranked_ids: np.ndarray) -> np.ndarray:
    """bool (nq, R): whether ranked_ids[q, k] is a database row with the query's label."""
    query_labels = np.asarray(query_labels).ravel()
    db_labels = np.asarray(db_labels).ravel()
    ranked = _ranked(ranked_ids, len(query_labels))
    if ranked.size and ranked.max() >= len(db_labels):
        raise AudiohashError(f"ranked ids: id {int(ranked.max())} is past the {len(db_labels)} database rows")
    valid = ranked >= 0
    # Padding reads row 0 and is then masked out, so it never counts as relevant.
    return valid & (db_labels[np.where(valid, ranked, 0)] == query_labels[:, None])


def average_precision_at_r(relevant: np.ndarray) -> np.ndarray:
    """AP of each ranked list from its relevance (nq, R) bool: float64 (nq,).

    As in DeepHash, AP@R is normalised by the number of relevant items retrieved in the top R
    (not by all relevant items in the database), and is 0 when none is retrieved. With R = n it
    is the standard AP.
    """
    rel = np.asarray(relevant, dtype=bool)
    if rel.ndim != 2:
        raise AudiohashError(f"relevance: expected a 2-d array (nq, R), got shape {rel.shape}")
    hits = np.cumsum(rel, axis=1)
    precision = hits / np.arange(1, rel.shape[1] + 1)
    n_hits = hits[:, -1] if rel.shape[1] else np.zeros(len(rel), np.int64)
    total = np.where(rel, precision, 0.0).sum(axis=1)
    return np.where(n_hits > 0, total / np.maximum(n_hits, 1), 0.0)


def mean_average_precision(query_labels: np.ndarray, db_labels: np.ndarray, ranked_ids: np.ndarray) -> float:
    """mAP@R over queries; query_labels (nq,), db_labels (n,), ranked_ids (nq, R) int."""
    ap = average_precision_at_r(relevance(query_labels, db_labels, ranked_ids))
    return float(ap.mean()) if len(ap) else 0.0


def precision_at_r(query_labels: np.ndarray, db_labels: np.ndarray, ranked_ids: np.ndarray) -> float:
    """Mean fraction of the top R that shares the query's label (padding counts as a miss)."""
    rel = relevance(query_labels, db_labels, ranked_ids)
    return float(rel.mean()) if rel.size else 0.0


def recall_at_r(ranked_ids: np.ndarray, reference_ids: np.ndarray) -> float:
    """Mean over queries of |ours ∩ reference| / |reference|: how much of the exact top-R we find.

    ranked_ids (nq, R) from the quantized scan, reference_ids (nq, R') from exact float search;
    -1 entries are ignored on both sides. Queries without any reference id are left out.
    """
    ranked = _ranked(ranked_ids)
    reference = _ranked(reference_ids, len(ranked))
    # One sorted membership test over all rows at once: key = row * stride + id is unique per row.
    stride = int(max(ranked.max(initial=-1), reference.max(initial=-1))) + 1
    rows = np.arange(len(ranked), dtype=np.int64)[:, None]
    ours = np.where(ranked >= 0, rows * stride + ranked, -1)
    ref_valid = reference >= 0
    found = np.isin(rows * stride + reference, ours[ours >= 0]) & ref_valid
    n_ref = ref_valid.sum(axis=1)
    keep = n_ref > 0
    if not keep.any():
        return 0.0
    return float((found.sum(axis=1)[keep] / n_ref[keep]).mean())
