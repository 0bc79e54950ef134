"""Embeddings computed elsewhere (PANNs, CLAP, ...) -> rows of the embeddings table: the pure core
of the extract job's "bring your own embeddings" path (``audiohash.spark.extract_external``).

No Spark here: pyarrow and numpy on files opened through pyarrow's filesystems (local paths,
``file:`` URIs, and the URIs pyarrow opens: s3://, gs://, hdfs://). Two layouts, as
rom1504/embedding-reader reads them:

- ``parquet``: one Parquet file, or a folder of them, with columns ``clip_id`` and ``embedding``
  (a list of numbers, any float or integer type, fixed-size or not) and optionally ``label``,
  ``split``, ``path``, ``source`` (other columns are ignored);
- ``npy``: a folder of ``NAME.npy`` matrices (n, d), each with ``NAME.parquet`` beside it holding
  the same n rows' ``clip_id`` and optional columns, row i of one describing row i of the other.

What is where:
- ``input_layout``: which layout a source is (None: not embeddings, i.e. an audio manifest or
  folder). ``list_pieces``: the files cut into row ranges from their headers, no rows read.
- ``read_clip_ids`` + ``plan_rows``: the driver's pass over the clip_id column only: rows rejected
  before their vectors are read (missing or duplicated clip_id) and rows skipped because the
  table already holds their clip_id for this version.
- ``external_rows``: one piece -> an Arrow batch of ``schemas.EXTRACT_OUTPUT_DDL``: one row per
  embedded row, one reject row (reasons 'missing_embedding', 'dimension', 'nan_embedding') per
  bad one; a bad row never fails the piece.
A reject's ``path`` is its locator, ``<file>#row=<n>`` (n counted from 0 in that file).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs

from audiohash.errors import AudiohashError
from audiohash.extraction import INPUT_COLUMNS, hadoop_path, text_value
from audiohash.schemas import EXTRACT_OUTPUT_DDL, arrow_schema

EXTRACTOR = "external"  # the embeddings table's ``extractor`` of these rows
META_COLUMNS = ["label", "split", "path", "source"]  # optional, kept as text
ROWS_PER_PIECE = 65536  # at most (whole Parquet row groups: a larger group is one piece)
OUTPUT_SCHEMA = arrow_schema(EXTRACT_OUTPUT_DDL)
REJECT_COLUMNS = [*INPUT_COLUMNS, "reject_reason", "reject_message"]
_PARQUET_SUFFIXES = (".parquet", ".pq")


def extractor_version(name: str) -> str:
    """The embeddings table's ``extractor_version`` of external embeddings named ``name``
    (``extract.external_version``): ``external-<name>``."""
    name = name.strip()
    if not name:
        raise AudiohashError("extract.external_version is empty: name the embeddings' model and version, "
                             "e.g. extract.external_version=clap-2023")
    return f"{EXTRACTOR}-{name}"


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one input file: ``file`` holds the embeddings (Parquet or .npy),
    ``metadata`` the clip ids (the paired Parquet of a .npy; None: ``file`` itself);
    ``row_groups``: the Parquet row groups of those rows (of ``metadata`` where set)."""

    file: str
    metadata: str | None
    start: int
    stop: int
    row_groups: tuple[int, ...]

    @property
    def ids_file(self) -> str:
        return self.metadata or self.file

    def locator(self, row: int) -> str:
        """Where row ``row`` of the file is, as written in the rejects table's ``path``."""
        return f"{hadoop_path(self.file)}#row={row}"


# ---- files --------------------------------------------------------------------------------
def _filesystem(path: str) -> tuple[fs.FileSystem, str]:
    if path.startswith("file:"):
        path = hadoop_path(path)[len("file:"):]
    if "://" not in path:
        return fs.LocalFileSystem(), os.path.abspath(path)
    try:
        return fs.FileSystem.from_uri(path)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise AudiohashError(f"extract input {path}: pyarrow cannot open it ({exc}); embeddings are read "
                             f"from local paths or s3://, gs://, hdfs:// URIs") from exc


def _info(path: str):
    try:
        filesystem, inner = _filesystem(path)
        return filesystem.get_file_info(inner)
    except (AudiohashError, pa.ArrowException, OSError, ValueError):
        return None


def _join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name


def _folder_files(folder: str) -> list[str]:
    """The files directly in ``folder``, sorted, without hidden ones (``.*``, ``_*``: _SUCCESS)."""
    filesystem, inner = _filesystem(folder)
    infos = filesystem.get_file_info(fs.FileSelector(inner, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == fs.FileType.File)
    return [_join(folder, n) for n in names if not n.startswith((".", "_"))]


def _parquet(path: str) -> pq.ParquetFile:
    filesystem, inner = _filesystem(path)
    try:
        return pq.ParquetFile(filesystem.open_input_file(inner))
    except (pa.ArrowException, OSError) as exc:
        raise AudiohashError(f"{path}: cannot read it as Parquet: {exc}") from exc


def input_layout(source: str) -> str | None:
    """'parquet' for a Parquet file with an ``embedding`` column or a folder whose first Parquet
    file has one; 'npy' for a folder holding .npy files; None otherwise (an audio manifest or
    folder, or a location pyarrow cannot open: the audio path reports on it)."""
    info = _info(source)
    if info is None or info.type == fs.FileType.NotFound:
        return None
    if info.type == fs.FileType.File:
        if not source.lower().endswith(_PARQUET_SUFFIXES):
            return None
        return "parquet" if "embedding" in _parquet(source).schema_arrow.names else None
    files = _folder_files(source)
    if any(f.lower().endswith(".npy") for f in files):
        return "npy"
    parquets = [f for f in files if f.lower().endswith(_PARQUET_SUFFIXES)]
    return "parquet" if parquets and "embedding" in _parquet(parquets[0]).schema_arrow.names else None


def _npy_header(path: str) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, offset of the data) of a .npy file, from its header only."""
    filesystem, inner = _filesystem(path)
    with filesystem.open_input_file(inner) as f:
        try:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except (ValueError, OSError) as exc:
            raise AudiohashError(f"{path}: not a .npy file ({exc})") from exc
        return shape, dtype, fortran, f.tell()


def _grouped(path: str, rows_per_piece: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """Consecutive row groups of a Parquet file, grouped up to ``rows_per_piece`` rows:
    (start, stop, row group indices)."""
    meta = _parquet(path).metadata
    out, start, groups, n = [], 0, [], 0
    for g in range(meta.num_row_groups):
        rows = meta.row_group(g).num_rows
        if groups and n + rows > rows_per_piece:
            out.append((start, start + n, tuple(groups)))
            start, groups, n = start + n, [], 0
        groups.append(g)
        n += rows
    if groups:
        out.append((start, start + n, tuple(groups)))
    return out


def list_pieces(source: str, layout: str, rows_per_piece: int = ROWS_PER_PIECE) -> list[Piece]:
    """The input's row ranges, from file headers only. Raises AudiohashError naming the file for a
    .npy without its .parquet, a .npy that is not a 2-D numeric matrix, or row counts that differ."""
    if layout == "parquet":
        info = _info(source)
        if info is not None and info.type == fs.FileType.File:
            files = [source]
        else:
            files = [f for f in _folder_files(source) if f.lower().endswith(_PARQUET_SUFFIXES)]
        for f in files:  # each file's columns, from its footer: a wrong one stops the job before any write
            schema = _parquet(f).schema_arrow
            if "embedding" not in schema.names:
                raise AudiohashError(f"{f}: no 'embedding' column (columns: {schema.names}); every Parquet file of "
                                     f"the input needs clip_id and embedding")
            _list_column(pa.nulls(0, schema.field("embedding").type), f)
        return [Piece(f, None, a, b, g) for f in files for a, b, g in _grouped(f, rows_per_piece)]
    if layout != "npy":
        raise AudiohashError(f"extract input {source}: unknown embeddings layout {layout!r}")
    files = _folder_files(source)
    names = {os.path.basename(f): f for f in files}
    pieces = []
    for f in files:
        if not f.lower().endswith(".npy"):
            continue
        stem = os.path.basename(f)[:-len(".npy")]
        metadata = names.get(stem + ".parquet") or names.get(stem + ".pq")
        if metadata is None:
            raise AudiohashError(f"{f}: no {stem}.parquet beside it; each NAME.npy needs a NAME.parquet with "
                                 f"the clip_id (and optional label, split, path, source) of its rows, in order")
        shape, dtype, _, _ = _npy_header(f)
        if len(shape) != 2 or dtype.kind not in "fiu":
            raise AudiohashError(f"{f}: expected a 2-D numeric matrix (rows, dimension), got shape {shape} "
                                 f"of {dtype}")
        n_meta = _parquet(metadata).metadata.num_rows
        if n_meta != shape[0]:
            raise AudiohashError(f"{f}: {shape[0]} rows, but {metadata} has {n_meta}; row i of one must "
                                 f"describe row i of the other")
        pieces += [Piece(f, metadata, a, b, g) for a, b, g in _grouped(metadata, rows_per_piece)]
    return pieces


def locator_prefix(source: str) -> str:
    """What every locator of the source's rows starts with (``Piece.locator``): the file's own
    ``<file>#``, or ``<folder>/``."""
    info = _info(source)
    location = hadoop_path(source).rstrip("/")
    return location + ("#" if info is not None and info.type == fs.FileType.File else "/")


# ---- plan (driver: the clip_id column only) ------------------------------------------------
def _text(column: pa.ChunkedArray | pa.Array) -> list:
    return [text_value(v) for v in column.to_pylist()]


def read_clip_ids(file: str) -> list:
    """The clip_id column of a Parquet file, as text (None for a null or empty one). Raises
    AudiohashError naming the file and its columns when it has none."""
    parquet = _parquet(file)
    if "clip_id" not in parquet.schema_arrow.names:
        raise AudiohashError(f"{file}: no 'clip_id' column (columns: {parquet.schema_arrow.names}); "
                             f"external embeddings need one unique clip_id per row")
    return _text(parquet.read(columns=["clip_id"]).column("clip_id"))


def plan_rows(pieces: list[Piece], ids: dict[str, list], taken: set) -> tuple[dict[int, np.ndarray], pd.DataFrame, int]:
    """Which rows never reach the executors, from the clip ids alone.

    ids: clip ids of each ``Piece.ids_file`` (``read_clip_ids``). taken: clip ids the embeddings
    table holds for this extractor version. A clip_id listed twice or more rejects every copy
    ('duplicate_clip_id': which copy is right cannot be told); a null or empty one rejects its row
    ('missing_clip_id'); a taken one is skipped, duplicated or not (its table row stands).
    Returns ({piece index: sorted rows of its file left out}, rejects (``REJECT_COLUMNS``),
    number of rows skipped).
    """
    frame = pd.concat([pd.DataFrame({"clip_id": pd.Series(ids[f], dtype=object), "file": f,
                                     "row": np.arange(len(ids[f]))}) for f in dict.fromkeys(p.ids_file for p in pieces)],
                      ignore_index=True) if pieces else pd.DataFrame({"clip_id": [], "file": [], "row": []})
    skipped = frame["clip_id"].isin(taken)
    missing = frame["clip_id"].isna()
    duplicate = ~skipped & ~missing & frame["clip_id"].duplicated(keep=False)
    where = {p.ids_file: p for p in pieces}  # a piece of each file, for its locator
    rejects = []
    for i in np.flatnonzero(missing):
        f, row = frame.at[i, "file"], int(frame.at[i, "row"])
        rejects.append((None, where[f].locator(row), "missing_clip_id",
                        f"{f} row {row}: no clip_id; give every row a unique clip_id"))
    for clip_id, copies in frame[duplicate].groupby("clip_id", sort=True):
        places = ", ".join(f"{f} row {r}" for f, r in zip(copies["file"], copies["row"]))
        for f, row in zip(copies["file"], copies["row"]):
            rejects.append((clip_id, where[f].locator(int(row)), "duplicate_clip_id",
                            f"clip_id {clip_id!r} appears {len(copies)} times ({places}); every copy is rejected: "
                            f"keep one row per clip_id and rerun"))
    left_out = frame.loc[skipped | missing | duplicate, ["file", "row"]]
    by_file = {f: np.sort(rows.to_numpy(np.int64)) for f, rows in left_out.groupby("file")["row"]}
    excluded = {}
    for k, p in enumerate(pieces):
        rows = by_file.get(p.ids_file, np.zeros(0, np.int64))
        rows = rows[(rows >= p.start) & (rows < p.stop)]
        if len(rows):
            excluded[k] = rows
    out = pd.DataFrame([(c, loc, None, None, None, r, m) for c, loc, r, m in rejects],
                       columns=["clip_id", "path", "label", "split", "source", "reject_reason", "reject_message"])
    return excluded, out[REJECT_COLUMNS], int(skipped.sum())


def first_dimension(pieces: list[Piece]) -> int | None:
    """The input's dimension: that of its first non-null embedding (files in name order); None if
    it has none."""
    for piece in pieces:
        if piece.metadata is not None:  # a .npy: its header says
            return int(_npy_header(piece.file)[0][1])
        parquet = _parquet(piece.file)
        column_type = parquet.schema_arrow.field("embedding").type
        if pa.types.is_fixed_size_list(column_type):
            return column_type.list_size
        for batch in parquet.iter_batches(batch_size=1024, columns=["embedding"]):
            lengths = pc.list_value_length(_list_column(batch.column(0), piece.file)).drop_null()
            if len(lengths):
                return int(lengths[0].as_py())
    return None


# ---- the executors' worker -----------------------------------------------------------------
def _list_column(column: pa.Array, file: str) -> pa.Array:
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            or pa.types.is_fixed_size_list(column.type)) or not (
            pa.types.is_floating(column.type.value_type) or pa.types.is_integer(column.type.value_type)):
        raise AudiohashError(f"{file}: column 'embedding' is {column.type}; expected a list of numbers "
                             f"(e.g. list<float>)")
    return column


def _read_npy_rows(path: str, start: int, stop: int) -> np.ndarray:
    shape, dtype, fortran, offset = _npy_header(path)
    if fortran:  # rows are not contiguous: read it whole (rare: numpy writes C order)
        filesystem, inner = _filesystem(path)
        with filesystem.open_input_file(inner) as f:
            return np.load(pa.BufferReader(f.read()))[start:stop]
    filesystem, inner = _filesystem(path)
    row_bytes = dtype.itemsize * shape[1]
    with filesystem.open_input_file(inner) as f:
        f.seek(offset + start * row_bytes)
        data = f.read((stop - start) * row_bytes)
    return np.frombuffer(data, dtype=dtype).reshape(stop - start, shape[1])


def read_piece(piece: Piece) -> tuple[pa.Table, np.ndarray | pa.Array]:
    """(metadata: clip_id and the META_COLUMNS it has, embeddings: a (rows, d) matrix for a .npy,
    the ``embedding`` list column for Parquet) of the piece's rows."""
    parquet = _parquet(piece.ids_file)
    names = parquet.schema_arrow.names
    wanted = [c for c in ["clip_id", *META_COLUMNS] if c in names]
    if piece.metadata is None:
        table = parquet.read_row_groups(list(piece.row_groups), columns=[*wanted, "embedding"])
        return table.select(wanted), _list_column(table.column("embedding").combine_chunks(), piece.file)
    return parquet.read_row_groups(list(piece.row_groups), columns=wanted), _read_npy_rows(piece.file, piece.start,
                                                                                            piece.stop)


def _matrix(vectors: np.ndarray | pa.Array, rows: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(null (n,) bool, lengths (n,) int (0 where null), float32 (n, dim) with zeros where the row
    is null or of another length) of the n ``rows``."""
    n = len(rows)
    if isinstance(vectors, np.ndarray):
        null, lengths = np.zeros(n, bool), np.full(n, vectors.shape[1])
        x = vectors[rows].astype(np.float32) if vectors.shape[1] == dim else np.zeros((n, dim), np.float32)
        return null, lengths, x
    picked = vectors.take(pa.array(rows, pa.int64()))
    counted = pc.list_value_length(picked)
    null = np.asarray(counted.is_null().to_numpy(zero_copy_only=False), bool)
    lengths = np.asarray(counted.fill_null(0).to_numpy(zero_copy_only=False), np.int64)
    good = ~null & (lengths == dim)
    x = np.zeros((n, dim), np.float32)
    if good.any():
        # Null values inside a list become NaN here, and the row a 'nan_embedding' reject.
        flat = picked.filter(pa.array(good)).flatten()
        x[good] = flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    return null, lengths, x


def external_rows(piece: Piece, excluded: np.ndarray | None, dim: int) -> pa.RecordBatch:
    """One piece -> ``schemas.EXTRACT_OUTPUT_DDL`` rows: each row of the piece not in ``excluded``
    (rows of its file, ``plan_rows``) either embedded (offset_s 0, n_windows 1, embedding
    float32 (dim,)) or rejected: 'missing_embedding' (null), 'dimension' (not ``dim`` values),
    'nan_embedding' (NaN, inf or a null value). Rejects' path is their locator."""
    meta, vectors = read_piece(piece)
    rows = np.arange(piece.stop - piece.start)
    if excluded is not None and len(excluded):
        rows = np.setdiff1d(rows, np.asarray(excluded) - piece.start)
    null, lengths, x = _matrix(vectors, rows, dim)
    wrong = ~null & (lengths != dim)
    nan = ~null & ~wrong & ~np.isfinite(x).all(axis=1)
    ok = ~null & ~wrong & ~nan
    picked = meta.take(pa.array(rows, pa.int64()))
    clip_ids = _text(picked.column("clip_id"))
    text = {c: _text(picked.column(c)) if c in picked.column_names else [None] * len(rows) for c in META_COLUMNS}
    reason, message, path = [], [], []
    for k, row in enumerate(rows + piece.start):
        where = f"{piece.file} row {row} (clip_id {clip_ids[k]!r})"
        if ok[k]:
            reason.append(None), message.append(None), path.append(text["path"][k])
            continue
        path.append(piece.locator(int(row)))
        if null[k]:
            reason.append("missing_embedding"), message.append(f"{where}: no embedding; give one or drop the row")
        elif wrong[k]:
            reason.append("dimension")
            message.append(f"{where}: {lengths[k]} values, but the input's embeddings have {dim} (its first row's, or the "
                           f"table's); every row must have the same dimension")
        else:
            reason.append("nan_embedding"), message.append(f"{where}: NaN or inf in the embedding; fix or drop the row")
    offsets = np.concatenate([[0], np.cumsum(np.where(ok, dim, 0))]).astype(np.int32)
    embedding = pa.ListArray.from_arrays(pa.array(offsets), pa.array(x[ok].ravel(), pa.float32()),
                                         mask=pa.array(~ok))
    columns = {"clip_id": clip_ids, "path": path, "label": text["label"], "split": text["split"],
               "source": text["source"], "offset_s": pa.array(np.where(ok, 0.0, np.nan), mask=~ok),
               "embedding": embedding, "n_windows": pa.array(ok.astype(np.int32)),
               "reject_reason": reason, "reject_message": message}
    return pa.RecordBatch.from_arrays([pa.array(columns[f.name], f.type) if not isinstance(columns[f.name], pa.Array)
                                       else columns[f.name].cast(f.type) for f in OUTPUT_SCHEMA], schema=OUTPUT_SCHEMA)
