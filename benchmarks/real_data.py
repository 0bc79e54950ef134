"""Real embeddings for the benchmarks: the GM benchmark dataset rendered from the soundfonts and
embedded with the default extractor (timbre), in-process, cached under benchmarks/.cache.

Benchmarks never time this part; they time the jobs over what it returns.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from audiohash.audio import decode_audio
from audiohash.dataset import render_dataset
from audiohash.config import DEFAULT_EXTRACTOR
from audiohash.features import get_extractor

CACHE = Path(__file__).resolve().parent / ".cache"
log = logging.getLogger("benchmarks.real_data")


@dataclass
class RealEmbeddings:
    clip_ids: np.ndarray  # object (n,)
    labels: np.ndarray  # object (n,)
    splits: np.ndarray  # object (n,): db | query
    sources: np.ndarray  # object (n,): soundfont bank
    x: np.ndarray  # float32 (n, d)
    extractor_version: str

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(clip_ids, labels, x) of one split."""
        rows = self.splits == name
        return self.clip_ids[rows], self.labels[rows], self.x[rows]


def real_embeddings(size: str = "full", seed: int = 0, cache: Path = CACHE) -> RealEmbeddings:
    """Render (or reuse) the dataset and embed every clip with the default extractor (or reuse the npz)."""
    manifest_path = Path(render_dataset(cache / f"dataset-{size}-{seed}", size=size, seed=seed))
    manifest = pd.read_csv(manifest_path)
    extractor = get_extractor(DEFAULT_EXTRACTOR)
    npz = cache / f"embeddings-{size}-{seed}-{extractor.version}.npz"
    if npz.exists():
        x = np.load(npz)["x"]
    else:
        log.info("embedding %d clips with %s", len(manifest), extractor.version)
        x = np.zeros((len(manifest), extractor.embedding_dim), np.float32)
        for start in range(0, len(manifest), 256):
            rows = manifest.iloc[start: start + 256]
            waves = [decode_audio((manifest_path.parent / p).read_bytes(), p) for p in rows["path"]]
            x[start: start + len(rows)] = extractor.embed(np.stack(waves))
        np.savez(npz, x=x)
    return RealEmbeddings(manifest["clip_id"].to_numpy(object), manifest["label"].to_numpy(object),
                          manifest["split"].to_numpy(object), manifest["soundfont"].to_numpy(object), x, extractor.version)


def replicate(x: np.ndarray, n: int, noise: float = 0.05, seed: int = 0) -> np.ndarray:
    """n rows cycling through x with Gaussian noise of ``noise`` x each column's std (float32)."""
    rng = np.random.default_rng(seed)
    out = x[np.arange(n) % len(x)].astype(np.float32)
    out += rng.standard_normal(out.shape, dtype=np.float32) * (noise * x.std(axis=0))
    return out


def machine() -> dict:
    import os
    import platform

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
