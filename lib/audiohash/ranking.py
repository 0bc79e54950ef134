"""Distributed ranking, the pure half: scan one partition's codes, merge partitions' top-R.

A partition returns its top-k per query as arrays (one record per partition, never a row per
candidate); the driver merges them into the global top-k. Ties at equal distance are broken by
clip_id, so the merged ranking is deterministic whatever the partitioning.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa

from audiohash.arrow_arrays import code_matrix
from audiohash.quantizers import Quantizer


@dataclass
class PartitionTopK:
    """One partition's answer: D float32 (nq, k_p), local int32 (nq, k_p) indexes into clip_ids."""

    distances: np.ndarray
    local_ids: np.ndarray
    clip_ids: np.ndarray  # object array of the partition clips the ranking refers to


def scan_partition(batches: Iterable[pa.RecordBatch], quantizer: Quantizer, query_side: np.ndarray, k: int) -> PartitionTopK:
    """Scan all (clip_id, code) rows of one partition against every query; keep the top k."""
    batches = [b for b in batches if b.num_rows]
    nq = len(query_side)
    if not batches:
        return PartitionTopK(np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int32), np.array([], object))
    codes = np.concatenate([code_matrix(b.column("code"), quantizer.code_size) for b in batches])
    clip_ids = np.concatenate([b.column("clip_id").to_numpy(zero_copy_only=False) for b in batches])
    D, I = quantizer.scan(codes, query_side, min(k, len(codes)))
    # Ship only the clips that made someone's top-k, renumbered 0..u-1.
    used, local = np.unique(I, return_inverse=True)
    return PartitionTopK(D, local.reshape(I.shape).astype(np.int32), clip_ids[used])


def partition_record(part: PartitionTopK) -> pa.RecordBatch:
    """PartitionTopK -> one Arrow row of ``schemas.SCAN_OUTPUT_DDL``."""
    return pa.RecordBatch.from_pydict({
        "n_rows": pa.array([part.distances.shape[1]], pa.int64()),
        "distances": pa.array([part.distances.astype(np.float32).tobytes()], pa.binary()),
        "local_ids": pa.array([part.local_ids.astype(np.int32).tobytes()], pa.binary()),
        "clip_ids": pa.array([list(part.clip_ids)], pa.list_(pa.string())),
    })


def partition_from_record(row: dict, nq: int) -> PartitionTopK:
    k = int(row["n_rows"])
    return PartitionTopK(
        np.frombuffer(row["distances"], np.float32).reshape(nq, k),
        np.frombuffer(row["local_ids"], np.int32).reshape(nq, k),
        np.asarray(row["clip_ids"], dtype=object),
    )


def merge_topk(parts: list[PartitionTopK], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge partitions' top-k into the global top-k per query.

    Returns D float32 (nq, k') and clip ids object (nq, k'), k' = min(k, candidates), sorted by
    (distance, clip_id).
    """
    parts = [p for p in parts if p.distances.shape[1]]
    if not parts:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), object)
    all_ids = np.concatenate([p.clip_ids for p in parts])
    order = np.argsort(all_ids, kind="stable")
    ordinal = np.empty(len(all_ids), np.int64)
    ordinal[order] = np.arange(len(all_ids))  # rank of each clip id in sorted order: the tie-breaker
    offsets = np.cumsum([0] + [len(p.clip_ids) for p in parts[:-1]])
    D = np.hstack([p.distances for p in parts])
    O = np.hstack([ordinal[off + p.local_ids] for off, p in zip(offsets, parts)])
    keep = min(k, D.shape[1])
    # lexsort: last key is primary -> distance first, then clip-id ordinal.
    pick = np.lexsort((O, D), axis=-1)[:, :keep]
    D = np.take_along_axis(D, pick, axis=1)
    O = np.take_along_axis(O, pick, axis=1)
    return D, all_ids[order][O]
