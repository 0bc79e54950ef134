"""Curves against brute-force loops over a hand-checkable ranking."""
import numpy as np

from audiohash import metrics
from audiohash.evaluation import class_group_metrics, curve_points, retrieval_curves


def test_curves_match_per_rank_metrics():
    rng = np.random.default_rng(0)
    db_labels = rng.integers(0, 4, 60)
    query_labels = rng.integers(0, 4, 9)
    ranked = np.stack([rng.permutation(60) for _ in range(9)])
    points = np.array([1, 2, 5, 17, 60])
    curves = retrieval_curves(query_labels, db_labels, ranked, points)
    for i, r in enumerate(points):
        assert np.isclose(curves["map_at_r"][i], metrics.mean_average_precision(query_labels, db_labels, ranked[:, :r]))
        assert np.isclose(curves["precision_at_r"][i], metrics.precision_at_r(query_labels, db_labels, ranked[:, :r]))
        found = [(db_labels[ranked[q, :r]] == query_labels[q]).sum() / (db_labels == query_labels[q]).sum()
                 for q in range(9)]
        assert np.isclose(curves["recall_at_r"][i], np.mean(found))
    assert curves["recall_at_r"][-1] == 1.0  # the whole database ranked: everything relevant found


def test_hand_worked_ranking():
    # One query of label 1; ranking relevance: [1, 0, 1, 0]; two relevant in the database.
    curves = retrieval_curves(np.array([1]), np.array([1, 0, 1, 0]), np.array([[0, 1, 2, 3]]), [1, 2, 3, 4])
    np.testing.assert_allclose(curves["map_at_r"], [1.0, 1.0, (1 + 2 / 3) / 2, (1 + 2 / 3) / 2])
    np.testing.assert_allclose(curves["precision_at_r"], [1.0, 0.5, 2 / 3, 0.5])
    np.testing.assert_allclose(curves["recall_at_r"], [0.5, 0.5, 1.0, 1.0])


def test_curve_points_cover_1_to_R():
    for R in (1, 2, 10, 9348):
        pts = curve_points(R)
        assert pts[0] == 1 and pts[-1] == R and (np.diff(pts) > 0).all()


def test_class_group_metrics_hand_worked():
    # Database labels a a b b; query 0 (a, seen) ranks [0, 2, 1, 3]: AP (1 + 2/3) / 2;
    # query 1 (b, unseen) ranks [2, 3, 0, 1]: AP 1.
    db = np.array(["a", "a", "b", "b"], object)
    ranked = np.array([[0, 2, 1, 3], [2, 3, 0, 1]])
    out = class_group_metrics(np.array(["a", "b"], object), db, ranked, ["a"])
    assert out == {"n_queries_unseen": 1, "map_all_unseen": 1.0, "map_all_seen": (1 + 2 / 3) / 2}
    assert class_group_metrics(np.array(["a", "b"], object), db, ranked[:, :2], ["a"]) == {}  # not whole-database
    only_seen = class_group_metrics(np.array(["a"], object), db, ranked[:1], ["a", "b"])
    assert only_seen == {"n_queries_unseen": 0, "map_all_seen": (1 + 2 / 3) / 2}
