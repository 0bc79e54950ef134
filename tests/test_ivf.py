"""The inverted file: list assignment equals a brute-force nearest centroid, and the probed scan
equals asymmetric distances summed by hand over the codes of the probed lists (all lists probed:
the exhaustive scan)."""
from __future__ import annotations

import numpy as np
import pytest

from audiohash import ivf
from audiohash.errors import AudiohashError
from audiohash.quantizers import make_quantizer
from audiohash.ranking import ranking_mismatch


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(12, 16)) * 4
    x = (centers[rng.integers(0, 12, 4000)] + rng.normal(size=(4000, 16))).astype(np.float32)
    quantizer = make_quantizer("pq", 32, seed=0).fit(x)
    z = quantizer.query_side(x)
    centroids = ivf.train_centroids(z, 20, seed=0)
    return quantizer, x, z, centroids


def test_default_nlist():
    assert ivf.default_nlist(1_000_000) == 4000
    assert ivf.default_nlist(10_000) == 256  # 4 sqrt(n) = 400 > n / 39
    assert ivf.default_nlist(10) == 1


def test_lists_are_the_nearest_centroids(fitted):
    _, _, z, centroids = fitted
    assert centroids.shape == (20, z.shape[1])
    d2 = ((z[:, None, :] - centroids[None]) ** 2).sum(-1)
    lists = ivf.assign_lists(z, centroids)
    assert lists.dtype == np.int32
    # Equal to the brute-force argmin except where two centroids are (nearly) equally near.
    best = d2[np.arange(len(z)), lists]
    assert np.allclose(best, d2.min(axis=1), rtol=1e-5)
    assert (lists == d2.argmin(axis=1)).mean() > 0.999
    probes = ivf.nearest_lists(z[:50], centroids, 3)
    assert (probes[:, 0] == lists[:50]).all()
    assert (np.diff(np.take_along_axis(d2[:50], probes, 1), axis=1) >= -1e-4).all()
    with pytest.raises(AudiohashError, match="lists need between 1 and"):
        ivf.train_centroids(z[:10], 20, seed=0)


def adc_reference(quantizer, codes, xq, allowed: np.ndarray, k: int):
    """Top-k by distance summed from the lookup tables, over rows ``allowed`` (nq, n) bool."""
    tables = quantizer.lookup_tables(xq)
    dist = tables[:, np.arange(codes.shape[1]), codes].sum(axis=2)
    dist = np.where(allowed, dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, 1), order


@pytest.mark.parametrize("nprobe", [1, 4, 20])
def test_probed_scan_equals_hand_summed_distances_over_the_probed_lists(fitted, nprobe):
    quantizer, x, z, centroids = fitted
    codes = quantizer.encode(x)
    lists = ivf.assign_lists(z, centroids)
    xq = x[:40] + np.random.default_rng(1).normal(size=(40, x.shape[1])).astype(np.float32) * 0.5
    zq = quantizer.query_side(xq)
    probes = ivf.nearest_lists(zq, centroids, nprobe)
    k = 30
    D, I = ivf.scan_lists(ivf.ivf_index(centroids, quantizer.centroids), codes, lists, zq, probes, k)
    allowed = (lists[None, :, None] == probes[:, None, :]).any(axis=2)
    D_ref, I_ref = adc_reference(quantizer, codes, xq, allowed, k)
    assert ranking_mismatch(D, I, D_ref, I_ref, complete=True) is None
    assert allowed[np.arange(len(xq))[:, None], I].all(), "a code of an unprobed list was ranked"
    if nprobe == len(centroids):  # every list probed: the exhaustive scan
        D_all, I_all = quantizer.scan(codes, zq, k)
        assert ranking_mismatch(D, I, D_all, I_all, complete=True) is None


def test_probed_lists_with_fewer_codes_than_k_are_padded(fitted):
    quantizer, x, z, centroids = fitted
    lists = ivf.assign_lists(z[:30], centroids)
    probes = ivf.nearest_lists(z[:2], centroids, 1)
    D, I = ivf.scan_lists(ivf.ivf_index(centroids, quantizer.centroids), quantizer.encode(x[:30]), lists,
                          z[:2], probes, 40)
    for row in range(2):
        members = np.flatnonzero(lists == probes[row, 0])
        assert sorted(I[row][I[row] >= 0]) == sorted(members)
        assert np.isinf(D[row][I[row] < 0]).all()
