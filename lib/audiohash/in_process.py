"""The encode and query stages in one process, without Spark or a JVM: the parity reference of the
Spark jobs in tests and benchmarks, and the reader a Spark-less search builds on.

The same pieces as the Spark tasks, run in a loop instead of tasks: the reader (a Delta version's
data files as delta-rs lists them, read with pyarrow: ``version_state``, ``file_batches``), the
mappers (``encoding.encode_batch``, ``ranking.scan_partition``), the driver's merge
(``ranking.merge_topk``) and the same checks (the extractor the model was trained on, the model
the code table's lineage names). Only versions whose files are plain Parquet on local storage
(``table_files.direct_readable``) are read this way; any other is refused, naming the table and why.
"""
from __future__ import annotations

import datetime as dt
import uuid
from typing import Iterator

import numpy as np
import pyarrow as pa

from audiohash import delta_tables, ivf
from audiohash.bundle import ModelBundle, refuse_other_extractor
from audiohash.encoding import (HISTORY_DEPTH, Lineage, code_table_batch, encode_batch, lineage_at,
                                select_splits)
from audiohash.errors import AudiohashError
from audiohash.ranking import check_lineage, merge_topk, scan_partition
from audiohash.schemas import CODES_DDL, ENCODE_INPUT_COLUMNS, ENCODED_DDL, arrow_schema
from audiohash.table_files import direct_readable, read_parquet_files, write_partitioned

CODE_COLUMNS = ["clip_id", "code"]  # what a scan reads of the code table


def local_table(table: str) -> str:
    """The local path of a table this runner reads or writes; AudiohashError for other storage."""
    local = delta_tables.local_path(table)
    if local is None:
        raise AudiohashError(f"Delta table {table} is not on local storage: only the Spark jobs read and write it")
    return local


def version_state(table: str, version: int | None, columns: list[str]) -> delta_tables.TableState:
    """The state of a local Delta table's version (latest: None) whose data files hold ``columns``
    as plain Parquet; AudiohashError naming the table and the reason for any other."""
    state = delta_tables.table_state(local_table(table), version)
    if not direct_readable(state.min_reader_version, state.partition_columns, list(state.files), columns):
        raise AudiohashError(
            f"Delta table {table} version {state.version}: its data files are not plain Parquet holding "
            f"{columns} (reader protocol {state.min_reader_version}, partitioned by {state.partition_columns}), "
            f"so only the Spark jobs read it (Delta's reader applies deletion vectors and column mapping)")
    return state


def encode_columns(splits) -> list[str]:
    """Columns an encode task reads from the embeddings files: the split only to select rows by it."""
    return [*ENCODE_INPUT_COLUMNS, "split"] if splits else ENCODE_INPUT_COLUMNS


def file_batches(uris: list[str], splits: tuple[str, ...], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """The encode input (``ENCODE_INPUT_COLUMNS``) of embeddings files, the rows of ``splits`` only
    (all if empty), in batches of at most ``batch_rows`` rows."""
    for batch in read_parquet_files(uris, encode_columns(splits), batch_rows):
        yield select_splits(batch, splits).select(ENCODE_INPUT_COLUMNS)


def encode_table(embeddings_table: str, bundle: ModelBundle, n_shards: int, splits: tuple[str, ...] = (),
                 version: int | None = None, batch_rows: int = 65536) -> tuple[pa.Table, delta_tables.TableState]:
    """Rows of ``schemas.ENCODED_DDL`` (clip_id, shard, code, label, source_hash) for every
    encodable row of the embeddings table's version (latest: None) in ``splits``, in file order,
    and the state of the version read. Embeddings of another extractor than the bundle's are refused."""
    state = version_state(embeddings_table, version, encode_columns(splits))
    first = next((b for b in read_parquet_files(state.files, ["extractor_version"]) if b.num_rows), None)
    refuse_other_extractor(first.column(0)[0].as_py() if first is not None else None, bundle, embeddings_table)
    batches = [encode_batch(b, bundle.quantizer, n_shards) for b in file_batches(state.files, splits, batch_rows)]
    schema = arrow_schema(ENCODED_DDL)
    return pa.Table.from_batches([b.cast(schema) for b in batches], schema), state


def write_code_table(codes_table: str, encoded: pa.Table, lineage: Lineage) -> int:
    """Replace the content of a local code table (created if absent) by ``encoded`` rows
    (``schemas.ENCODED_DDL``) in one commit that carries ``lineage``, as the encode job's full run
    writes it (one Parquet file per shard, ``delta_tables.commit_files``). Returns the version."""
    local = local_table(codes_table)
    encoded_at = dt.datetime.now(dt.timezone.utc)
    name = f"part-00000-{uuid.uuid4().hex}"

    def write_files() -> list[dict]:
        batches = (code_table_batch(b, lineage, encoded_at) for b in encoded.to_batches())
        return write_partitioned(batches, delta_tables.file_uri(local), "shard", name)

    committed = delta_tables.commit_files(local, arrow_schema(CODES_DDL), "shard", True, lineage.to_json(),
                                          write_files)
    if committed is None:
        raise AudiohashError(f"code table {codes_table} has another schema or layout than the encode job writes; "
                             f"only jobs/encode.py (Spark's writer) replaces it")
    return committed[0]


def encode_into(embeddings_table: str, codes_table: str, bundle: ModelBundle, n_shards: int,
                splits: tuple[str, ...] = (), batch_rows: int = 65536) -> int:
    """The encode stage's full run in this process: every encodable row of the embeddings table's
    latest version in ``splits`` (all if empty) -> the code table's whole content, with its lineage.
    Returns the code table's version."""
    encoded, state = encode_table(embeddings_table, bundle, n_shards, splits, None, batch_rows)
    lineage = Lineage(bundle.model_name, bundle.model_version, n_shards, tuple(splits), embeddings_table,
                      state.version, state.table_id)
    return write_code_table(codes_table, encoded, lineage)


def code_table_lineage(codes_table: str, version: int | None = None) -> tuple[int, Lineage | None]:
    """(version, the lineage of its content: ``encoding.lineage_at``) of a local code table."""
    history = delta_tables.history(local_table(codes_table), HISTORY_DEPTH)
    version = max(r["version"] for r in history) if version is None else version
    return version, lineage_at(history, version)


def search_table(codes_table: str, bundle: ModelBundle, queries: np.ndarray, k: int, version: int | None = None,
                 nprobe: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """Top-k of every query over one version (latest: None) of a local code table, as the query
    job ranks them: D float32 (nq, k'), clip ids object (nq, k') by (distance, clip_id), and the
    version scanned. queries: float32 (nq, d) embeddings. Codes of another model are refused.
    nprobe > 0, for a model with lists: only the codes of each query's ``nprobe`` nearest lists."""
    version, lineage = code_table_lineage(codes_table, version)
    check_lineage(lineage, codes_table, version, bundle)
    quantizer = bundle.quantizer
    nprobe = min(nprobe, quantizer.nlist)
    columns = [*CODE_COLUMNS, "list_id"] if nprobe else CODE_COLUMNS
    state = version_state(codes_table, version, columns)
    query_side = quantizer.query_side(queries)
    probes = ivf.nearest_lists(query_side, quantizer.ivf_centroids, nprobe) if nprobe else None
    part = scan_partition(read_parquet_files(state.files, columns), quantizer, query_side, k, probes)
    D, ids = merge_topk([part], k)
    return D, ids, state.version
