"""Optimized product quantization (Ge et al. 2013, faiss OPQMatrix): a learned rotation, then PQ."""
from __future__ import annotations

import faiss
import numpy as np

from audiohash.errors import AudiohashError
from audiohash.quantizers.base import AdcQuantizer


class OPQ(AdcQuantizer):
    """faiss OPQMatrix (d -> d_out, the next multiple of M) followed by PQ with 256 centroids per subspace.

    Trained like faiss's ``index_factory(d, "OPQ{M}_{d_out},PQ{M}")`` with both k-means seeded by
    ``seed``, so the two rank identically. The query side is the rotated standardized query.
    """

    method = "opq"

    def fit(self, x: np.ndarray, labels: np.ndarray | None = None) -> "OPQ":
        xs = self._fit_standardizer(x)
        d, M = xs.shape[1], self.n_subspaces
        d_out = -(-d // M) * M  # OPQMatrix pads inputs with zeros when d_out > d
        if len(xs) < d:  # faiss 1.15's OPQMatrix.train aborts the process (free(): invalid size) there
            raise AudiohashError(f"opq: {len(xs)} training rows for {d}-d embeddings; its rotation needs at "
                                 f"least as many rows as dimensions: train on more clips or use pq")
        opq = faiss.OPQMatrix(d, M, d_out)
        inner_pq = faiss.ProductQuantizer(d_out, M, 8)  # the PQ re-trained inside each OPQ iteration
        inner_pq.cp.seed = self.seed
        inner_pq.cp.min_points_per_centroid = 1  # only silences faiss's small-sample warning
        opq.pq = inner_pq
        opq.train(xs)
        self.rotation = faiss.vector_to_array(opq.A).reshape(d_out, d)
        z = self.transform_standardized(xs)
        pq = faiss.ProductQuantizer(d_out, M, 8)
        pq.cp.seed = self.seed
        pq.cp.min_points_per_centroid = 1
        pq.train(z)
        self.centroids = faiss.vector_to_array(pq.centroids).reshape(M, 256, d_out // M)
        return self

    def transform_standardized(self, xs: np.ndarray) -> np.ndarray:
        """Rotate standardized rows (n, d) into the code space (n, d_out) float32."""
        return np.ascontiguousarray(xs @ self.rotation.T, dtype=np.float32)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return self.transform_standardized(self._standardize(x))

    def _state(self):
        return {}, {"rotation": self.rotation, "centroids": self.centroids}, None

    def _load_state(self, params, arrays, torch_state):
        self.rotation = np.asarray(arrays["rotation"], np.float32)
        self.centroids = np.asarray(arrays["centroids"], np.float32)
