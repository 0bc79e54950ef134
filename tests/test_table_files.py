"""Reading a Delta version's data files without the JVM: eligibility, task groups, the reader."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from audiohash.table_files import balance_files, direct_readable, read_parquet_files


def test_direct_reads_only_plain_local_parquet_and_balance_the_files():
    local = ["file:/lake/codes/shard=0/a.parquet", "file:/lake/codes/shard=1/b.parquet"]
    assert direct_readable(1, ["shard"], local, ["clip_id", "code"])
    assert not direct_readable(3, ["shard"], local, ["clip_id", "code"])  # deletion vectors, column mapping, ...
    assert not direct_readable(1, ["clip_id"], local, ["clip_id", "code"])  # a column that is no file's
    assert not direct_readable(1, [], local + ["s3a://bucket/codes/c.parquet"], ["clip_id", "code"])
    sizes = [5, 1, 4, 2, 3, 3]
    groups = balance_files(sizes, 2)  # small: one task per core
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert [sum(sizes[i] for i in g) for g in groups] == [9, 9]
    assert balance_files([7, 7], 4) == [[0], [1]] and balance_files([], 2) == []
    # Large: whole waves of tasks of at most max_task_bytes (when the files allow).
    assert len(balance_files(sizes, 2, max_task_bytes=5)) == 4
    assert len(balance_files([3] * 12, 2, max_task_bytes=10)) == 4


def test_read_parquet_files_whole_or_streamed_gives_the_same_rows(tmp_path):
    uris, expected = [], []
    for n, rows in enumerate([250, 0, 1031]):  # an empty file too; a name Spark would URL-encode
        table = pa.table({"clip_id": [f"f{n}-{i}" for i in range(rows)], "x": np.arange(rows, dtype=np.int64),
                          "unused": np.zeros(rows)})
        path = tmp_path / f"part {n}.parquet"
        pq.write_table(table, path, row_group_size=400)
        uris.append("file:" + str(path).replace(" ", "%20"))
        expected += table.column("clip_id").to_pylist()
    whole = list(read_parquet_files(uris, ["clip_id", "x"]))
    streamed = list(read_parquet_files(uris, ["clip_id", "x"], batch_rows=100))
    assert max(b.num_rows for b in streamed) == 100 and all(b.schema.names == ["clip_id", "x"] for b in streamed)
    for batches in (whole, streamed):
        assert [v for b in batches for v in b.column("clip_id").to_pylist()] == expected


def test_count_in_files_counts_rows_holding_one_of_the_values(tmp_path):
    from audiohash.table_files import count_in_files

    uris = []
    for n, ids in enumerate([["a", "b", None, "c"], [], ["c", "d", "a"]]):
        path = tmp_path / f"part-{n}.parquet"
        pq.write_table(pa.table({"clip_id": pa.array(ids, pa.string()), "x": np.arange(len(ids))}), path)
        uris.append(f"file:{path}")
    assert count_in_files(uris, "clip_id", pa.array(["a", "c", "zz"])) == 4  # a twice, c twice
    assert count_in_files(uris, "clip_id", pa.array(["zz"])) == 0
    assert count_in_files(uris, "clip_id", pa.array([], pa.string())) == 0
    assert count_in_files([], "clip_id", pa.array(["a"])) == 0


def test_write_partitioned_writes_one_file_per_value_without_the_column(tmp_path):
    from audiohash.table_files import write_partitioned

    batches = [pa.RecordBatch.from_pydict({"clip_id": ["a", "b", "c"], "shard": pa.array([1, 0, 1], pa.int32())}),
               pa.RecordBatch.from_pydict({"clip_id": ["d"], "shard": pa.array([1], pa.int32())})]
    files = write_partitioned(iter(batches), f"file:{tmp_path}", "shard", "part-00000-x")
    assert [(f["path"], f["partition"], f["rows"]) for f in files] == [
        ("shard=0/part-00000-x.parquet", 0, 1), ("shard=1/part-00000-x.parquet", 1, 3)]
    for f in files:
        table = pq.read_table(tmp_path / f["path"])
        assert table.schema.names == ["clip_id"] and f["size"] == (tmp_path / f["path"]).stat().st_size > 0
    assert pq.read_table(tmp_path / "shard=1/part-00000-x.parquet").column("clip_id").to_pylist() == ["a", "c", "d"]
    assert write_partitioned(iter([]), f"file:{tmp_path}", "shard", "part-empty") == []
