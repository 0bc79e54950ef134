"""Unsupervised product quantization (faiss ProductQuantizer), K = 256 per subspace, bits = 8 * M."""
from __future__ import annotations

import faiss
import numpy as np

from audiohash.quantizers.base import AdcQuantizer, pad_to_multiple


class PQ(AdcQuantizer):
    """faiss PQ over standardized embeddings, zero-padded to a multiple of M dimensions."""

    method = "pq"

    def fit(self, x: np.ndarray, labels: np.ndarray | None = None) -> "PQ":
        z = self.transform_standardized(self._fit_standardizer(x))
        pq = faiss.ProductQuantizer(z.shape[1], self.n_subspaces, 8)
        pq.cp.seed = self.seed
        pq.cp.min_points_per_centroid = 1  # only silences faiss's small-sample warning (8 lines, one a subspace)
        pq.train(z)
        self.centroids = faiss.vector_to_array(pq.centroids).reshape(
            self.n_subspaces, 256, z.shape[1] // self.n_subspaces
        )
        return self

    def transform_standardized(self, xs: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(pad_to_multiple(xs, self.n_subspaces), dtype=np.float32)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return self.transform_standardized(self._standardize(x))

    def _state(self):
        return {}, {"centroids": self.centroids}, None

    def _load_state(self, params, arrays, torch_state):
        self.centroids = np.asarray(arrays["centroids"], np.float32)


class PQFastScan(PQ):
    """4-bit PQ scanned by faiss's SIMD fast-scan kernels (IndexPQFastScan): bits / 4 subspaces of
    16 centroids, two sub-codes per byte, so 64 bits = 16 subspaces in the same 8 bytes as 8-bit
    PQ's 8 subspaces. Trades some accuracy for many times the scan throughput on large tables.
    """

    method = "pq_fastscan"
    centroids_per_subspace = 16
    has_lists = False  # 4-bit codes: scanned exhaustively (an IVF fast-scan index is future work)

    @property
    def n_subspaces(self) -> int:
        return self.n_bits // 4

    def fit(self, x: np.ndarray, labels: np.ndarray | None = None) -> "PQFastScan":
        z = self.transform_standardized(self._fit_standardizer(x))
        pq = faiss.ProductQuantizer(z.shape[1], self.n_subspaces, 4)
        pq.cp.seed = self.seed
        pq.train(z)
        self.centroids = faiss.vector_to_array(pq.centroids).reshape(self.n_subspaces, 16, -1)
        return self

    def _product_quantizer(self) -> faiss.ProductQuantizer:
        M, K, dsub = self.centroids.shape
        pq = faiss.ProductQuantizer(M * dsub, M, 4)
        faiss.copy_array_to_vector(np.ascontiguousarray(self.centroids, np.float32).ravel(), pq.centroids)
        return pq

    def lookup_tables(self, x: np.ndarray) -> np.ndarray:
        """Per-query tables: float32 (nq, M, 16) of squared L2 distances (before fast-scan's 8-bit rounding)."""
        z = self.query_side(x)
        tables = np.empty((len(z), self.n_subspaces * 16), np.float32)
        self._product_quantizer().compute_distance_tables(len(z), faiss.swig_ptr(z), faiss.swig_ptr(tables))
        return tables.reshape(len(z), self.n_subspaces, 16)

    def scan_index(self) -> faiss.IndexPQFastScan:
        M, K, dsub = self.centroids.shape
        index = faiss.IndexPQFastScan(M * dsub, M, 4)
        faiss.copy_array_to_vector(np.ascontiguousarray(self.centroids, np.float32).ravel(), index.pq.centroids)
        index.is_trained = True
        return index

    def filled_scan_index(self, codes: np.ndarray) -> faiss.IndexPQFastScan:
        # Fast-scan indexes keep codes in a SIMD block layout and take no raw codes; re-adding the
        # decoded vectors (each sub-vector is exactly a centroid) reproduces the same codes.
        index = self.scan_index()
        if len(codes):
            index.add(self._product_quantizer().decode(np.ascontiguousarray(codes)))
        return index
