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
