"""Binary hashing ranked by Hamming distance: ITQ (faiss), spectral hashing and anchor graph hashing.

Each method maps standardized inputs to ``n_bits`` signs; bit b of a code is bit (b % 8) of byte
b // 8, least significant first, which is how faiss's IndexLSH packs its codes (``np.packbits``
with ``bitorder="little"``). IndexBinaryFlat only XORs and popcounts bytes, so any fixed order
ranks the same; this one keeps our ITQ codes byte-identical to faiss's ``ITQ{b},LSH`` codes.
"""
from __future__ import annotations

import abc

import faiss
import numpy as np
import scipy.sparse

from audiohash.errors import AudiohashError
from audiohash.quantizers.base import Quantizer


def _fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip each column so its largest-magnitude entry is positive: eigenvectors become reproducible."""
    pivot = vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])]
    return vectors * np.where(pivot < 0, -1.0, 1.0)


class HammingQuantizer(Quantizer):
    """Base of the binary methods: subclasses implement ``_bits`` on standardized inputs."""

    metric = "hamming"

    @abc.abstractmethod
    def _bits(self, xs: np.ndarray) -> np.ndarray:
        """bool (n, n_bits) for standardized xs (n, d)."""

    def encode(self, x: np.ndarray) -> np.ndarray:
        return np.packbits(self._bits(self._standardize(x)), axis=1, bitorder="little")

    def query_side(self, x: np.ndarray) -> np.ndarray:
        return self.encode(x)

    def scan_index(self) -> faiss.IndexBinaryFlat:
        return faiss.IndexBinaryFlat(self.n_bits)


class ITQ(HammingQuantizer):
    """Iterative quantization (Gong & Lazebnik 2011): PCA to n_bits dims + learned rotation, sign."""

    method = "itq"

    def fit(self, x: np.ndarray, labels: np.ndarray | None = None) -> "ITQ":
        xs = self._fit_standardizer(x)
        if self.n_bits > xs.shape[1]:
            raise AudiohashError(
                f"itq: {self.n_bits} bits need at least {self.n_bits} input dimensions, got {xs.shape[1]}"
            )
        itq = faiss.ITQTransform(xs.shape[1], self.n_bits, True)
        itq.itq.seed = self.seed  # the random initial rotation
        itq.train(xs)
        self.mean = faiss.vector_to_array(itq.mean).astype(np.float32)
        self.projection = faiss.vector_to_array(itq.pca_then_itq.A).reshape(self.n_bits, xs.shape[1])
        return self

    def _bits(self, xs):
        # faiss also L2-normalizes the centered vector first; a positive scale leaves the signs alone.
        return (xs - self.mean) @ self.projection.T > 0

    def _state(self):
        return {}, {"mean": self.mean, "projection": self.projection}, None

    def _load_state(self, params, arrays, torch_state):
        self.mean = np.asarray(arrays["mean"], np.float32)
        self.projection = np.asarray(arrays["projection"], np.float32)


def spectral_modes(ranges: np.ndarray, n_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The n_bits one-dimensional modes with the smallest eigenvalues (k * pi / range_j)^2.

    ranges (p,) are the extents of the PCA directions. Returns (dims, ks), both int64 (n_bits,),
    ordered by eigenvalue; ties keep the (direction, k) order, as the reference code's stable sort.
    Mode k of direction j is cos(k * pi * (u_j - min_j) / range_j) = sin(pi/2 + ...) of the paper.
    """
    max_mode = np.ceil((n_bits + 1) * ranges / ranges.max()).astype(np.int64)
    dims = np.repeat(np.arange(len(ranges)), max_mode)
    ks = np.concatenate([np.arange(1, m + 1) for m in max_mode])
    eigenvalues = (ks * np.pi / ranges[dims]) ** 2
    order = np.argsort(eigenvalues, kind="stable")[:n_bits]
    return dims[order], ks[order]


class SH(HammingQuantizer):
    """Spectral hashing (Weiss, Torralba & Fergus 2008).

    PCA to min(n_bits, d) directions, a uniform distribution assumed on each direction's range,
    and the analytic Laplacian eigenfunctions of the n_bits smallest eigenvalues, thresholded at 0.
    """

    method = "sh"

    def fit(self, x: np.ndarray, labels: np.ndarray | None = None) -> "SH":
        xs = self._fit_standardizer(x).astype(np.float64)
        n_pca = min(self.n_bits, xs.shape[1])
        _, vectors = np.linalg.eigh(np.cov(xs, rowvar=False))
        self.components = _fix_signs(vectors[:, ::-1][:, :n_pca])  # (d, n_pca), largest variance first
        u = xs @ self.components
        eps = np.finfo(np.float64).eps
        self.low = u.min(axis=0) - eps
        ranges = u.max(axis=0) + eps - self.low
        self.dims, ks = spectral_modes(ranges, self.n_bits)
        self.omegas = ks * np.pi / ranges[self.dims]
        return self

    def _bits(self, xs):
        u = xs.astype(np.float64) @ self.components
        return np.cos((u[:, self.dims] - self.low[self.dims]) * self.omegas) > 0

    def _state(self):
        arrays = {"components": self.components, "low": self.low, "dims": self.dims, "omegas": self.omegas}
        return {}, arrays, None

    def _load_state(self, params, arrays, torch_state):
        self.components = np.asarray(arrays["components"], np.float64)
        self.low = np.asarray(arrays["low"], np.float64)
        self.dims = np.asarray(arrays["dims"], np.int64)
        self.omegas = np.asarray(arrays["omegas"], np.float64)


def agh_projection(z: scipy.sparse.spmatrix | np.ndarray, n_bits: int) -> np.ndarray:
    """One-layer AGH projection W (m, n_bits) from the anchor graph Z (n, m), rows summing to 1.

    Eigenvectors V of M = Lambda^-1/2 Z^T Z Lambda^-1/2 (Lambda = diag(Z^T 1)) with the largest
    eigenvalues Sigma below the trivial one, W = sqrt(n) Lambda^-1/2 V Sigma^-1/2, so that Y = Z W
    has zero-mean columns and Y^T Y = n I. The trivial eigenvector Lambda^1/2 1 (eigenvalue 1) is
    deflated explicitly: on a disconnected graph eigenvalue 1 repeats and sorting cannot find it.
    """
    z = scipy.sparse.csr_matrix(z, dtype=np.float64)
    n, m = z.shape
    if n_bits >= m:
        raise AudiohashError(f"agh: {n_bits} bits need more than {n_bits} anchors, got {m}")
    root = np.sqrt(np.maximum(np.asarray(z.sum(axis=0)).ravel(), 1e-12))
    graph = (z.T @ z).toarray() / np.outer(root, root)
    trivial = root / np.linalg.norm(root)
    values, vectors = np.linalg.eigh(graph - np.outer(trivial, trivial))
    values, vectors = values[::-1][:n_bits], _fix_signs(vectors[:, ::-1][:, :n_bits])
    return np.sqrt(n) * vectors / root[:, None] / np.sqrt(np.maximum(values, 1e-12))


class AGH(HammingQuantizer):
    """Anchor graph hashing (Liu, Wang, Kumar & Chang 2011), one layer.

    Anchors by seeded faiss k-means; each point links its ``n_nearest`` anchors with a Gaussian
    kernel whose bandwidth is the mean training distance to the n_nearest-th anchor.
    """

    method = "agh"

    def __init__(self, n_bits: int, seed: int = 0, n_anchors: int = 300, n_nearest: int = 3):
        super().__init__(n_bits, seed)
        self.n_anchors = int(n_anchors)
        self.n_nearest = int(n_nearest)

    def _anchor_graph(self, xs: np.ndarray) -> scipy.sparse.csr_matrix:
        """Z (n, m): kernel weights to each row's n_nearest anchors, rows normalized to sum 1."""
        index = faiss.IndexFlatL2(self.anchors.shape[1])
        index.add(self.anchors)
        sq_dist, nearest = index.search(np.ascontiguousarray(xs, dtype=np.float32), self.n_nearest)
        # Subtract each row's smallest distance before exp (cancels in the normalization) so far
        # out-of-sample points do not underflow to an all-zero row.
        weights = np.exp(-(sq_dist - sq_dist[:, :1]).astype(np.float64) / self.bandwidth**2)
        weights /= weights.sum(axis=1, keepdims=True)
        rows = np.repeat(np.arange(len(xs)), self.n_nearest)
        shape = (len(xs), len(self.anchors))
        return scipy.sparse.csr_matrix((weights.ravel(), (rows, nearest.ravel())), shape=shape)

    def fit(self, x: np.ndarray, labels: np.ndarray | None = None) -> "AGH":
        xs = self._fit_standardizer(x)
        n_anchors = min(self.n_anchors, len(xs))
        if self.n_nearest > n_anchors:
            raise AudiohashError(f"agh: n_nearest={self.n_nearest} exceeds the {n_anchors} anchors")
        kmeans = faiss.Kmeans(xs.shape[1], n_anchors, niter=20, seed=self.seed, min_points_per_centroid=1)
        kmeans.train(xs)
        self.anchors = kmeans.centroids
        index = faiss.IndexFlatL2(xs.shape[1])
        index.add(self.anchors)
        sq_dist, _ = index.search(xs, self.n_nearest)
        self.bandwidth = float(np.sqrt(np.maximum(sq_dist[:, -1], 0)).mean()) or 1.0
        self.projection = agh_projection(self._anchor_graph(xs), self.n_bits)
        return self

    def _bits(self, xs):
        return self._anchor_graph(xs) @ self.projection > 0

    def _state(self):
        params = {"n_anchors": self.n_anchors, "n_nearest": self.n_nearest, "bandwidth": self.bandwidth}
        return params, {"anchors": self.anchors, "projection": self.projection}, None

    def _load_state(self, params, arrays, torch_state):
        self.n_anchors = int(params["n_anchors"])
        self.n_nearest = int(params["n_nearest"])
        self.bandwidth = float(params["bandwidth"])
        self.anchors = np.ascontiguousarray(arrays["anchors"], np.float32)
        self.projection = np.asarray(arrays["projection"], np.float64)
