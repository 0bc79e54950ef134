"""The encode worker: a batch of embedding rows in, code rows out (pure pyarrow/numpy)."""
from __future__ import annotations

import datetime as dt
import zlib

import numpy as np
import pyarrow as pa

from audiohash.arrow_arrays import binary_column, embedding_matrix
from audiohash.bundle import ModelBundle


def shard_of(clip_ids: list[str], n_shards: int) -> np.ndarray:
    """Stable shard per clip: crc32(clip_id) mod n_shards, int32 (n,). Same on every machine/run."""
    return np.fromiter((zlib.crc32(c.encode()) % n_shards for c in clip_ids), np.int32, len(clip_ids))


def encode_batch(batch: pa.RecordBatch, bundle: ModelBundle, n_shards: int, embedding_version: int,
                 encoded_at: dt.datetime) -> pa.RecordBatch:
    """Rows (clip_id, label, embedding) -> rows of ``schemas.CODES_DDL``.

    The caller has already filtered out rows with a wrong-size or NaN embedding; one left here
    raises AudiohashError naming the row.
    """
    quantizer = bundle.quantizer
    x = embedding_matrix(batch.column("embedding"), quantizer.input_dim)
    codes = quantizer.encode(x)
    n = len(codes)
    clip_ids = batch.column("clip_id")
    return pa.RecordBatch.from_arrays(
        [
            clip_ids,
            pa.array(shard_of(clip_ids.to_pylist(), n_shards), pa.int32()),
            binary_column(codes),
            batch.column("label"),
            pa.array([bundle.model_name] * n, pa.string()),
            pa.array(np.full(n, bundle.model_version, np.int32)),
            pa.array(np.full(n, embedding_version, np.int64)),
            pa.array([encoded_at] * n, pa.timestamp("us", tz="UTC")),
        ],
        names=["clip_id", "shard", "code", "label", "model_name", "model_version", "embedding_version", "encoded_at"],
    )
