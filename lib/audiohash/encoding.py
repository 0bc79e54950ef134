"""Encoding without Spark: the batch worker the executors run, and the plan of an encode run.

- ``encode_batch``: a batch of embedding rows in, code rows out (pyarrow/numpy).
- ``fingerprint``: a 64-bit fingerprint of each row's embedding and label (``source_hash``).
- ``Lineage``: what a code-table commit was made from (model version, embeddings version, shards,
  splits, MLflow run); stored as the Delta commit's userMetadata, read back by the next run.
- ``plan_encode``: from the code table's lineage, the requested one and the embeddings table's
  changes since then, decide what a run must do: nothing, append the rows of new files, compare
  every row's fingerprint, or re-encode everything.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from audiohash.arrow_arrays import binary_column
from audiohash.errors import AudiohashError
from audiohash.quantizers import Quantizer
from audiohash.schemas import CODES_DDL, ENCODE_INPUT_COLUMNS, ENCODED_DDL, column_names

ENCODE_MODES = ("incremental", "full")
# Rows per quantizer.encode call. PQ's faiss encode builds rows x M x 256 float distance tables:
# at 16384 rows that is 128 MB for M = 8, which keeps it from paging in gigabytes per batch.
ENCODE_CHUNK_ROWS = 16384
ENCODED_COLUMNS = column_names(ENCODED_DDL)
CODES_COLUMNS = column_names(CODES_DDL)
# Commits that rearrange files or settings but not rows: the lineage before them still holds.
MAINTENANCE_OPERATIONS = {"OPTIMIZE", "VACUUM START", "VACUUM END", "SET TBLPROPERTIES", "UNSET TBLPROPERTIES"}
HISTORY_DEPTH = 100  # commits searched back for the last encode's lineage


def shard_of(clip_ids: list[str], n_shards: int) -> np.ndarray:
    """Stable shard per clip: crc32(clip_id) mod n_shards, int32 (n,). Same on every machine/run."""
    return np.fromiter((zlib.crc32(c.encode()) % n_shards for c in clip_ids), np.int32, len(clip_ids))


def encodable_rows(column: pa.Array | pa.ChunkedArray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """list<float> column of n rows -> (mask bool (n,), x float32 (mask.sum(), dim)).

    A row is encodable when it is not null and holds ``dim`` finite, non-null values; the others
    are left out of x (the caller lists them as rejects).
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy()
    mask = np.diff(offsets) == dim
    if column.null_count:
        mask &= column.is_valid().to_numpy(zero_copy_only=False)
    values = column.values.to_numpy(zero_copy_only=False)  # null values come out as NaN
    if mask.all():
        x = values[offsets[0]: offsets[-1]].reshape(len(mask), dim)
    else:
        x = values[offsets[:-1][mask][:, None] + np.arange(dim)]
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        mask[mask] = finite
        x = x[finite]
    return mask, np.ascontiguousarray(x, dtype=np.float32)


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer over uint64 arrays (wrapping arithmetic): every input bit moves
    about half the output bits."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _position_keys(n: int) -> np.ndarray:
    """Odd 64-bit multipliers, one per position in a row: uint64 (n,)."""
    return _mix64(np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)


def _label_keys(labels: pa.Array) -> np.ndarray:
    """A 64-bit key per row's label (blake2b of its UTF-8 bytes; 0 for null): uint64 (n,)."""
    encoded = labels.dictionary_encode()
    keys = np.array([int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little")
                     for v in encoded.dictionary.to_pylist()] + [0], np.uint64)
    indices = encoded.indices.fill_null(len(encoded.dictionary)).to_numpy(zero_copy_only=False)
    return keys[indices]


def fingerprint(embeddings: pa.Array | pa.ChunkedArray, labels: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Fingerprint of each row's (embedding, label): int64 (n,), the code table's ``source_hash``.

    embeddings: list<float> (any lengths, nulls allowed); labels: string. The embedding's float
    bits, position by position, and its length (-1 for null) enter a wrapping sum with odd
    per-position multipliers, mixed with the label's key. Any change of a value's bits, of the
    length or of the label changes it (a 64-bit collision aside): incremental encode compares it
    to find changed rows. Each row's value depends on that row alone (any batch gives the same).
    """
    if isinstance(embeddings, pa.ChunkedArray):
        embeddings = embeddings.combine_chunks()
    if isinstance(labels, pa.ChunkedArray):
        labels = labels.combine_chunks()
    n = len(embeddings)
    offsets = embeddings.offsets.to_numpy().astype(np.int64)
    lengths = np.diff(offsets)
    valid = np.ones(n, bool) if not embeddings.null_count else embeddings.is_valid().to_numpy(zero_copy_only=False)
    bits = embeddings.values.cast(pa.float32()).fill_null(np.nan).to_numpy(zero_copy_only=False).view(np.uint32)
    keys = _position_keys(int(lengths.max(initial=0)))
    sums = np.zeros(n, np.uint64)
    if n and valid.all() and (lengths == lengths[0]).all() and lengths[0]:
        dim = int(lengths[0])
        rows = bits[offsets[0]: offsets[-1]].reshape(n, dim)
        for start in range(0, n, ENCODE_CHUNK_ROWS):
            sums[start: start + ENCODE_CHUNK_ROWS] = rows[start: start + ENCODE_CHUNK_ROWS] @ keys  # uint64, wraps
    elif n:
        values = bits[offsets[0]: offsets[-1]].astype(np.uint64)
        positions = np.arange(len(values)) - np.repeat(offsets[:-1] - offsets[0], lengths)
        running = np.concatenate([np.zeros(1, np.uint64), np.cumsum(values * keys[positions], dtype=np.uint64)])
        sums = running[offsets[1:] - offsets[0]] - running[offsets[:-1] - offsets[0]]
    sums[~valid] = 0  # a null row's offsets may still span values
    lengths_key = np.where(valid, lengths, -1).astype(np.int64).view(np.uint64)
    h = _mix64(sums ^ _mix64(lengths_key + np.uint64(0x632BE59BD9B4E019)))
    return _mix64(h ^ _label_keys(labels)).view(np.int64)


def select_splits(batch: pa.RecordBatch, splits: list[str] | tuple[str, ...]) -> pa.RecordBatch:
    """The rows of a batch whose ``split`` is one of ``splits`` (every row when ``splits`` is empty)."""
    if not splits:
        return batch
    keep = pc.fill_null(pc.is_in(batch.column("split"), pa.array(list(splits), pa.string())), False)
    return batch if pc.all(keep).as_py() else batch.filter(keep)  # filtering copies every column


def first_duplicate(values: pa.Array | pa.ChunkedArray) -> str | None:
    """A value that occurs more than once (the smallest such), or None when all are distinct."""
    counts = pc.value_counts(values)
    twice = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    return pc.min(twice).as_py() if len(twice) else None


def encode_batch(batch: pa.RecordBatch, quantizer: Quantizer, n_shards: int) -> pa.RecordBatch:
    """Rows (clip_id, label, embedding) -> rows of ``schemas.ENCODED_DDL`` (with the row's
    ``fingerprint`` as source_hash), one per encodable row (see ``encodable_rows``); the others are
    dropped here and found later by the Spark layer as the rows without a code. With an inverted
    file, each row gets its list and the shard of its list range (``shard_of_lists``)."""
    missing = [c for c in ENCODE_INPUT_COLUMNS if c not in batch.schema.names]
    if missing:
        raise AudiohashError(f"encode batch: missing columns {missing} (has {batch.schema.names})")
    mask, x = encodable_rows(batch.column("embedding"), quantizer.input_dim)
    codes = np.zeros((len(x), quantizer.code_size), np.uint8)
    lists = np.zeros(len(x), np.int32) if quantizer.nlist else None
    for start in range(0, len(x), ENCODE_CHUNK_ROWS):
        chunk = slice(start, start + ENCODE_CHUNK_ROWS)
        codes[chunk], chunk_lists = quantizer.encode_with_lists(x[chunk])
        if lists is not None:
            lists[chunk] = chunk_lists
    # Fingerprints of the whole batch, then kept by row: filtering the embeddings would copy them.
    hashes = fingerprint(batch.column("embedding"), batch.column("label"))
    keep = None if mask.all() else pa.array(mask)
    clip_ids, labels = (batch.column(c) if keep is None else batch.column(c).filter(keep) for c in ("clip_id", "label"))
    shards = shard_of(clip_ids.to_pylist(), n_shards) if lists is None else shard_of_lists(lists, quantizer.nlist,
                                                                                           n_shards)
    return pa.RecordBatch.from_arrays(
        [clip_ids, pa.array(shards, pa.int32()), binary_column(codes), labels, pa.array(hashes[mask], pa.int64()),
         pa.nulls(len(x), pa.int32()) if lists is None else pa.array(lists, pa.int32())],
        names=ENCODED_COLUMNS,
    )


def shard_of_lists(lists: np.ndarray, nlist: int, n_shards: int) -> np.ndarray:
    """The shard of each code of an inverted file: its list's range (lists l with l * n_shards //
    nlist = s are shard s), so a probed list is in one partition: int32 like ``lists``."""
    return (np.asarray(lists, np.int64) * n_shards // max(1, nlist)).astype(np.int32)


def code_table_batch(encoded: pa.RecordBatch, lineage: "Lineage", encoded_at: dt.datetime) -> pa.RecordBatch:
    """Rows of ``schemas.ENCODED_DDL`` + the columns every row of one run shares -> rows of
    ``schemas.CODES_DDL`` (what ``spark.encode.code_rows`` adds in Spark)."""
    n = encoded.num_rows
    shared = {
        "model_name": pa.array([lineage.model_name] * n, pa.string()),
        "model_version": pa.array(np.full(n, lineage.model_version, np.int32)),
        "embedding_version": pa.array(np.full(n, lineage.embeddings_version, np.int64)),
        "encoded_at": pa.array([encoded_at] * n, pa.timestamp("us", tz="UTC")),
        "encode_run_id": pa.array([lineage.run_id] * n, pa.string()),
    }
    return pa.RecordBatch.from_arrays([shared[c] if c in shared else encoded.column(c) for c in CODES_COLUMNS],
                                      names=CODES_COLUMNS)


def with_fingerprints(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch with (clip_id, label, embedding, ...) and its ``fingerprint`` appended as source_hash."""
    return batch.append_column("source_hash", pa.array(fingerprint(batch.column("embedding"),
                                                                   batch.column("label")), pa.int64()))


@dataclass(frozen=True)
class Lineage:
    """What a code table's content was made from; JSON in the Delta commit's userMetadata."""

    model_name: str
    model_version: int
    n_shards: int
    splits: tuple[str, ...]
    embeddings_table: str  # where it was read (for people: a copied or moved lake keeps its table id)
    embeddings_version: int
    embeddings_table_id: str = ""  # the Delta table id: versions are comparable only within one table
    run_id: str = ""  # the MLflow run of jobs/encode.py that made the commit
    model_run_id: str = ""  # the MLflow run that trained and registered the model version

    def to_json(self) -> str:
        return json.dumps({"audiohash_codes": 1, **asdict(self), "splits": list(self.splits)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> "Lineage | None":
        """The lineage in a commit's userMetadata, or None if the commit was not made by encode."""
        try:
            data = json.loads(text or "")
        except ValueError:
            return None
        if not isinstance(data, dict) or data.pop("audiohash_codes", None) != 1:
            return None
        try:
            return cls(**{**data, "splits": tuple(data["splits"])})
        except (TypeError, KeyError):
            return None

    def same_index(self, other: "Lineage") -> bool:
        """True when ``other`` describes codes that an incremental run may update in place."""
        return (self.model_name, self.model_version, self.n_shards, sorted(self.splits)) == (
            other.model_name, other.model_version, other.n_shards, sorted(other.splits))


def lineage_at(history: list, version: int | None = None) -> Lineage | None:
    """The lineage of the table's content at ``version`` (default: latest) from its history rows.

    Walks back over maintenance commits; None when a commit that changed rows was not made by
    encode (or by its rollback), since then nobody knows what the rows were made from.
    """
    for row in sorted(history, key=lambda r: -r["version"]):
        if version is not None and row["version"] > version:
            continue
        lineage = Lineage.from_json(row["userMetadata"])
        if lineage is not None:
            return lineage
        if row["operation"] not in MAINTENANCE_OPERATIONS:
            return None
    return None


@dataclass(frozen=True)
class EncodePlan:
    """What one encode run does.

    mode: "none" (write nothing), "append" (encode the rows of ``added_files``, URIs of data files),
    "compare" (upsert rows whose fingerprint changed, delete rows gone from the embeddings),
    "full" (re-encode every row, replace the table in one commit).
    """

    mode: str
    reason: str
    added_files: tuple[str, ...] = field(default=())


def plan_encode(requested: Lineage, current: Lineage | None, mode: str,
                appended: tuple[tuple[str, ...] | None, str] | None) -> EncodePlan:
    """Decide what to do.

    requested: the lineage this run would write (the model to use, the embeddings version to
    read). current: the lineage of the code table's content, None when there is no table or its
    content was changed by something else than encode. appended: what versions
    current.embeddings_version + 1 .. requested.embeddings_version of the embeddings table did
    (``delta_tables.files_appended``): (the data files they added, why) where they only added
    files, (None, why) where they changed rows otherwise; None if that is not known.
    """
    if mode not in ENCODE_MODES:
        raise AudiohashError(f"config key 'encode.mode' must be one of {list(ENCODE_MODES)}, got {mode!r}")
    if mode == "full":
        return EncodePlan("full", "encode.mode=full")
    if current is None:
        return EncodePlan("full", "no code table written by encode yet")
    if not requested.same_index(current):
        changes = [f"{name} {getattr(current, name)!r} -> {getattr(requested, name)!r}"
                   for name in ("model_name", "model_version", "n_shards", "splits")
                   if getattr(current, name) != getattr(requested, name)]
        return EncodePlan("full", "full reindex: " + ", ".join(changes))
    if requested.embeddings_table_id != current.embeddings_table_id:
        return EncodePlan("compare", f"the embeddings table is not the one last encoded (Delta table id "
                                     f"{current.embeddings_table_id or '?'} -> {requested.embeddings_table_id})")
    if requested.embeddings_version == current.embeddings_version:
        return EncodePlan("none", f"embeddings table unchanged since version {current.embeddings_version}")
    if requested.embeddings_version < current.embeddings_version:
        return EncodePlan("compare", f"embeddings version {requested.embeddings_version} is older than the "
                                     f"encoded version {current.embeddings_version}")
    if appended is None:
        return EncodePlan("compare", f"embeddings log after version {current.embeddings_version} not usable "
                                     f"(cleaned up, not on local storage, or the table is partitioned or "
                                     f"column-mapped)")
    added, why = appended
    if added is None:
        return EncodePlan("compare", why)
    if not added:
        return EncodePlan("none", f"no rows added since embeddings version {current.embeddings_version}")
    return EncodePlan("append", why, tuple(added))
