"""One interface for every quantizer: fit on embeddings [+ labels], encode to codes, rank queries.

Two families share it:
- ``metric == "adc"``: product-quantization codes (M bytes, M subspaces x 256 centroids). The query
  side is a float vector in the code space (identity for PQ, rotation for OPQ, the network for
  DQN); ranking is the asymmetric distance through one M x 256 lookup table per query.
- ``metric == "hamming"``: binary codes packed into bytes (ITQ, SH, AGH); the query side is the
  query's own code and ranking is by Hamming distance.

Everything a quantizer needs to rebuild itself is in its ``QuantizerState``: JSON-able params,
named numpy arrays and (for networks) a torch state dict. No pickled objects.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar

import faiss
import numpy as np

from audiohash.errors import AudiohashError

CENTROIDS_PER_SUBSPACE = 256  # 8-bit sub-codes: one byte per subspace


@dataclass
class QuantizerState:
    """What a bundle stores for a quantizer: params (JSON), arrays (npz), torch_state (state dict)."""

    method: str
    params: dict
    arrays: dict[str, np.ndarray]
    torch_state: dict | None = field(default=None)


def as_float32_matrix(x: np.ndarray, dim: int | None = None, what: str = "embeddings") -> np.ndarray:
    """Return x as a C-contiguous float32 (n, d) array; raise AudiohashError on a wrong size or NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise AudiohashError(f"{what}: expected a 2-d array (n, d), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise AudiohashError(f"{what}: expected dimension {dim}, got {x.shape[1]}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise AudiohashError(f"{what}: row {int(np.flatnonzero(bad)[0])} holds NaN or inf values")
    return x


class Quantizer(abc.ABC):
    """Base class. Subclasses set ``method``, ``metric``, ``supervised`` and implement the hooks."""

    method: ClassVar[str]
    metric: ClassVar[str]  # "adc" | "hamming"
    supervised: ClassVar[bool] = False
    has_lists: ClassVar[bool] = False  # codes an inverted file can hold (``audiohash.ivf``)

    def __init__(self, n_bits: int, seed: int = 0):
        if n_bits <= 0 or n_bits % 8:
            raise AudiohashError(f"{self.method}: bits must be a positive multiple of 8, got {n_bits}")
        self.n_bits = int(n_bits)
        self.seed = int(seed)
        self.input_dim: int | None = None
        # Inputs are standardized with statistics of the training set; stored in the bundle.
        self.input_mean: np.ndarray | None = None
        self.input_std: np.ndarray | None = None
        # The inverted file's coarse centroids (nlist, code_dim) in the code space; None: no lists.
        self.ivf_centroids: np.ndarray | None = None

    @property
    def code_size(self) -> int:
        """Bytes per code."""
        return self.n_bits // 8

    # ---- standardization shared by all methods -------------------------------------------
    def _fit_standardizer(self, x: np.ndarray) -> np.ndarray:
        x = as_float32_matrix(x)
        self.input_dim = x.shape[1]
        self.input_mean = x.mean(axis=0).astype(np.float32)
        self.input_std = np.maximum(x.std(axis=0), 1e-6).astype(np.float32)
        return self._standardize(x)

    def _standardize(self, x: np.ndarray) -> np.ndarray:
        if self.input_mean is None:
            raise AudiohashError(f"{self.method}: quantizer is not fitted")
        x = as_float32_matrix(x, self.input_dim)
        return (x - self.input_mean) / self.input_std

    # ---- the interface ----------------------------------------------------------------------
    @abc.abstractmethod
    def fit(self, x: np.ndarray, labels: np.ndarray | None = None) -> "Quantizer":
        """Train on x (n, d) float32; labels (n,) int64 with -1 for unlabeled rows (supervised only)."""

    @abc.abstractmethod
    def encode(self, x: np.ndarray) -> np.ndarray:
        """Codes of x (n, d): uint8 (n, code_size)."""

    @abc.abstractmethod
    def query_side(self, x: np.ndarray) -> np.ndarray:
        """What the query job broadcasts per query: float32 (nq, code_dim) for adc, uint8 codes for hamming."""

    @abc.abstractmethod
    def scan_index(self) -> faiss.Index | faiss.IndexBinary:
        """An empty faiss index over this quantizer's code space, ready for ``add_sa_codes``/``add``."""

    @abc.abstractmethod
    def _state(self) -> tuple[dict, dict[str, np.ndarray], dict | None]:
        """(params, arrays, torch_state) beyond the standardizer."""

    @abc.abstractmethod
    def _load_state(self, params: dict, arrays: dict[str, np.ndarray], torch_state: dict | None) -> None:
        """Inverse of ``_state``."""

    # ---- the inverted file (audiohash.ivf) ------------------------------------------------------
    @property
    def nlist(self) -> int:
        """Lists of the inverted file; 0: none (every scan is exhaustive)."""
        return 0 if self.ivf_centroids is None else len(self.ivf_centroids)

    def fit_lists(self, x: np.ndarray, nlist: int) -> "Quantizer":
        """Train ``nlist`` coarse centroids on the code-space vectors of x (n, d), seeded."""
        from audiohash import ivf

        if not self.has_lists:
            raise AudiohashError(f"{self.method}: its codes have no inverted file (binary and 4-bit fast-scan "
                                 f"codes are scanned exhaustively); set train.ivf_lists=0")
        self.ivf_centroids = ivf.train_centroids(self.query_side(x), nlist, self.seed)
        return self

    def encode_with_lists(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Codes uint8 (n, code_size) of x (n, d) and their lists int32 (n,) (None: no lists)."""
        return self.encode(x), None

    # ---- shared plumbing ----------------------------------------------------------------------
    def scan(self, codes: np.ndarray, query_side: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Rank codes (n, code_size) uint8 for each query: D (nq, k) float32, I (nq, k) int64 row numbers.

        Rows past n are padded with I = -1 and D = +inf. Uses faiss's own scan kernels.
        """
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if codes.ndim != 2 or codes.shape[1] != self.code_size:
            raise AudiohashError(
                f"{self.method}: codes have shape {codes.shape}, expected (n, {self.code_size})"
            )
        nq = len(query_side)
        if len(codes) == 0 or k <= 0:
            return np.full((nq, max(k, 0)), np.inf, np.float32), np.full((nq, max(k, 0)), -1, np.int64)
        index = self.filled_scan_index(codes)
        dtype = np.float32 if self.metric == "adc" else np.uint8
        D, I = index.search(np.ascontiguousarray(query_side, dtype=dtype), k)
        D = np.where(I < 0, np.inf, D).astype(np.float32)
        return D, I.astype(np.int64)

    def filled_scan_index(self, codes: np.ndarray) -> faiss.Index | faiss.IndexBinary:
        """``scan_index()`` holding ``codes`` uint8 (n, code_size), ready to search."""
        index = self.scan_index()
        if self.metric == "adc":
            index.add_sa_codes(codes)
        else:
            index.add(codes)
        return index

    def state(self) -> QuantizerState:
        if self.input_mean is None:
            raise AudiohashError(f"{self.method}: cannot save an unfitted quantizer")
        params, arrays, torch_state = self._state()
        params = {"n_bits": self.n_bits, "seed": self.seed, "input_dim": self.input_dim, **params}
        arrays = {"input_mean": self.input_mean, "input_std": self.input_std, **arrays}
        if self.ivf_centroids is not None:
            arrays["ivf_centroids"] = self.ivf_centroids
        return QuantizerState(self.method, params, arrays, torch_state)

    @classmethod
    def from_state(cls, state: QuantizerState) -> "Quantizer":
        params = dict(state.params)
        q = cls.__new__(cls)
        Quantizer.__init__(q, params.pop("n_bits"), params.pop("seed"))
        q.input_dim = int(params.pop("input_dim"))
        q.input_mean = np.asarray(state.arrays["input_mean"], np.float32)
        q.input_std = np.asarray(state.arrays["input_std"], np.float32)
        q.ivf_centroids = (np.asarray(state.arrays["ivf_centroids"], np.float32) if "ivf_centroids" in state.arrays
                           else None)
        arrays = {k: v for k, v in state.arrays.items() if k not in ("input_mean", "input_std", "ivf_centroids")}
        q._load_state(params, arrays, state.torch_state)
        return q


class AdcQuantizer(Quantizer):
    """Product-quantization codes ranked by asymmetric distance.

    Subclasses provide ``transform`` (standardized input -> code space, float32 (n, code_dim)) and
    set ``self.centroids`` (M, 256, code_dim // M) float32.
    """

    metric = "adc"
    has_lists = True
    centroids_per_subspace: ClassVar[int] = CENTROIDS_PER_SUBSPACE  # k-means needs at least this many rows
    centroids: np.ndarray

    @property
    def n_subspaces(self) -> int:
        return self.code_size

    @abc.abstractmethod
    def transform(self, x: np.ndarray) -> np.ndarray:
        """Map raw embeddings (n, d) into the code space (n, code_dim) float32."""

    def _product_quantizer(self) -> faiss.ProductQuantizer:
        M, K, dsub = self.centroids.shape
        pq = faiss.ProductQuantizer(M * dsub, M, 8)
        faiss.copy_array_to_vector(np.ascontiguousarray(self.centroids, np.float32).ravel(), pq.centroids)
        return pq

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self._product_quantizer().compute_codes(np.ascontiguousarray(self.transform(x)))

    def encode_with_lists(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        from audiohash import ivf

        z = np.ascontiguousarray(self.transform(x), np.float32)  # once: for DQN a network forward pass
        codes = self._product_quantizer().compute_codes(z)
        return codes, None if self.ivf_centroids is None else ivf.assign_lists(z, self.ivf_centroids)

    def query_side(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.transform(x), dtype=np.float32)

    def lookup_tables(self, x: np.ndarray) -> np.ndarray:
        """Per-query asymmetric-distance tables: float32 (nq, M, 256) of squared L2 distances."""
        z = self.query_side(x)
        tables = np.empty((len(z), self.n_subspaces * CENTROIDS_PER_SUBSPACE), np.float32)
        self._product_quantizer().compute_distance_tables(len(z), faiss.swig_ptr(z), faiss.swig_ptr(tables))
        return tables.reshape(len(z), self.n_subspaces, CENTROIDS_PER_SUBSPACE)

    def scan_index(self) -> faiss.IndexPQ:
        M, K, dsub = self.centroids.shape
        index = faiss.IndexPQ(M * dsub, M, 8)
        faiss.copy_array_to_vector(np.ascontiguousarray(self.centroids, np.float32).ravel(), index.pq.centroids)
        index.is_trained = True
        return index


def pad_to_multiple(x: np.ndarray, m: int) -> np.ndarray:
    """Append zero columns so that x.shape[1] is a multiple of m (zeros add nothing to L2 distances)."""
    extra = (-x.shape[1]) % m
    if extra == 0:
        return x
    return np.hstack([x, np.zeros((len(x), extra), x.dtype)])
