"""Zero-copy views between Arrow columns and numpy matrices (embeddings, codes)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from audiohash.errors import AudiohashError


def embedding_matrix(column: pa.Array | pa.ChunkedArray, dim: int, what: str = "embedding") -> np.ndarray:
    """list<float> column of n rows, each of ``dim`` values -> float32 (n, dim)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if len(column) == 0:
        return np.zeros((0, dim), np.float32)
    if column.null_count:
        raise AudiohashError(f"{what}: row {column.is_null().index(True).as_py()} is null")
    lengths = np.diff(column.offsets.to_numpy())
    if (lengths != dim).any():
        row = int(np.flatnonzero(lengths != dim)[0])
        raise AudiohashError(f"{what}: row {row} has {lengths[row]} values, expected {dim}")
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)


def binary_column(codes: np.ndarray) -> pa.Array:
    """uint8 (n, m) -> Arrow binary column of n m-byte values, without a Python object per row."""
    n, m = codes.shape
    offsets = np.arange(0, (n + 1) * m, m, dtype=np.int32)
    data = np.ascontiguousarray(codes, dtype=np.uint8)
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def code_matrix(column: pa.Array | pa.ChunkedArray, code_size: int) -> np.ndarray:
    """Arrow binary column of n ``code_size``-byte values -> uint8 (n, code_size)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if len(column) == 0:
        return np.zeros((0, code_size), np.uint8)
    offset_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    offsets = np.frombuffer(column.buffers()[1], offset_type)[column.offset: column.offset + len(column) + 1]
    if (np.diff(offsets) != code_size).any():
        row = int(np.flatnonzero(np.diff(offsets) != code_size)[0])
        raise AudiohashError(f"code row {row} has {np.diff(offsets)[row]} bytes, this model's codes have {code_size}")
    data = np.frombuffer(column.buffers()[2], np.uint8)
    return data[offsets[0]: offsets[-1]].reshape(-1, code_size)
