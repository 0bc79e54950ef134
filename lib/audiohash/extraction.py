"""The extract worker: a batch of audio files in, embedding rows and reject rows out.

Pure pandas/numpy: the Spark layer calls ``embed_files`` from mapInPandas, and tests call it
directly. Every input row ends as either >= 1 embedding row (one per window) or exactly one
reject row naming the file and the reason; one bad file never fails the batch.
"""
from __future__ import annotations

import datetime as dt
import logging

import numpy as np
import pandas as pd

from audiohash.audio import AudioRejected, decode_audio, split_windows
from audiohash.features import Extractor

log = logging.getLogger("audiohash.extraction")


def window_clip_id(clip_id: str, offset_s: float, n_windows: int) -> str:
    """A one-window file keeps its clip_id; windows of a long file become ``clip_id#offset``."""
    return clip_id if n_windows == 1 else f"{clip_id}#{offset_s:g}"


def embed_files(
    files: pd.DataFrame, extractor: Extractor, max_windows: int | None = None, now: dt.datetime | None = None
) -> pd.DataFrame:
    """Decode, window and embed a batch of files.

    files: columns clip_id, path, label, split, source, content (bytes; None if the file is
        missing). Returns a frame with the columns of ``schemas.EXTRACT_OUTPUT_DDL``: embedding
        rows have ``reject_reason`` None; reject rows have ``embedding`` None.
    """
    now = now or dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    keep = ["clip_id", "path", "label", "split", "source"]
    window_rows: list[dict] = []
    windows: list[np.ndarray] = []
    rejects: list[dict] = []
    for row in files.itertuples(index=False):
        meta = {k: getattr(row, k) for k in keep}
        if row.content is None:
            rejects.append({**meta, "reject_reason": "missing", "reject_message": f"{row.path}: file not found"})
            continue
        try:
            wave = decode_audio(bytes(row.content), row.path, extractor.sample_rate)
        except AudioRejected as exc:
            rejects.append({**meta, "reject_reason": exc.reason, "reject_message": str(exc)})
            continue
        pieces = split_windows(wave, extractor.sample_rate, extractor.window_samples / extractor.sample_rate,
                               max_windows=max_windows or None)
        for offset_s, piece in pieces:
            window_rows.append({**meta, "clip_id": window_clip_id(row.clip_id, offset_s, len(pieces)),
                                "offset_s": float(offset_s)})
            windows.append(piece)

    embeddings = extractor.embed(np.stack(windows)) if windows else np.zeros((0, extractor.embedding_dim), np.float32)
    out_rows = []
    for meta, vector in zip(window_rows, embeddings):
        if not np.isfinite(vector).all():  # an extractor can still overflow on odd input
            rejects.append({**meta, "reject_reason": "nan_embedding",
                            "reject_message": f"{meta['path']}: extractor {extractor.version} gave NaN/inf"})
            continue
        out_rows.append({**meta, "embedding": vector.astype(np.float32), "reject_reason": None, "reject_message": None})
    for r in rejects:
        r.setdefault("offset_s", None)
        r["embedding"] = None
    frame = pd.DataFrame(out_rows + rejects, columns=keep + ["offset_s", "embedding", "reject_reason", "reject_message"])
    frame["extractor"] = extractor.name
    frame["extractor_version"] = extractor.version
    frame["sample_rate"] = np.int32(extractor.sample_rate)
    frame["extracted_at"] = pd.Timestamp(now)
    if rejects:
        log.warning("%d of %d files rejected in this batch", len(rejects), len(files))
    return frame[["clip_id", "path", "label", "split", "source", "offset_s", "embedding", "extractor",
                  "extractor_version", "sample_rate", "extracted_at", "reject_reason", "reject_message"]]
