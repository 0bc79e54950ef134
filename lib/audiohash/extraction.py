"""The extract stage's pure core: which files to embed (planning) and the batch worker.

No Spark here: the Spark layer (``audiohash.spark.extract``) lists files and hands batches of
them to these functions in mapInPandas; tests and the benchmark call them directly.

- ``manifest_inputs`` / ``folder_inputs``: a manifest table or a folder listing -> the input files
  (clip_id, path, label, split, source), one row per file.
- ``plan_extract``: input files + what the filesystem lists + what the embeddings table already
  holds -> the files to embed now, the files rejected before reading a byte (missing, too large,
  clip_id taken) and how many are skipped because this extractor version already embedded them.
- ``balanced_order``: a row order that gives equal-count slices equal bytes (Spark slices a
  driver-side table by count).
- ``embed_files``: a batch of files (read here, or with their bytes) -> one row per window with
  its embedding, or exactly one reject row per file; one bad file never fails the batch.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from audiohash.audio import AudioRejected, decode_audio, split_windows
from audiohash.errors import AudiohashError
from audiohash.schemas import EXTRACT_OUTPUT_DDL, INPUT_FILE_COLUMNS, column_names

if TYPE_CHECKING:  # annotations only: features imports torch, seconds in a fresh worker (external.py's)
    from audiohash.features import Extractor

log = logging.getLogger("audiohash.extraction")

INPUT_COLUMNS = [c for c in INPUT_FILE_COLUMNS if c != "content"]  # clip_id, path, label, split, source
# What ``embed_files`` returns.
OUTPUT_COLUMNS = column_names(EXTRACT_OUTPUT_DDL)
# File name suffixes the folder input treats as audio (compared lower-case). Formats libsndfile
# cannot decode (m4a, aac, wma, ...) are still inputs: they end as 'unsupported_format' rejects
# instead of vanishing from the accounting.
AUDIO_SUFFIXES = frozenset({
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au",
    ".snd", ".w64", ".caf", ".rf64", ".m4a", ".aac", ".wma", ".mp4", ".webm",
})


# ---- input files ---------------------------------------------------------------------------
def is_uri(path: str) -> bool:
    return "://" in path or path.startswith("file:")


def hadoop_path(path: str) -> str:
    """A path in the form Spark's binaryFile source reports it: local paths become absolute
    ``file:/abs/path`` (``file:///x`` too); other URIs (s3a://, hdfs://, ...) are unchanged."""
    if path.startswith("file://"):
        return "file:" + os.path.normpath(path[len("file://"):] or "/")
    if path.startswith("file:"):
        return "file:" + os.path.normpath(path[len("file:"):])
    if "://" in path:
        return path
    return "file:" + os.path.abspath(path)


def _strip_suffix(path: str) -> str:
    return os.path.splitext(path)[0]


def text_value(v) -> str | None:
    """A manifest cell as text, nulls kept as None: Parquet may hold numbers (an integer column with
    nulls arrives as floats: 7.0 is the label "7") or nulls, CSV empty cells ("" is None too)."""
    if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA or str(v) == "":
        return None
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def manifest_inputs(frame: pd.DataFrame, manifest: str) -> pd.DataFrame:
    """A manifest table -> input files (``INPUT_COLUMNS``), one row per file.

    frame: the manifest as read (columns path, and optionally label, split, clip_id, source;
        the benchmark dataset's ``soundfont`` stands in for ``source``; other columns ignored).
    manifest: where it was read from; relative paths are resolved against its folder, and a
        missing or empty clip_id becomes the path relative to that folder without its suffix
        (the full path without suffix for files outside it).
    Raises AudiohashError naming the row for a missing path column, an empty path, or a path
    or clip_id listed twice (one file must end in exactly one place).
    """
    if "path" not in frame.columns:
        raise AudiohashError(f"manifest {manifest}: no 'path' column (columns: {list(frame.columns)})")
    def text(column: str) -> list:
        return [text_value(v) for v in frame[column].tolist()] if column in frame.columns else [None] * len(frame)

    raw_paths = text("path")
    for i, p in enumerate(raw_paths):
        if p is None:
            raise AudiohashError(f"manifest {manifest}: row {i + 2 if manifest.endswith('.csv') else i} "
                                 f"has an empty path")
    base = hadoop_path(manifest).rsplit("/", 1)[0]
    paths = [hadoop_path(p) if is_uri(p) or os.path.isabs(p) else hadoop_path(base + "/" + p)
             for p in raw_paths]
    clip_ids = text("clip_id")
    clip_ids = [c if c is not None else _strip_suffix(p[len(base) + 1:] if p.startswith(base + "/") else p)
                for c, p in zip(clip_ids, paths)]
    source = text("source") if "source" in frame.columns else text("soundfont")
    out = pd.DataFrame({"clip_id": clip_ids, "path": paths, "label": text("label"),
                        "split": text("split"), "source": source}, columns=INPUT_COLUMNS)
    for column in ("clip_id", "path"):
        dup = out[column].duplicated(keep=False)
        if dup.any():
            value = out.loc[dup, column].iloc[0]
            rows = (out.index[out[column] == value] + (2 if manifest.endswith(".csv") else 0)).tolist()
            raise AudiohashError(f"manifest {manifest}: {column} {value!r} appears in rows {rows}; "
                                 f"each file must be listed once with a unique clip_id")
    return out


def folder_inputs(paths: list[str] | pd.Series, root: str) -> pd.DataFrame:
    """Files listed under a folder of class sub-folders -> input files (``INPUT_COLUMNS``).

    paths: listed files (``hadoop_path`` form). Files whose suffix is not in AUDIO_SUFFIXES are
    left out (a README, a metadata CSV). clip_id: the path relative to root without its suffix
    (unique within the folder). label: the first sub-folder under root (``root/dog/a/x.wav`` ->
    dog), None for a file directly under root. split and source: None.
    """
    root = hadoop_path(root).rstrip("/") + "/"
    rows = []
    for p in sorted(paths):
        if os.path.splitext(p)[1].lower() not in AUDIO_SUFFIXES:
            continue
        if not p.startswith(root):
            raise AudiohashError(f"folder input {root}: listed file {p} is not under it")
        relative = p[len(root):]
        parts = relative.split("/")
        rows.append((_strip_suffix(relative), p, parts[0] if len(parts) > 1 else None, None, None))
    return pd.DataFrame(rows, columns=INPUT_COLUMNS)


def base_clip_ids(clip_ids: pd.Series, paths: pd.Series) -> pd.Series:
    """Embedding rows' clip_ids -> the clip_id of the file each came from, one per path.

    A file cut into several windows has rows ``<clip_id>#<offset>``; a one-window file keeps its
    clip_id. Returns a Series indexed by path.
    """
    frame = pd.DataFrame({"clip_id": clip_ids.to_numpy(), "path": paths.to_numpy()})
    grouped = frame.groupby("path")["clip_id"]
    first, count = grouped.min(), grouped.size()
    return first.where(count == 1, first.str.replace(r"#[^#]*$", "", regex=True))


def plan_extract(inputs: pd.DataFrame, listed: pd.DataFrame, embedded: pd.DataFrame,
                 max_file_bytes: int) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Decide, before reading any audio, what this run embeds.

    inputs: INPUT_COLUMNS, one row per file. listed: path, length (bytes) of the files that
    exist. embedded: path, clip_id of the files the embeddings table already holds for this
    extractor version (one row per file, base clip_id).
    Returns (todo: inputs rows to embed, with their ``length``; rejects: inputs rows plus
    reject_reason and reject_message, for missing files, zero-byte files ('empty'), files over
    max_file_bytes and clip_ids already used by another file; skipped: the number of files
    already embedded, left alone).
    """
    frame = inputs.merge(listed[["path", "length"]].drop_duplicates("path"), on="path", how="left")
    done = frame["path"].isin(set(embedded["path"]))
    taken = dict(zip(embedded["clip_id"], embedded["path"]))
    reason = pd.Series(None, index=frame.index, dtype=object)
    message = pd.Series(None, index=frame.index, dtype=object)
    missing = frame["length"].isna() & ~done
    reason[missing] = "missing"
    message[missing] = [f"{p}: file not found" for p in frame.loc[missing, "path"]]
    empty = ~missing & ~done & (frame["length"] == 0)
    reason[empty] = "empty"
    message[empty] = [f"{p}: zero-byte file" for p in frame.loc[empty, "path"]]
    large = ~missing & ~done & (frame["length"] > max_file_bytes)
    reason[large] = "too_large"
    message[large] = [f"{p}: {n:.0f} bytes, more than the {max_file_bytes} a file may have"
                      for p, n in zip(frame.loc[large, "path"], frame.loc[large, "length"])]
    clash = ~done & reason.isna() & frame["clip_id"].isin(set(taken))
    reason[clash] = "duplicate_clip_id"
    message[clash] = [f"{p}: clip_id {c!r} is already used by {taken[c]} in the embeddings table"
                      for p, c in zip(frame.loc[clash, "path"], frame.loc[clash, "clip_id"])]
    rejects = frame.loc[reason.notna(), INPUT_COLUMNS].assign(
        reject_reason=reason[reason.notna()], reject_message=message[reason.notna()])
    todo = frame.loc[~done & reason.isna()].copy()
    todo["length"] = todo["length"].astype("int64")
    return todo.reset_index(drop=True), rejects.reset_index(drop=True), int(done.sum())


# ---- the worker ----------------------------------------------------------------------------
def window_suffix(offset_s: float, n_windows: int) -> str:
    """What a window adds to its file's clip_id: "" for a one-window file, ``#<offset in
    seconds>`` for each window of a longer one (``dog/17#4``)."""
    return "" if n_windows == 1 else f"#{offset_s:g}"


def read_local(path: str) -> bytes:
    """The bytes of a local file given as ``file:/abs/path`` or a plain path (OSError if not)."""
    with open(path[len("file:"):] if path.startswith("file:") else path, "rb") as f:
        return f.read()


def balanced_order(lengths, n_slices: int) -> np.ndarray:
    """A row order whose ``n_slices`` consecutive slices, cut the way Spark cuts a driver-side
    table (slice i = rows i*n//k .. (i+1)*n//k), hold about equal bytes.

    lengths: file sizes (n,). Files are dealt largest first, round-robin, to the slices that
    still have room: no slice ends more than one (the largest) file away from another.
    Returns a permutation of range(n).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if n_slices < 1:
        raise AudiohashError(f"balanced_order: n_slices must be >= 1, got {n_slices}")
    n = len(lengths)
    sizes = [((i + 1) * n) // n_slices - (i * n) // n_slices for i in range(n_slices)]
    slices: list[list[int]] = [[] for _ in range(n_slices)]
    by_size = np.argsort(-lengths, kind="stable").tolist()
    position = 0
    while position < n:
        for k in range(n_slices):  # one round: one file to every slice with room left
            if len(slices[k]) < sizes[k] and position < n:
                slices[k].append(by_size[position])
                position += 1
    return np.asarray([i for s in slices for i in s], dtype=np.int64)


class _Batch:
    """Windows waiting for the next extractor call, remembered by file so a failure stays local."""

    def __init__(self):
        self.files: list[tuple[int, list[float], np.ndarray]] = []  # (file index, offsets, windows)
        self.n_windows = 0

    def add(self, index: int, offsets: list[float], windows: np.ndarray) -> None:
        self.files.append((index, offsets, windows))
        self.n_windows += len(offsets)

    def embed(self, extractor: Extractor, paths: list[str], embedded: dict, rejected: dict) -> None:
        """Embed every waiting window in one call; if that call raises, file by file, so only the
        files the extractor fails on are rejected. A file with any non-finite output row is
        rejected whole (never half in each table)."""
        files, self.files, self.n_windows = self.files, [], 0
        if not files:
            return
        try:
            vectors = extractor.embed(np.concatenate([w for _, _, w in files]))
        except Exception as exc:  # noqa: BLE001 - any extractor failure is retried file by file
            if len(files) == 1:
                index = files[0][0]
                rejected[index] = ("extractor_error", f"{paths[index]}: extractor {extractor.version} failed: {exc}")
                return
            for item in files:
                single = _Batch()
                single.add(*item)
                single.embed(extractor, paths, embedded, rejected)
            return
        parts = np.split(vectors, np.cumsum([len(offsets) for _, offsets, _ in files])[:-1])
        for (index, offsets, _), part in zip(files, parts):
            if np.isfinite(part).all():
                embedded[index] = (offsets, np.asarray(part, dtype=np.float32))
            else:
                rejected[index] = ("nan_embedding", f"{paths[index]}: extractor {extractor.version} gave NaN or inf")


def embed_files(files: pd.DataFrame, extractor: Extractor, max_windows: int | None = None,
                windows_per_call: int = 4) -> pd.DataFrame:
    """Decode, window and embed a batch of files: the worker the executors run.

    files: INPUT_COLUMNS, plus ``content`` (the bytes; None for a file the reader could not
        read) when the caller read the files; without that column each path is read here
        (local files: ``file:/abs`` or plain paths).
    max_windows: windows kept per long file (None or 0 = all). windows_per_call: windows handed
        to one ``extractor.embed`` call (logmel is fastest on a few at a time: a large batch's
        STFT falls out of the CPU caches).
    Returns ``OUTPUT_COLUMNS`` (``schemas.EXTRACT_OUTPUT_DDL``): one row per window of each
    embedded file (clip_id ``<clip_id>`` or ``<clip_id>#<offset>``, embedding float32 (d,)) and
    exactly one row per rejected file (embedding None, offset_s None, n_windows 0). Reasons:
    AudioRejected.REASONS, 'missing', 'unreadable' (also any unexpected decoder exception),
    'extractor_error' (the extractor raised on this file), 'nan_embedding'.
    """
    paths = files["path"].tolist()
    contents = files["content"].tolist() if "content" in files.columns else [None] * len(paths)
    read_here = "content" not in files.columns
    window_s = extractor.window_samples / extractor.sample_rate
    embedded: dict[int, tuple[list[float], np.ndarray]] = {}
    rejected: dict[int, tuple[str, str]] = {}
    batch = _Batch()
    for index, (path, content) in enumerate(zip(paths, contents)):
        try:
            data = read_local(path) if read_here else content
        except FileNotFoundError:
            rejected[index] = ("missing", f"{path}: file not found")
            continue
        except OSError as exc:
            rejected[index] = ("unreadable", f"{path}: {exc.strerror or exc}")
            continue
        if data is None:
            rejected[index] = ("unreadable", f"{path}: its bytes could not be read")
            continue
        try:
            wave = decode_audio(bytes(data), path, extractor.sample_rate)
        except AudioRejected as exc:
            rejected[index] = (exc.reason, str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - a decoder crash on one file must not fail the job
            rejected[index] = ("unreadable", f"{path}: {type(exc).__name__}: {exc}")
            continue
        if wave.size == extractor.window_samples:  # the common case: exactly one window, no copy
            batch.add(index, [0.0], wave[None])
        else:
            pieces = split_windows(wave, extractor.sample_rate, window_s, max_windows=max_windows or None)
            batch.add(index, [offset for offset, _ in pieces], np.stack([w for _, w in pieces]))
        if batch.n_windows >= windows_per_call:
            batch.embed(extractor, paths, embedded, rejected)
    batch.embed(extractor, paths, embedded, rejected)

    # Row i of the output repeats the metadata of file source_row[i].
    source_row, suffix, offset, vector, n_windows, reason, message = [], [], [], [], [], [], []
    for index in range(len(paths)):
        if index in rejected:
            source_row.append(index), suffix.append(""), offset.append(None), vector.append(None)
            n_windows.append(0), reason.append(rejected[index][0]), message.append(rejected[index][1])
            continue
        offsets, vectors = embedded[index]
        for offset_s, v in zip(offsets, vectors):
            source_row.append(index), suffix.append(window_suffix(offset_s, len(offsets)))
            offset.append(offset_s), vector.append(v), n_windows.append(len(offsets))
            reason.append(None), message.append(None)
    if rejected:
        log.warning("%d of %d files rejected in this batch", len(rejected), len(paths))
    out = files[INPUT_COLUMNS].iloc[source_row].reset_index(drop=True)
    out["clip_id"] = out["clip_id"] + pd.Series(suffix, dtype=object)
    out["offset_s"] = pd.Series(offset, dtype=object)
    out["embedding"] = pd.Series(vector, dtype=object)
    out["n_windows"] = np.asarray(n_windows, dtype=np.int32)
    out["reject_reason"] = pd.Series(reason, dtype=object)
    out["reject_message"] = pd.Series(message, dtype=object)
    return out[OUTPUT_COLUMNS]
