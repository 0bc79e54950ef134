"""Driver-side training: sample the labeled fraction, fit one quantizer, wrap it in a bundle."""
from __future__ import annotations

import logging
import random
import time

import numpy as np

from audiohash.bundle import ModelBundle
from audiohash.errors import AudiohashError
from audiohash.quantizers import make_quantizer

log = logging.getLogger("audiohash.training")


def seed_everything(seed: int) -> None:
    """The one place that seeds Python, numpy and torch (faiss k-means seeds are per call)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sample_labeled(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, list[str]]:
    """Keep the labels of a seeded, per-class stratified ``fraction`` of the rows.

    labels: object (n,) class names, None for a row nobody labeled (never sampled). Returns label
    ids int64 (n,) with -1 for rows whose label is hidden from training, and the class names
    (id -> name) of the labeled rows. Every class keeps >= 1 label.
    """
    classes = sorted({name for name in labels.tolist() if name is not None})
    index = {name: i for i, name in enumerate(classes)}
    ids = np.array([-1 if name is None else index[name] for name in labels], np.int64)
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(labels), bool)
    for c in range(len(classes)):
        rows = np.flatnonzero(ids == c)
        n_keep = max(1, int(round(fraction * len(rows))))
        keep[rng.choice(rows, n_keep, replace=False)] = True
    return np.where(keep, ids, -1), classes


def draw_unseen_classes(classes, share: float, seed: int) -> list[str]:
    """The unseen-class protocol's split (Sablayrolles et al., ICASSP 2017): a seeded ``share`` of
    the classes (at least one, never all) whose labels training does not see."""
    classes = sorted(set(classes))
    if len(classes) < 2 or not 0 < share < 1:
        raise AudiohashError(f"unseen classes: need two classes or more and a share in (0, 1), got "
                             f"{len(classes)} classes and {share}")
    n = min(max(1, int(round(share * len(classes)))), len(classes) - 1)
    return sorted(np.random.default_rng(seed).choice(classes, n, replace=False).tolist())


def hide_labels(labels: np.ndarray, classes: list[str], what: str = "train.unlabeled_classes") -> np.ndarray:
    """labels (object, None = unlabeled) with the rows of ``classes`` set to None. A class that no
    row carries is refused by name (a typo would otherwise hide nothing)."""
    present = set(labels.tolist())
    missing = sorted(set(classes) - present)
    if missing:
        raise AudiohashError(f"{what}: no training row has the class(es) {missing}; classes present: "
                             f"{sorted(c for c in present if c is not None)}")
    return np.where(np.isin(labels, list(classes)), None, labels).astype(object)


def train_bundle(method: str, bits: int, x: np.ndarray, labels: np.ndarray, label_fraction: float, seed: int,
                 hyper: dict, model_name: str, meta: dict) -> tuple[ModelBundle, dict]:
    """Fit ``method`` at ``bits`` on x (n, d) float32; only the sampled fraction's labels are used.
    hyper: {method: {name: value}}; only ``hyper[method]`` applies.

    Returns the bundle (not yet registered) and training metrics.
    """
    seed_everything(seed)
    quantizer = make_quantizer(method, bits, seed=seed, **hyper.get(method, {}))
    needed = getattr(quantizer, "centroids_per_subspace", 0)  # binary methods have no codebooks
    if len(x) < needed:
        # faiss's k-means would stop with "Number of training points ... should be at least ...".
        raise AudiohashError(
            f"{method}: {len(x)} training rows, but its codebooks have {needed} centroids per "
            f"subspace and need at least that many rows; train on more clips (train.splits, a larger dataset) "
            f"or use a binary method (sh, itq, agh)")
    label_ids, classes = sample_labeled(labels, label_fraction, seed)
    started = time.time()
    quantizer.fit(x, label_ids if quantizer.supervised else None)
    seconds = time.time() - started
    n_labeled = int((label_ids >= 0).sum()) if quantizer.supervised else 0
    log.info("trained %s at %d bits on %d clips (%d labeled) in %.1f s", method, bits, len(x), n_labeled, seconds)
    meta = {**meta, "classes": classes, "n_train": len(x), "n_labeled": n_labeled, "label_fraction": label_fraction}
    return ModelBundle(quantizer, model_name, 0, meta), {"train_s": seconds, "n_train": len(x), "n_labeled": n_labeled}
