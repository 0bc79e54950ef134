"""Reading a Delta table version's data files without the JVM: which versions qualify, how their
files are grouped into tasks, and the reader (pyarrow) a task runs over its group.

Moving rows from Spark's reader into Python workers costs more than reading the same Parquet
files with pyarrow (benchmarks/embedding_transfer.py; the query scan and the encode read both
measured it), so where a version's files hold exactly its rows the tasks read them directly.
The encode tasks also write code files here (``write_partitioned``); the Spark layer commits them
(``delta_tables.commit_files``).
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Parquet bytes one task reads at most when several tasks per core are needed: the query scan
# holds a task's codes in memory (Spark's spark.sql.files.maxPartitionBytes default); the encode
# read streams its rows in batches, so its tasks can be larger (fewer tasks, each started once).
SCAN_TASK_BYTES = 128 << 20
ENCODE_TASK_BYTES = 1 << 30


def direct_readable(min_reader_version: int, partition_columns: list[str], uris: list[str],
                    columns: Iterable[str]) -> bool:
    """Whether a table version's data files can be read as plain Parquet by pyarrow: reader
    protocol 1 (no deletion vectors, column mapping or type widening: the files' rows and columns
    are the table's), ``columns`` stored in the files (not partition values), local files."""
    return (min_reader_version == 1 and not set(columns) & set(partition_columns)
            and all(uri.startswith("file:") for uri in uris))


def read_parquet_files(uris: Iterable[str], columns: list[str], batch_rows: int | None = None) -> Iterator[pa.RecordBatch]:
    """The record batches of ``columns`` of Parquet data files, given as URIs (file:/...): each
    file whole (``batch_rows`` None) or streamed in batches of at most ``batch_rows`` rows."""
    import pyarrow.parquet as pq
    from pyarrow import fs

    for uri in uris:
        filesystem, path = fs.FileSystem.from_uri(uri)
        if batch_rows is None:
            yield from pq.read_table(path, columns=columns, filesystem=filesystem).to_batches()
        else:
            with pq.ParquetFile(filesystem.open_input_file(path)) as parquet:
                yield from parquet.iter_batches(batch_size=batch_rows, columns=columns)


def count_in_files(uris: Iterable[str], column: str, values: pa.Array) -> int:
    """How many rows of Parquet data files hold one of ``values`` in ``column`` (nulls never
    match): e.g. how many appended clip ids a code table already holds."""
    return sum(pc.sum(pc.is_in(batch.column(0), value_set=values)).as_py() or 0
               for batch in read_parquet_files(uris, [column]))


def write_partitioned(batches: Iterable[pa.RecordBatch], table_uri: str, partition_column: str,
                      name: str) -> list[dict]:
    """Write rows as Parquet data files of the table at ``table_uri`` (file:/...), one file per value
    of ``partition_column`` (integers), in Delta's Hive layout: ``<column>=<value>/<name>.parquet``,
    the column itself not stored. ``name`` must be unique per writer (files are never overwritten
    in place). Returns one dict per file: path (relative to the table), partition value, size
    (bytes), rows."""
    import pyarrow.parquet as pq
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(table_uri)
    writers: dict[int, tuple[str, pq.ParquetWriter]] = {}
    rows: dict[int, int] = {}
    try:
        for batch in batches:
            values = batch.column(partition_column).to_numpy(zero_copy_only=False)
            data = batch.drop_columns([partition_column])
            for value in np.unique(values).tolist():
                part = data.filter(pa.array(values == value))
                if value not in writers:
                    relative = f"{partition_column}={value}/{name}.parquet"
                    filesystem.create_dir(f"{root}/{partition_column}={value}", recursive=True)
                    writers[value] = (relative, pq.ParquetWriter(f"{root}/{relative}", data.schema,
                                                                 filesystem=filesystem, compression="snappy"))
                    rows[value] = 0
                writers[value][1].write_batch(part)
                rows[value] += part.num_rows
    finally:
        for _, writer in writers.values():
            writer.close()
    return [{"path": relative, "partition": value, "size": filesystem.get_file_info(f"{root}/{relative}").size,
             "rows": rows[value]} for value, (relative, _) in sorted(writers.items())]


def balance_files(sizes: list[int], cores: int, max_task_bytes: int = SCAN_TASK_BYTES) -> list[list[int]]:
    """Indexes of data files (by byte size) grouped into tasks of similar total size: one task
    per core while that keeps a task under ``max_task_bytes`` of files (a second wave of tasks
    would leave cores idle behind a straggler), else whole waves of one task per core, so that a
    task's rows fit its worker's memory. Largest file first, each to the lightest task so far;
    a file is never split, and no task is empty."""
    cores = max(1, cores)
    waves = max(1, -(-sum(sizes) // (cores * max_task_bytes)))
    groups: list[list[int]] = [[] for _ in range(max(1, min(cores * waves, len(sizes))))]
    loads = [0] * len(groups)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        g = loads.index(min(loads))
        groups[g].append(i)
        loads[g] += sizes[i]
    return [sorted(g) for g in groups if g]
