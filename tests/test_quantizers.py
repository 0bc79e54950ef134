"""Quantizers and retrieval metrics: round trips, agreement with faiss, hand-worked cases."""
from __future__ import annotations

import json
import math

import faiss
import numpy as np
import pytest
import torch

from audiohash.errors import AudiohashError
from audiohash.metrics import (
    average_precision_at_r,
    mean_average_precision,
    precision_at_r,
    recall_at_r,
)
from audiohash.quantizers import METHODS, QuantizerState, load_quantizer, make_quantizer
from audiohash.quantizers.binary import agh_projection, spectral_modes
from audiohash.quantizers.dqn import (
    confident_pseudo_labels, information_maximization_loss, pairwise_cosine_loss, propagated_label_scores,
    quantization_loss,
)
from audiohash.quantizers.semi import confident_agreement_loss, instance_contrastive_loss, noisy_view, proxy_logits

# Few optimizer steps: these tests check the plumbing, test_supervised_beats_pq the learning.
FAST_DQN = {"steps": 60, "warmup_steps": 20, "refit_every": 20}
HYPER = {"dqn": FAST_DQN, "dqn_cls": FAST_DQN, "dqn_semi": FAST_DQN}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((600, 32)) * rng.uniform(0.5, 3.0, 32) + 4.0).astype(np.float32)
    labels = np.where(rng.random(600) < 0.3, rng.integers(0, 5, 600), -1)
    return x, labels, x[:25] + 0.1


def fit(method, bits, x, labels, seed=0):
    return make_quantizer(method, bits, seed=seed, **HYPER.get(method, {})).fit(x, labels)


def through_files(state: QuantizerState, tmp_path) -> QuantizerState:
    """What a bundle does: params as JSON, arrays as npz, the state dict by torch.save."""
    (tmp_path / "params.json").write_text(json.dumps({"method": state.method, "params": state.params}))
    np.savez(tmp_path / "arrays.npz", **state.arrays)
    torch_state = None
    if state.torch_state is not None:
        torch.save(state.torch_state, tmp_path / "net.pt")
        torch_state = torch.load(tmp_path / "net.pt", weights_only=True)
    meta = json.loads((tmp_path / "params.json").read_text())
    with np.load(tmp_path / "arrays.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return QuantizerState(meta["method"], meta["params"], arrays, torch_state)


# ---- every method ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [16, 24])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_round_trip(method, bits, data, tmp_path):
    x, labels, xq = data
    q = fit(method, bits, x, labels)
    codes = q.encode(x)
    assert codes.dtype == np.uint8 and codes.shape == (len(x), bits // 8) == (len(x), q.code_size)
    D, I = q.scan(codes, q.query_side(xq), 10)
    assert D.shape == I.shape == (len(xq), 10) and I.dtype == np.int64 and (I >= 0).all()
    assert (np.diff(D, axis=1) >= 0).all()
    for state in (q.state(), through_files(q.state(), tmp_path)):
        again = load_quantizer(state)
        assert type(again) is type(q)
        np.testing.assert_array_equal(again.encode(x), codes)
        D2, I2 = again.scan(again.encode(x), again.query_side(xq), 10)
        np.testing.assert_array_equal(I2, I)
        np.testing.assert_array_equal(D2, D)


def test_unknown_hyper_parameter_is_named():
    with pytest.raises(AudiohashError, match=r"train.hyper.dqn: unknown hyper-parameter\(s\) \['step'\]; dqn takes .*'steps'"):
        make_quantizer("dqn", 16, step=5)
    with pytest.raises(AudiohashError, match=r"train.hyper.pq: .*\['steps'\]; pq takes none"):
        make_quantizer("pq", 16, steps=5)


def test_scan_pads_past_the_database(data):
    x, labels, xq = data
    q = fit("pq", 16, x, labels)
    D, I = q.scan(q.encode(x[:5]), q.query_side(xq), 8)
    assert (I[:, 5:] == -1).all() and np.isinf(D[:, 5:]).all() and (I[:, :5] >= 0).all()


# ---- agreement with faiss and with brute force ---------------------------------------------------
def test_pq_equals_faiss_index_pq(data):
    x, _, xq = data
    q = make_quantizer("pq", 16, seed=1234).fit(x)  # 1234 is faiss's default k-means seed
    index = faiss.IndexPQ(32, 2, 8)
    index.train(q._standardize(x))
    index.add(q._standardize(x))
    D, I = index.search(q._standardize(xq), 10)
    D2, I2 = q.scan(q.encode(x), q.query_side(xq), 10)
    np.testing.assert_array_equal(I2, I)
    np.testing.assert_allclose(D2, D, rtol=1e-5)


def test_opq_equals_faiss_factory(data):
    x, _, xq = data
    q = make_quantizer("opq", 24, seed=1234).fit(x)  # M = 3: OPQ maps 32 -> 33 dimensions
    index = faiss.index_factory(32, "OPQ3_33,PQ3")
    index.train(q._standardize(x))
    index.add(q._standardize(x))
    D, I = index.search(q._standardize(xq), 10)
    D2, I2 = q.scan(q.encode(x), q.query_side(xq), 10)
    np.testing.assert_array_equal(I2, I)
    np.testing.assert_allclose(D2, D, rtol=1e-4)


def test_itq_equals_faiss_itq_lsh(data):
    x, _, xq = data
    q = make_quantizer("itq", 16, seed=7).fit(x)
    index = faiss.index_factory(32, "ITQ16,LSH")
    faiss.downcast_VectorTransform(index.chain.at(0)).itq.seed = 7
    index.train(q._standardize(x))
    faiss_codes = index.sa_encode(q._standardize(x))
    np.testing.assert_array_equal(q.encode(x), faiss_codes)
    binary = faiss.IndexBinaryFlat(16)
    binary.add(faiss_codes)
    D, I = binary.search(index.sa_encode(q._standardize(xq)), 10)
    D2, I2 = q.scan(q.encode(x), q.query_side(xq), 10)
    np.testing.assert_array_equal(I2, I)
    np.testing.assert_array_equal(D2, D)


@pytest.mark.parametrize("method", ["pq", "opq", "dqn"])
def test_adc_scan_equals_lookup_table_sums(method, data):
    x, labels, xq = data
    q = fit(method, 24, x, labels)
    codes = q.encode(x)
    tables = q.lookup_tables(xq)  # (nq, M, 256)
    brute = sum(tables[:, m, codes[:, m]] for m in range(q.code_size))  # (nq, n)
    D, I = q.scan(codes, q.query_side(xq), 10)
    np.testing.assert_allclose(D, np.take_along_axis(brute, I, axis=1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(D, np.sort(brute, axis=1)[:, :10], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["itq", "sh", "agh"])
def test_hamming_scan_equals_popcount(method, data):
    x, labels, xq = data
    q = fit(method, 16, x, labels)
    codes, query = q.encode(x), q.query_side(xq)
    brute = np.unpackbits(query[:, None, :] ^ codes[None, :, :], axis=2).sum(axis=2)
    D, I = q.scan(codes, query, 10)
    np.testing.assert_array_equal(D, np.take_along_axis(brute, I, axis=1))
    np.testing.assert_array_equal(D, np.sort(brute, axis=1)[:, :10])


# ---- spectral hashing ----------------------------------------------------------------------------
def test_spectral_modes_small_case():
    # Eigenvalues (k pi / range)^2 with ranges (2.5, 1), in units of pi^2: direction 0 gives
    # 0.16, 0.64, 1.44, 2.56, ...; direction 1 gives 1, 4. The four smallest: (0,1) (0,2) (1,1) (0,3).
    dims, ks = spectral_modes(np.array([2.5, 1.0]), 4)
    assert dims.tolist() == [0, 0, 1, 0] and ks.tolist() == [1, 2, 1, 3]


def test_sh_on_a_line():
    # Points along t in [0, 1] on the diagonal, +-0.01 across it; both columns have the same
    # mean and spread, so standardizing keeps the diagonal as the only wide PCA direction and
    # all 8 modes lie along it: bit k of position t is cos(k pi t) > 0.
    t = np.linspace(0.0, 1.0, 501)
    x = np.concatenate([np.c_[t + 0.01, t - 0.01], np.c_[t - 0.01, t + 0.01]]).astype(np.float32)
    q = make_quantizer("sh", 8).fit(x)
    np.testing.assert_array_equal(q.dims, 0)
    # t = 0.2: cos(k * 36 deg) > 0 for k = 1, 2, 8 -> bits 1,1,0,0,0,0,0,1 -> 1 + 2 + 128.
    # t = 0.45: cos(k * 81 deg) > 0 for k = 1, 4, 5, 8 -> 1 + 8 + 16 + 128.
    codes = q.encode(np.array([[0.2, 0.2], [0.45, 0.45]], np.float32))
    assert codes[:, 0].tolist() == [131, 153]


# ---- anchor graph hashing -------------------------------------------------------------------------
def test_agh_projection_hand_worked():
    # Two anchors, two points on each: Lambda = diag(2, 2), M = I; with the trivial (1, 1)/sqrt 2
    # removed, V = (1, -1)/sqrt 2 with sigma = 1, so W = sqrt(4) * V / sqrt(2) = (1, -1).
    z = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], float)
    np.testing.assert_allclose(agh_projection(z, 1), [[1.0], [-1.0]])


def test_agh_projection_is_balanced_and_orthogonal():
    rng = np.random.default_rng(1)
    z = np.zeros((200, 12))
    for row in z:
        row[rng.choice(12, 3, replace=False)] = rng.random(3)
    z /= z.sum(axis=1, keepdims=True)
    y = z @ agh_projection(z, 5)
    np.testing.assert_allclose(y.sum(axis=0), 0, atol=1e-8)
    np.testing.assert_allclose(y.T @ y, 200 * np.eye(5), atol=1e-8)


def test_agh_first_bit_splits_two_clusters():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(-5, 1, (200, 4)), rng.normal(5, 1, (200, 4))]).astype(np.float32)
    first = make_quantizer("agh", 8, n_anchors=20).fit(x).encode(x)[:, 0] & 1
    assert len(set(first[:200])) == 1 and len(set(first[200:])) == 1 and first[0] != first[-1]


# ---- DQN losses, determinism and learning ----------------------------------------------------------
def test_pairwise_cosine_loss_hand_worked():
    # cos(z1, z2) = 0, cos(z1, z3) = cos(z2, z3) = 1/sqrt 2; z1, z2 share a label.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    c = 1 / math.sqrt(2)
    # s = -1: ((1 - 0)^2 + 2 (-1 - c)^2) / 3 = (4 + 2 sqrt 2) / 3
    assert pairwise_cosine_loss(z, labels, -1.0).item() == pytest.approx((4 + 2 * math.sqrt(2)) / 3, rel=1e-6)
    # s = 0: (1 + 2 c^2) / 3 = 2 / 3
    assert pairwise_cosine_loss(z, labels, 0.0).item() == pytest.approx((1 + 2 * c * c) / 3, rel=1e-6)


def test_quantization_loss():
    z = torch.tensor([[0.5, -0.25], [0.1, 0.2]])
    assert quantization_loss(z, z.clone()).item() == 0.0
    assert quantization_loss(z, torch.zeros_like(z)).item() == pytest.approx((0.3125 + 0.05) / 2)


@pytest.mark.parametrize("method", ["dqn", "dqn_cls", "dqn_semi"])
def test_dqn_is_deterministic(method, data):
    x, labels, _ = data
    codes = [fit(method, 16, x, labels, seed=3).encode(x) for _ in range(2)]
    np.testing.assert_array_equal(codes[0], codes[1])
    assert not np.array_equal(codes[0], fit(method, 16, x, labels, seed=4).encode(x))


def test_confident_pseudo_labels_hand_worked():
    # Rows 0 and 1 are labeled 0 and 1; rows 2-6 are not. Predicted: row 2 -> 0 (0.9), row 3 -> 0 (0.6),
    # row 4 -> 0 (0.8), row 5 -> 1 (0.7), row 6 -> 1 (0.55).
    probs = np.array([[0.5, 0.5], [0.5, 0.5], [0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    targets = np.array([0, 1, -1, -1, -1, -1, -1])
    # Two per label: class 0 takes its two surest (rows 2, 4), class 1 both of its rows.
    np.testing.assert_array_equal(confident_pseudo_labels(probs, targets, 2.0), [0, 1, 0, -1, 0, 1, 1])
    np.testing.assert_array_equal(confident_pseudo_labels(probs, targets, 1.0), [0, 1, 0, -1, -1, 1, -1])
    np.testing.assert_array_equal(confident_pseudo_labels(probs, targets, 0.0), targets)
    # The given labels stay whatever the head predicts for them.
    np.testing.assert_array_equal(confident_pseudo_labels(probs[::-1], targets, 9.0)[:2], [0, 1])


def test_self_training_changes_the_successor_only_through_unlabeled_rows(data):
    x, labels, _ = data
    plain = make_quantizer("dqn_cls", 16, pseudo_rounds=0, **FAST_DQN).fit(x, labels)
    self_trained = make_quantizer("dqn_cls", 16, **FAST_DQN).fit(x, labels)
    assert self_trained.pseudo_rounds == 2
    assert not np.array_equal(plain.encode(x), self_trained.encode(x))
    # With every row labeled there is nothing to pseudo-label: no round runs.
    full = np.random.default_rng(0).integers(0, 5, len(x))
    np.testing.assert_array_equal(make_quantizer("dqn_cls", 16, pseudo_rounds=0, **FAST_DQN).fit(x, full).encode(x),
                                  make_quantizer("dqn_cls", 16, **FAST_DQN).fit(x, full).encode(x))
    with pytest.raises(AudiohashError, match="pseudo_rounds"):
        make_quantizer("dqn_cls", 16, pseudo_rounds=-1)


def test_proxy_logits_hand_worked():
    # z1 is along proxy 0; z2 at 45 degrees between the proxies; norms do not matter.
    z = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    proxies = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    c = 1 / math.sqrt(2)
    np.testing.assert_allclose(proxy_logits(z, proxies, 10.0).numpy(), [[10.0, 0.0], [10 * c, 10 * c]], rtol=1e-6)


def test_confident_agreement_loss_hand_worked():
    # Clean view: row 0 is sure of proxy 1 (p = e^4 / (1 + e^4) = 0.982), row 1 is not (0.5 each).
    clean = torch.tensor([[0.0, 4.0], [1.0, 1.0]])
    noisy = torch.tensor([[2.0, 0.0], [0.0, 3.0]], requires_grad=True)
    loss = confident_agreement_loss(clean, noisy, 0.95)
    # Only row 0 counts, against proxy 1: -log softmax([2, 0])[1] = log(1 + e^2); divided by both rows.
    assert loss.item() == pytest.approx(math.log(1 + math.e ** 2) / 2, rel=1e-6)
    loss.backward()
    assert noisy.grad[1].abs().sum() == 0  # the unsure row gives no gradient
    assert confident_agreement_loss(clean, noisy, 0.99).item() == 0.0  # nobody that sure
    clean_grad = clean.clone().requires_grad_(True)
    confident_agreement_loss(clean_grad, noisy, 0.5).backward()
    assert clean_grad.grad is None  # the clean view is a fixed target


def test_instance_contrastive_loss_hand_worked():
    """Two orthonormal rows, views equal, temperature 1: each row's logits are (1, 0), so each
    direction's cross-entropy is log(1 + e^-1); a swapped second view scores log(1 + e)."""
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # the norm does not matter: cosines
    assert instance_contrastive_loss(z, z, 1.0).item() == pytest.approx(np.log1p(np.exp(-1.0)), rel=1e-6)
    assert instance_contrastive_loss(z, z.flip(0), 1.0).item() == pytest.approx(np.log1p(np.exp(1.0)), rel=1e-6)
    # A lower temperature sharpens: matched views cost less.
    assert instance_contrastive_loss(z, z, 0.1).item() == pytest.approx(np.log1p(np.exp(-10.0)), abs=1e-7)


def test_noisy_view():
    x = torch.ones(2000, 8)
    g = torch.Generator().manual_seed(0)
    np.testing.assert_array_equal(noisy_view(x, 0.0, 0.0, g).numpy(), x.numpy())
    masked = noisy_view(x, 0.0, 0.25, g)
    assert set(masked.unique().tolist()) == {0.0, 1.0} and abs(float((masked == 0).float().mean()) - 0.25) < 0.02
    noisy = noisy_view(x, 0.5, 0.0, g)
    assert abs(float((noisy - x).std()) - 0.5) < 0.02
    again = noisy_view(x, 0.5, 0.25, torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(again.numpy(), noisy_view(x, 0.5, 0.25, torch.Generator().manual_seed(1)).numpy())


def test_semi_supervised_training_uses_the_unlabeled_rows(data):
    """dqn_semi learns from every row: other unlabeled rows, other network (dqn ignores them)."""
    x, labels, _ = data
    more = np.vstack([x, x[labels < 0][:200] * 1.5])
    more_labels = np.concatenate([labels, np.full(200, -1)])
    semi = [fit("dqn_semi", 16, a, b).encode(x) for a, b in ((x, labels), (more, more_labels))]
    assert not np.array_equal(semi[0], semi[1])


def test_information_maximization_loss_hand_worked():
    """Mean row entropy minus the entropy of the mean row: -log 2 for two sure rows of two classes,
    0 for two sure rows of one class (nothing spread) and for two undecided rows (nothing sure)."""
    sure = 50.0
    assert information_maximization_loss(torch.tensor([[sure, 0.0], [0.0, sure]])).item() == pytest.approx(-math.log(2), abs=1e-5)
    assert information_maximization_loss(torch.tensor([[sure, 0.0], [sure, 0.0]])).item() == pytest.approx(0.0, abs=1e-5)
    assert information_maximization_loss(torch.zeros(2, 2)).item() == pytest.approx(0.0, abs=1e-6)
    # One sure row, one undecided: (0 + log 2) / 2 - H((0.75, 0.25)).
    expected = math.log(2) / 2 + (0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert information_maximization_loss(torch.tensor([[sure, 0.0], [0.0, 0.0]])).item() == pytest.approx(expected, abs=1e-5)


def test_label_propagation_hand_worked():
    """Two orthogonal groups of three rows, one labeled row in each: the labels spread inside each
    group and not across (cosine 0 weighs 0); a row opposite to everyone is reached by nobody and
    scores uniform."""
    z = np.array([[1, 0], [1, 0.01], [1, -0.01], [0, 1], [0.01, 1], [-0.01, 1], [-1, -1]], np.float32)
    targets = np.array([0, -1, -1, 1, -1, -1, -1])
    scores = propagated_label_scores(z, targets, 2, k=2)
    np.testing.assert_allclose(scores[:6], [[1, 0]] * 3 + [[0, 1]] * 3, atol=1e-6)
    np.testing.assert_allclose(scores[6], [0.5, 0.5])
    # The labeled rows' classes come out as given, and the rows sum to one.
    np.testing.assert_allclose(scores.sum(1), 1.0)


def test_label_propagation_on_a_large_graph_uses_hnsw_with_the_same_result(monkeypatch):
    """Above EXACT_KNN_ROWS the k-NN graph comes from faiss HNSW; on well separated groups it finds
    (nearly) the same neighbours: the same class for every row, scores within a few hundredths."""
    import audiohash.quantizers.dqn as dqn

    z, labels = clusters(5, 400, n_classes=4, d=16, sep=3.0)
    targets = np.where(np.arange(400) % 10 == 0, labels, -1)
    exact = propagated_label_scores(z, targets, 4, k=5)
    monkeypatch.setattr(dqn, "EXACT_KNN_ROWS", 10)
    approximate = propagated_label_scores(z, targets, 4, k=5)
    np.testing.assert_array_equal(approximate.argmax(1), exact.argmax(1))
    np.testing.assert_allclose(approximate, exact, atol=0.05)
    assert (exact.argmax(1) == labels).mean() > 0.95  # and the propagation is right on such groups


UNLABELED_TERMS = [("dqn_cls", "entropy_weight", 0.5), ("dqn_cls", "propagate_k", 5), ("dqn_cls", "head_share", 1.0),
                   ("dqn_semi", "contrastive_weight", 0.5), ("dqn_semi", "reconstruction_weight", 0.5)]


@pytest.mark.parametrize("method,name,value", UNLABELED_TERMS)
def test_each_optional_unlabeled_term_changes_training_deterministically(method, name, value, data):
    """Each optional term on the unlabeled rows changes the codes, gives the same codes under the same
    seed, and its value comes back with the bundle (with the codes)."""
    x, labels, _ = data
    base = {**FAST_DQN, "pseudo_rounds": 1}
    with_term = [make_quantizer(method, 16, seed=2, **base, **{name: value}).fit(x, labels) for _ in range(2)]
    np.testing.assert_array_equal(with_term[0].encode(x), with_term[1].encode(x))
    plain = make_quantizer(method, 16, seed=2, **base).fit(x, labels)
    assert not np.array_equal(with_term[0].encode(x), plain.encode(x))
    again = load_quantizer(with_term[0].state())
    assert getattr(again, name) == value
    np.testing.assert_array_equal(again.encode(x), with_term[0].encode(x))
    with pytest.raises(AudiohashError, match=name):
        make_quantizer(method, 16, **{name: -1})


def test_a_bundle_from_before_the_unlabeled_terms_loads_with_them_off(data):
    """Bundles saved before entropy_weight / contrastive_weight existed were trained without them."""
    x, labels, _ = data
    for method, added in (("dqn_cls", ("entropy_weight", "propagate_k", "head_share")),
                          ("dqn_semi", ("contrastive_weight", "temperature", "reconstruction_weight"))):
        state = make_quantizer(method, 16, **FAST_DQN).fit(x, labels).state()
        old = {k: v for k, v in state.params.items() if k not in added}
        q = load_quantizer(QuantizerState(state.method, old, state.arrays, state.torch_state))
        assert all(getattr(q, name) == (0.1 if name == "temperature" else 0) for name in added)


def test_a_bundle_from_before_self_training_is_refused_by_name(data):
    x, labels, _ = data
    state = make_quantizer("dqn_cls", 16, **FAST_DQN).fit(x, labels).state()
    old = {k: v for k, v in state.params.items() if not k.startswith("pseudo_")}
    with pytest.raises(AudiohashError, match=r"lacks the hyper-parameters \['pseudo_rounds', 'pseudo_per_label'\]"):
        load_quantizer(QuantizerState(state.method, old, state.arrays, state.torch_state))


def test_dqn_needs_labels(data):
    x, _, _ = data
    with pytest.raises(AudiohashError, match="labels"):
        make_quantizer("dqn", 16).fit(x)
    with pytest.raises(AudiohashError, match="two classes or more"):
        make_quantizer("dqn", 16).fit(x, np.full(len(x), -1))


def clusters(seed, n, n_classes=20, d=128, sep=0.35):
    """n points of n_classes Gaussian classes in d dims, anisotropic noise (scales fixed per seed)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_classes, d)) * sep
    scales = rng.uniform(0.5, 2.0, d)
    y = rng.integers(0, n_classes, n)
    return (centers[y] + rng.standard_normal((n, d)) * scales).astype(np.float32), y


def test_supervised_beats_pq():
    x, y = clusters(0, 2500)
    rng = np.random.default_rng(1)
    labels = np.where(rng.random(len(x)) < 0.1, y, -1)
    xq, yq = x[:200], y[:200]
    scores = {}
    for method in ("pq", "dqn", "dqn_cls", "dqn_semi"):
        hyper = {} if method == "pq" else {"steps": 300, "warmup_steps": 100}
        q = make_quantizer(method, 32, **hyper)
        q.fit(x, labels)
        _, ranked = q.scan(q.encode(x), q.query_side(xq), 250)
        scores[method] = mean_average_precision(yq, y, ranked)
    assert scores["dqn"] > scores["pq"] + 0.15, scores
    assert scores["dqn_cls"] > scores["pq"] + 0.15, scores
    assert scores["dqn_semi"] > scores["pq"] + 0.15, scores


# ---- metrics -----------------------------------------------------------------------------------------
def test_metrics_hand_worked():
    db = np.array([1, 0, 1, 1, 0])
    ranked = np.array([[0, 1, 2, 3, 4], [4, 1, -1, -1, -1]])
    queries = np.array([1, 1])
    # Query 0: hits at ranks 1, 3, 4 -> AP = (1/1 + 2/3 + 3/4) / 3; query 1: no hit -> 0.
    ap = average_precision_at_r(np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0]], bool))
    np.testing.assert_allclose(ap, [(1 + 2 / 3 + 3 / 4) / 3, 0.0])
    assert mean_average_precision(queries, db, ranked) == pytest.approx((1 + 2 / 3 + 3 / 4) / 6)
    # AP@2 of query 0 counts only the hit at rank 1.
    assert mean_average_precision(queries[:1], db, ranked[:1, :2]) == pytest.approx(1.0)
    assert precision_at_r(queries, db, ranked) == pytest.approx(3 / 10)
    # Reference top-3 {2, 5, 0}: we found 2 and 0; the second row finds 1 of {1, 7}.
    assert recall_at_r(np.array([[0, 1, 2], [1, 4, -1]]), np.array([[2, 5, 0], [7, 1, -1]])) == pytest.approx(
        (2 / 3 + 1 / 2) / 2
    )


def test_metrics_match_brute_force_and_leave_inputs_alone():
    rng = np.random.default_rng(3)
    db = rng.integers(0, 4, 300)
    queries = rng.integers(0, 4, 40)
    ranked = np.array([rng.permutation(300)[:50] for _ in range(40)])
    ranked[:5, 45:] = -1
    reference = np.array([rng.permutation(300)[:50] for _ in range(40)])
    copies = [a.copy() for a in (db, queries, ranked, reference)]

    aps, precisions, recalls = [], [], []
    for q in range(40):
        hits, total = 0, 0.0
        for k, i in enumerate(ranked[q], start=1):
            if i >= 0 and db[i] == queries[q]:
                hits += 1
                total += hits / k
        aps.append(total / hits if hits else 0.0)
        precisions.append(hits / 50)
        recalls.append(len(set(ranked[q]) & set(reference[q])) / 50)
    assert mean_average_precision(queries, db, ranked) == pytest.approx(np.mean(aps))
    assert precision_at_r(queries, db, ranked) == pytest.approx(np.mean(precisions))
    assert recall_at_r(ranked, reference) == pytest.approx(np.mean(recalls))
    for before, after in zip(copies, (db, queries, ranked, reference)):
        np.testing.assert_array_equal(before, after)


def test_too_few_training_rows_for_the_codebooks_is_refused_by_name():
    from audiohash.training import train_bundle

    x = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    labels = np.array(["a", "b"] * 100, dtype=object)
    with pytest.raises(AudiohashError, match=r"pq: 200 training rows, but its codebooks have 256 centroids"):
        train_bundle("pq", 32, x, labels, 0.1, 0, {}, "m", {})
    bundle, _ = train_bundle("pq_fastscan", 32, x, labels, 0.1, 0, {}, "m", {})  # 16 centroids: enough
    assert bundle.quantizer.centroids.shape[1] == 16


def test_opq_with_fewer_rows_than_dimensions_is_refused_not_aborted():
    x = np.random.default_rng(0).standard_normal((300, 320)).astype(np.float32)
    with pytest.raises(AudiohashError, match=r"opq: 300 training rows for 320-d embeddings"):
        make_quantizer("opq", 32, seed=0).fit(x)


def test_sample_labeled_leaves_unlabeled_rows_out_and_keeps_the_labeled_draw():
    from audiohash.training import sample_labeled

    labels = np.array(["b", "a", "b", "a", "c", "c", "b", "a"] * 5, dtype=object)
    ids, classes = sample_labeled(labels, 0.2, 3)
    hidden = labels.copy()
    hidden[hidden == "c"] = None  # class c: nobody labeled it
    ids_hidden, classes_hidden = sample_labeled(hidden, 0.2, 3)
    assert classes == ["a", "b", "c"] and classes_hidden == ["a", "b"]
    assert (ids_hidden[labels == "c"] == -1).all()
    # a and b draw the same rows as before (the seeded draw goes class by class, in order)
    keep = labels != "c"
    np.testing.assert_array_equal(ids_hidden[keep], ids[keep])
    assert [int((ids_hidden == k).sum()) for k in (0, 1)] == [3, 3]  # round(0.2 * 15) per class


def test_hide_labels_and_the_unseen_class_draw():
    from audiohash.training import draw_unseen_classes, hide_labels

    labels = np.array(["a", "b", None, "c", "d", "a"], dtype=object)
    hidden = hide_labels(labels, ["a", "d"])
    assert hidden.tolist() == [None, "b", None, "c", None, None]
    with pytest.raises(AudiohashError, match=r"train.unlabeled_classes: no training row has the class\(es\) \['e'\]"):
        hide_labels(labels, ["a", "e"])
    classes = [f"c{i:02d}" for i in range(20)]
    draw = draw_unseen_classes(classes * 3, 0.25, 7)
    assert len(draw) == 5 and set(draw) <= set(classes) and draw == sorted(draw)
    assert draw == draw_unseen_classes(classes, 0.25, 7) != draw_unseen_classes(classes, 0.25, 8)
    assert len(draw_unseen_classes(["a", "b"], 0.9, 0)) == 1  # never every class
    with pytest.raises(AudiohashError, match="share in"):
        draw_unseen_classes(classes, 0.0, 0)
