"""Real embeddings for the benchmarks: a dataset the project builds (``audiohash.dataset``: the GM
renders, or recorded audio from Debian packages) embedded in-process by the extract job's own
worker (``extraction.embed_files``: the same decoding, windows and extractor as the executors),
cached under benchmarks/.cache.

Benchmarks never time this part; they time the jobs over what it returns.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from audiohash.config import DEFAULT_EXTRACTOR, ExtractSettings
from audiohash.dataset import build_dataset
from audiohash.extraction import embed_files, manifest_inputs
from audiohash.features import get_extractor

CACHE = Path(__file__).resolve().parent / ".cache"
FILES_PER_BATCH = 64
log = logging.getLogger("benchmarks.real_data")


@dataclass
class RealEmbeddings:
    clip_ids: np.ndarray  # object (n,): one row per window, as the extract job writes them
    labels: np.ndarray  # object (n,)
    splits: np.ndarray  # object (n,): db | query
    sources: np.ndarray  # object (n,): the recording chain (soundfont bank, kit, voice, ...)
    x: np.ndarray  # float32 (n, d)
    extractor_version: str
    dataset: str = "gm"
    rejected: int = 0  # files the extract worker rejected (reasons in the log)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(clip_ids, labels, x) of one split."""
        rows = self.splits == name
        return self.clip_ids[rows], self.labels[rows], self.x[rows]


def dataset_manifest(dataset: str = "gm", seed: int = 0, cache: Path = CACHE) -> Path:
    """Build (or reuse) ``dataset`` under the benchmarks' cache; the path of its manifest.csv.
    The one place that names the cache folder, so every benchmark reuses the same build."""
    return Path(build_dataset(dataset, cache / f"dataset-{dataset}-{seed}", seed=seed))


def real_embeddings(dataset: str = "gm", extractor: str = DEFAULT_EXTRACTOR, seed: int = 0,
                    cache: Path = CACHE) -> RealEmbeddings:
    """Build (or reuse) ``dataset`` and embed every file with ``extractor`` at its default
    parameters, exactly as the extract job does with the default config (or reuse the npz)."""
    manifest_path = dataset_manifest(dataset, seed, cache)
    inputs = manifest_inputs(pd.read_csv(manifest_path), str(manifest_path))
    settings = ExtractSettings(extractor=extractor)
    model = get_extractor(extractor, **settings.extractor_params())
    npz = cache / f"embeddings-{dataset}-{seed}-{model.version}.npz"
    if not npz.exists():
        log.info("embedding %d files of %s with %s", len(inputs), dataset, model.version)
        parts = []
        for start in range(0, len(inputs), FILES_PER_BATCH):
            parts.append(embed_files(inputs.iloc[start: start + FILES_PER_BATCH], model,
                                     max_windows=settings.max_windows, windows_per_call=settings.windows_per_call))
            if start // FILES_PER_BATCH % 20 == 19:
                log.info("embedded %d/%d files", start + FILES_PER_BATCH, len(inputs))
        rows = pd.concat(parts, ignore_index=True)
        rejected = rows[rows["reject_reason"].notna()]
        for reason, count in rejected["reject_reason"].value_counts().items():
            log.warning("%d files rejected (%s), e.g. %s", count, reason,
                        rejected.loc[rejected["reject_reason"] == reason, "reject_message"].iloc[0])
        rows = rows[rows["reject_reason"].isna()]
        np.savez(npz, x=np.stack(rows["embedding"].to_numpy()).astype(np.float32),
                 **{c: rows[c].to_numpy(str) for c in ("clip_id", "label", "split", "source")},
                 rejected=len(rejected))
    data = np.load(npz)
    return RealEmbeddings(data["clip_id"].astype(object), data["label"].astype(object), data["split"].astype(object),
                          data["source"].astype(object), data["x"], model.version, dataset, int(data["rejected"]))


def replicate(x: np.ndarray, n: int, noise: float = 0.05, seed: int = 0) -> np.ndarray:
    """n rows cycling through x with Gaussian noise of ``noise`` x each column's std (float32)."""
    rng = np.random.default_rng(seed)
    out = x[np.arange(n) % len(x)].astype(np.float32)
    out += rng.standard_normal(out.shape, dtype=np.float32) * (noise * x.std(axis=0))
    return out


def encode_input_batch(clip_ids, labels, x: np.ndarray):
    """Rows of the encode input (``schemas.ENCODE_INPUT_COLUMNS``: clip_id, label, embedding) for
    ``encoding.encode_batch``: what the speed benchmarks encode straight into a code table.
    labels: None for all-null labels."""
    import pyarrow as pa

    n = len(x)
    return pa.RecordBatch.from_arrays([
        pa.array(clip_ids, pa.string()), pa.nulls(n, pa.string()) if labels is None else pa.array(labels, pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x, np.float32).ravel()), x.shape[1])
        .cast(pa.list_(pa.float32()))], names=["clip_id", "label", "embedding"])


def machine() -> dict:
    import os
    import platform

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
