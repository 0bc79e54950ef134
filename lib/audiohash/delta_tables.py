"""Delta tables without a JVM: the one module that reads a table's state and history and commits
files that tasks wrote, on delta-rs's public Python API (``deltalake``).

What the jobs decide by, of a version: its number, the table's id, reader protocol, partitioning,
properties and data files (``TableState``); the commits' metadata, where each encode keeps its
lineage (``history``); which files were appended between two versions (``appended_files``); and
one atomic commit of Parquet files written by Spark tasks or by this process (``commit_files``).
Spark's own Delta reader and writer (delta-spark: MERGE, RESTORE, OPTIMIZE, VACUUM) work on the
same tables; tests/test_delta_tables.py checks each table shape written by one engine is read,
appended and time-travelled by the other.

Only local tables (a path, or a ``file:`` URI) are handled here; the Spark layer reads the state of
a table on other storage through delta-spark's public ``DeltaTable`` and writes it with Spark's
writer (``spark.tables``). Nothing here parses the Delta log itself.
"""
from __future__ import annotations

import json
import logging
import os
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from audiohash.errors import AudiohashError

log = logging.getLogger("audiohash.delta")

# The protocol ``commit_files`` creates tables with and the only one it adds files to: no table
# feature (deletion vectors, column mapping, ...) a file written by a task would have to honour.
PLAIN_PROTOCOL = (1, 2)


class ConcurrentCommitError(AudiohashError):
    """Another writer committed to the table after this run read it; nothing of this run remains."""


def local_path(table: str) -> str | None:
    """The absolute local path of a table given as a path or a ``file:`` URI; None for other storage."""
    parsed = urllib.parse.urlparse(table)
    if parsed.scheme == "file":
        return os.path.abspath(urllib.parse.unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # s3a://, hdfs://, abfss://... (one letter: a drive)
        return None
    return os.path.abspath(table)


def file_uri(path: str) -> str:
    """A local path as Spark and Hadoop print its URI: file:/abs/path, not percent-encoded (the form
    of ``DataFrame.inputFiles``; pyarrow's ``FileSystem.from_uri`` reads it)."""
    return "file:" + os.path.abspath(path)


@dataclass(frozen=True)
class TableState:
    """What a reader decides by, of one version of a Delta table."""

    version: int
    table_id: str  # the id a table keeps for life (a table created anew at the same path gets another)
    min_reader_version: int
    min_writer_version: int
    partition_columns: list[str]
    properties: dict[str, str]
    schema: dict  # Delta's schema JSON ({"type": "struct", "fields": [...]})
    # The version's data files as file: URIs, and their sizes in bytes; None where the state was read
    # through Spark (a table on other storage: Spark lists the files when it reads them).
    files: tuple[str, ...] | None = None
    sizes: tuple[int, ...] | None = None
    # Each file's partition values ({column: value}), in the order of ``files``; None with files None.
    partitions: tuple[dict, ...] | None = None


def _open(path: str, version: int | None = None):
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(path) if version is None else DeltaTable(path, version=version)
    except TableNotFoundError:
        raise AudiohashError(f"{path} is not a Delta table (no Delta log there)") from None
    except Exception as exc:  # a version that does not exist (or was cleaned up)
        raise AudiohashError(f"cannot read Delta table {path} at version {version}: {exc}") from None


def is_table(path: str) -> bool:
    from deltalake import DeltaTable

    return DeltaTable.is_deltatable(path)


def table_state(path: str, version: int | None = None) -> TableState:
    """The state of the local Delta table at ``path``: its latest version, or ``version``."""
    return _state(_open(path, version))


def _state(table) -> TableState:
    protocol, metadata = table.protocol(), table.metadata()
    adds = pa.table(table.get_add_actions(flatten=True))
    columns = list(metadata.partition_columns)
    values = adds.select([f"partition.{c}" for c in columns]).to_pylist() if columns else [{}] * adds.num_rows
    root = local_path(table.table_uri)
    files = tuple(file_uri(os.path.join(root, urllib.parse.unquote(p))) for p in adds.column("path").to_pylist())
    return TableState(int(table.version()), metadata.id, int(protocol.min_reader_version),
                      int(protocol.min_writer_version), columns, dict(metadata.configuration),
                      json.loads(table.schema().to_json()), files,
                      tuple(int(s) for s in adds.column("size_bytes").to_pylist()),
                      tuple({c: v[f"partition.{c}"] for c in columns} for v in values))


def history(path: str, limit: int | None = None) -> list[dict]:
    """The table's commits, newest first: version, operation, userMetadata (None where unset),
    operationMetrics ({} where unset), as delta-spark's ``DescribeHistory`` names them."""
    rows = _open(path).history(limit)
    return [{"version": int(r["version"]), "operation": r.get("operation"), "userMetadata": r.get("userMetadata"),
             "operationMetrics": r.get("operationMetrics") or {}} for r in rows]


def appended_files(path: str, after: int, upto: int,
                   now: TableState | None = None) -> tuple[tuple[str, ...] | None, str]:
    """What versions after+1 .. upto of the local table did: ``files_appended`` of their states.
    ``now``: the state of version ``upto`` where the caller has read it already (not read again)."""
    if now is None or now.version != upto:
        now = table_state(path, upto)
    return files_appended(table_state(path, after), now)


def files_appended(before: TableState, now: TableState) -> tuple[tuple[str, ...] | None, str]:
    """(the data files ``now`` has that ``before`` had not, why) where the versions in between only
    added files; (None, why) where a file of ``before`` is gone (rows removed or rewritten: DELETE,
    MERGE, OPTIMIZE, an overwrite), the schema, partitioning or settings changed, or the reader
    protocol has features (deletion vectors, column mapping: a file's rows are not the table's):
    then rows may have changed anywhere. Compares two versions' states, so it needs neither the
    change data feed nor the log entries in between."""
    if (before.schema, before.partition_columns, before.properties) != (now.schema, now.partition_columns,
                                                                        now.properties):
        return None, "the embeddings table's schema or settings changed"
    if now.min_reader_version != 1:
        return None, "the embeddings table's reader protocol has features (deletion vectors, column mapping)"
    kept = set(now.files)
    if any(f not in kept for f in before.files):
        return None, "rows were removed or rewritten in the embeddings table"
    old = set(before.files)
    added = tuple(f for f in now.files if f not in old)
    return added, f"{len(added)} file(s) appended to the embeddings table"


def same_layout(state: TableState, schema: pa.Schema, partition_column: str) -> bool:
    """Whether files of ``schema`` partitioned by ``partition_column`` can be committed to the table
    as they are: same columns and types, same partitioning, plain protocol, no settings."""
    from deltalake import Schema

    return (_fields(state.schema) == _fields(json.loads(Schema.from_arrow(schema).to_json()))
            and state.partition_columns == [partition_column]
            and (state.min_reader_version, state.min_writer_version) == PLAIN_PROTOCOL and not state.properties)


def _fields(schema: dict) -> list[tuple]:
    return [(f["name"], json.dumps(f["type"], sort_keys=True), f.get("nullable", True)) for f in schema["fields"]]


def commit_files(path: str, schema: pa.Schema, partition_column: str, replace: bool, user_metadata: str,
                 write_files: Callable[[], list[dict]],
                 commit_if: Callable[[], bool] = lambda: True) -> tuple[int, list[dict]] | None:
    """Have ``write_files`` write Parquet data files into the local table at ``path`` (one dict per
    file: path relative to the table, partition value, size, rows; ``table_files.write_partitioned``)
    and commit them in one transaction whose read version is the one seen before they were written:
    as the table's whole content (``replace``: every file of that version is removed in the same
    commit) or added to it; creates the table (protocol 1/2, no settings) if there is none.
    ``user_metadata`` goes into the commit (``history``'s userMetadata). Returns (version, files).

    Returns None, writing nothing, where the table exists with another layout (``same_layout``:
    the caller then writes through Spark's writer), and None after deleting the files when
    ``commit_if()``, asked once they are written, says no. Raises ``ConcurrentCommitError`` naming
    the version another writer committed in between (the files are deleted first): the commit is
    never retried on top of a version this run did not read, since a replace would keep the other
    run's files and an append could duplicate its rows. A run stopped before the commit leaves only
    unreferenced files, as Spark's writer does (VACUUM removes them)."""
    from deltalake import CommitProperties, Schema
    from deltalake.exceptions import CommitFailedError, DeltaError
    from deltalake.transaction import AddAction, create_table_with_add_actions

    root = local_path(path)
    if root is None:
        raise AudiohashError(f"{path}: commit_files writes local tables only")
    table = _open(root) if is_table(root) else None
    read_version = None if table is None else int(table.version())
    if table is not None and not same_layout(_state(table), schema, partition_column):
        return None
    files = write_files()

    def delete_files() -> None:
        for f in files:
            try:
                os.remove(os.path.join(root, f["path"]))
            except FileNotFoundError:
                pass

    if not commit_if():
        delete_files()
        log.info("%s: %d files written, not committed (commit_if said no): deleted", path, len(files))
        return None
    now = int(time.time() * 1000)
    actions = [AddAction(f["path"], int(f["size"]), {partition_column: str(f["partition"])}, now, True,
                         json.dumps({"numRecords": int(f["rows"])})) for f in files]
    properties = CommitProperties(custom_metadata={"userMetadata": user_metadata} if user_metadata else None,
                                  max_commit_retries=0)
    try:
        if table is None:
            create_table_with_add_actions(root, Schema.from_arrow(schema), actions, mode="error",
                                          partition_by=[partition_column], commit_properties=properties)
            return 0, files
        table.create_write_transaction(actions, "overwrite" if replace else "append", schema, [partition_column],
                                       commit_properties=properties)
    except (CommitFailedError, DeltaError) as exc:
        delete_files()
        latest = int(_open(root).version()) if is_table(root) else None
        if latest is not None and latest != (-1 if read_version is None else read_version):
            raise ConcurrentCommitError(
                f"Delta table {path}: another writer committed version {latest} while this run was writing "
                f"(it had read {'no table' if read_version is None else f'version {read_version}'}); this "
                f"run's {len(files)} files were deleted and nothing of it was committed. Run it again: it "
                f"will start from version {latest}") from None
        raise AudiohashError(f"Delta table {path}: commit failed ({exc}); this run's files were deleted") from None
    return read_version + 1, files
