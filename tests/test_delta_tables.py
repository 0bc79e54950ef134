"""delta_tables: a table's state, history, appended files and commits of task-written files, without
a JVM (delta-rs); and interop with delta-spark both ways on the table shapes the jobs write."""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audiohash import delta_tables
from audiohash.delta_tables import ConcurrentCommitError, TableState, files_appended
from audiohash.errors import AudiohashError

SCHEMA = pa.schema([("clip_id", pa.string()), ("code", pa.binary()), ("shard", pa.int32())])


def file_writer(root, name: str, shard: int, n: int):
    """write_files for commit_files: one Parquet file of n rows in partition ``shard``."""
    def write():
        os.makedirs(f"{root}/shard={shard}", exist_ok=True)
        relative = f"shard={shard}/{name}.parquet"
        pq.write_table(pa.table({"clip_id": [f"{name}{i}" for i in range(n)], "code": [b"\x01\x02"] * n}),
                       f"{root}/{relative}")
        return [{"path": relative, "partition": shard, "size": os.path.getsize(f"{root}/{relative}"), "rows": n}]
    return write


def rows_of(root, version=None) -> list[str]:
    from deltalake import DeltaTable

    table = DeltaTable(str(root)) if version is None else DeltaTable(str(root), version=version)
    return sorted(table.to_pyarrow_table(columns=["clip_id"]).column("clip_id").to_pylist())


def state(files, schema=None, reader=1, properties=None, version=0) -> TableState:
    return TableState(version, "id-1", reader, 2, [], properties or {}, schema or {"fields": []},
                      tuple(files), tuple(1 for _ in files))


def test_files_appended_hand_worked():
    a, b, c = "file:/t/a.parquet", "file:/t/b.parquet", "file:/t/c.parquet"
    assert files_appended(state([a]), state([a, b, c])) == ((b, c), "2 file(s) appended to the embeddings table")
    assert files_appended(state([a]), state([a])) == ((), "0 file(s) appended to the embeddings table")
    assert files_appended(state([a, b]), state([a, c]))[0] is None  # b removed: DELETE, OPTIMIZE, overwrite
    assert "schema" in files_appended(state([a]), state([a, b], schema={"fields": [1]}))[1]
    assert "settings" in files_appended(state([a]), state([a, b], properties={"delta.appendOnly": "true"}))[1]
    assert "deletion vectors" in files_appended(state([a]), state([a, b], reader=3))[1]


def test_local_path_and_file_uri():
    assert delta_tables.local_path("file:/lake/codes") == "/lake/codes"
    assert delta_tables.local_path("/lake/codes") == "/lake/codes"
    assert delta_tables.local_path("lake/codes") == os.path.abspath("lake/codes")
    assert delta_tables.local_path("s3a://bucket/lake/codes") is None
    assert delta_tables.file_uri("/lake/codes/shard=1/a.parquet") == "file:/lake/codes/shard=1/a.parquet"


def test_commit_files_creates_appends_replaces_with_metadata(tmp_path):
    root = tmp_path / "codes"
    assert delta_tables.commit_files(str(root), SCHEMA, "shard", True, "L0", file_writer(root, "a", 0, 3))[0] == 0
    assert delta_tables.commit_files(str(root), SCHEMA, "shard", False, "L1", file_writer(root, "b", 1, 2))[0] == 1
    assert rows_of(root) == ["a0", "a1", "a2", "b0", "b1"]
    version, files = delta_tables.commit_files(str(root), SCHEMA, "shard", True, "L2", file_writer(root, "c", 1, 1))
    assert version == 2 and files[0]["rows"] == 1
    assert rows_of(root) == ["c0"] and rows_of(root, 1) == ["a0", "a1", "a2", "b0", "b1"]  # time travel
    now = delta_tables.table_state(str(root))
    assert (now.version, now.partition_columns, now.files) == (2, ["shard"], (f"file:{root}/shard=1/c.parquet",))
    assert [(h["version"], h["userMetadata"]) for h in delta_tables.history(str(root))] == [(2, "L2"), (1, "L1"),
                                                                                          (0, "L0")]
    assert delta_tables.appended_files(str(root), 0, 1) == ((f"file:{root}/shard=1/b.parquet",),
                                                            "1 file(s) appended to the embeddings table")
    assert delta_tables.appended_files(str(root), 1, 2)[0] is None


def test_commit_files_refuses_other_layouts_and_deletes_what_commit_if_declines(tmp_path):
    root = tmp_path / "codes"
    delta_tables.commit_files(str(root), SCHEMA, "shard", True, "", file_writer(root, "a", 0, 3))
    wrote = []
    other = SCHEMA.append(pa.field("extra", pa.int64()))
    assert delta_tables.commit_files(str(root), other, "shard", False, "", lambda: wrote.append(1) or []) is None
    assert not wrote  # another schema: nothing written, the caller goes through Spark's writer
    assert delta_tables.commit_files(str(root), SCHEMA, "shard", False, "", file_writer(root, "b", 1, 2),
                                     commit_if=lambda: False) is None
    assert not (root / "shard=1" / "b.parquet").exists() and delta_tables.table_state(str(root)).version == 0


def test_a_losing_concurrent_writer_names_the_winners_version_and_leaves_nothing(tmp_path):
    root = tmp_path / "codes"
    delta_tables.commit_files(str(root), SCHEMA, "shard", True, "", file_writer(root, "a", 0, 3))

    for replace in (True, False):
        def write_while_another_run_commits():
            files = file_writer(root, "mine", 0, 4)()
            delta_tables.commit_files(str(root), SCHEMA, "shard", False, "other",
                                      file_writer(root, f"theirs{int(replace)}", 1, 1))
            return files

        with pytest.raises(ConcurrentCommitError, match=r"another writer committed version \d+ while this run was "
                                                        r"writing \(it had read version \d+\).*Run it again"):
            delta_tables.commit_files(str(root), SCHEMA, "shard", replace, "mine", write_while_another_run_commits)
        assert not (root / "shard=0" / "mine.parquet").exists()
    assert "mine0" not in rows_of(root) and {"theirs00", "theirs10"} <= set(rows_of(root))
    assert [h["userMetadata"] for h in delta_tables.history(str(root))][:2] == ["other", "other"]


def test_state_of_a_missing_table_or_version_is_named(tmp_path):
    with pytest.raises(AudiohashError, match=f"{tmp_path / 'nowhere'} is not a Delta table"):
        delta_tables.table_state(str(tmp_path / "nowhere"))
    root = tmp_path / "codes"
    delta_tables.commit_files(str(root), SCHEMA, "shard", True, "", file_writer(root, "a", 0, 1))
    with pytest.raises(AudiohashError, match="at version 7"):
        delta_tables.table_state(str(root), 7)


@pytest.mark.spark
def test_spark_reads_appends_and_time_travels_a_table_delta_rs_committed(spark, tmp_path):
    """delta-rs -> delta-spark, on the code table's shape (partitioned by an int, written by tasks)."""
    from delta.tables import DeltaTable

    root = tmp_path / "codes"
    delta_tables.commit_files(str(root), SCHEMA, "shard", True, "lineage-0", file_writer(root, "a", 0, 3))
    table = spark.read.format("delta").load(str(root))
    assert table.count() == 3 and table.schema.simpleString() == "struct<clip_id:string,code:binary,shard:int>"
    spark.createDataFrame([("s0", b"\x03", 2)], table.schema).write.format("delta").mode("append").option(
        "userMetadata", "spark-append").save(str(root))
    spark.sql(f"DELETE FROM delta.`{root}` WHERE clip_id = 'a1'")
    assert sorted(r[0] for r in spark.read.format("delta").load(str(root)).select("clip_id").collect()) == \
        ["a0", "a2", "s0"]
    assert spark.read.format("delta").option("versionAsOf", 0).load(str(root)).count() == 3
    history = DeltaTable.forPath(spark, str(root)).history().select("version", "userMetadata").collect()
    assert {(r[0], r[1]) for r in history} >= {(0, "lineage-0"), (1, "spark-append")}
    # ... and delta-rs reads back what Spark did: its append, DELETE's rewrite, the metadata.
    assert rows_of(root) == ["a0", "a2", "s0"] and delta_tables.table_state(str(root)).version == 2
    assert delta_tables.table_state(str(root)).min_reader_version == 1  # no deletion vectors
    assert delta_tables.history(str(root), 2)[1]["userMetadata"] == "spark-append"
    assert delta_tables.appended_files(str(root), 0, 1)[0] is not None
    assert delta_tables.appended_files(str(root), 1, 2)[0] is None  # DELETE rewrote a file


@pytest.mark.spark
@pytest.mark.parametrize("partitioned", [False, True])
def test_delta_rs_lists_appends_to_and_time_travels_tables_spark_wrote(spark, tmp_path, partitioned):
    """delta-spark -> delta-rs, on the shapes Spark's writer makes: unpartitioned (embeddings,
    rejects, results) and partitioned by shard (the code table off the task writer's path)."""
    root = tmp_path / ("codes" if partitioned else "results")
    frame = spark.createDataFrame([(f"x{i}", bytes([i]), i % 2) for i in range(6)], "clip_id string, code binary, shard int")
    writer = frame.repartition(3).write.format("delta").mode("overwrite")
    (writer.partitionBy("shard") if partitioned else writer).save(str(root))
    frame.limit(2).write.format("delta").mode("append").save(str(root))
    state = delta_tables.table_state(str(root))
    assert state.version == 1 and state.partition_columns == (["shard"] if partitioned else [])
    assert sorted(state.files) == sorted(spark.read.format("delta").load(str(root)).inputFiles())
    assert sum(state.sizes) == sum(os.path.getsize(f[len("file:"):]) for f in state.files)
    assert len(rows_of(root, 0)) == 6 and len(rows_of(root)) == 8
    if partitioned:  # the task writer appends to a code table Spark created
        assert delta_tables.commit_files(str(root), SCHEMA, "shard", False, "", file_writer(root, "t", 1, 2))[0] == 2
        assert spark.read.format("delta").load(str(root)).count() == 10
        assert spark.read.format("delta").option("versionAsOf", 1).load(str(root)).count() == 8
    else:  # another layout: refused, Spark's writer takes it
        assert delta_tables.commit_files(str(root), SCHEMA, "shard", False, "", lambda: []) is None
