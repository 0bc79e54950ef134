"""jobs/encode.py end to end on real Delta tables and a real MLflow store: full encode, no-change
rerun, appended / changed / deleted clips, model switch with time-travel rollback, table
maintenance, and a run killed mid-write. Codes are checked against the in-process runner's encode
of the same embeddings with the same registered model (``audiohash.in_process``)."""
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from conftest import REPO, make_config, run_job_main

from audiohash.errors import AudiohashError
from audiohash.schemas import EMBEDDINGS_DDL

pytestmark = [pytest.mark.spark, pytest.mark.slow]

DIM = 24
N_DB, N_QUERY = 2400, 100
N_SHARDS = 4


def embedding_frame(ids, x, labels, splits) -> pd.DataFrame:
    """Rows of the embeddings table (schemas.EMBEDDINGS_DDL) for arrays built in the test."""
    return pd.DataFrame({
        "clip_id": ids, "path": [f"/audio/{i}.wav" for i in ids], "label": labels, "split": splits,
        "source": "synthetic", "offset_s": 0.0, "embedding": [None if v is None else [float(f) for f in v] for v in x],
        "extractor": "test", "extractor_version": "test-v1", "sample_rate": 16000,
        "extracted_at": pd.Timestamp("2026-01-01"),
    })


def synthetic(n: int, seed: int, prefix: str, split: str = "db") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 6, n)
    centers = np.random.default_rng(0).normal(size=(6, DIM)) * 3
    x = (centers[classes] + rng.normal(size=(n, DIM))).astype(np.float32)
    return embedding_frame([f"{prefix}-{i:05d}" for i in range(n)], list(x), [f"class{c}" for c in classes], [split] * n)


def write_embeddings(spark, path, frame: pd.DataFrame, mode="append", files=1):
    df = spark.createDataFrame(frame, EMBEDDINGS_DDL)
    df.repartition(files).write.format("delta").mode(mode).save(str(path))


@pytest.fixture(scope="module")
def base_lake(spark, tmp_path_factory):
    """A lake with an embeddings table (4 files), PQ versions 1 and 2 registered in its MLflow
    store, and the code table of a first encode with version 1 (what that run printed)."""
    from audiohash.bundle import ModelBundle
    from audiohash.quantizers import make_quantizer
    from audiohash.tracking import job_run, log_and_register_bundle

    lake = tmp_path_factory.mktemp("encode-lake")
    frame = pd.concat([synthetic(N_DB, 1, "db"), synthetic(N_QUERY, 2, "q", "query")], ignore_index=True)
    write_embeddings(spark, lake / "embeddings", frame, mode="overwrite", files=4)
    cfg = config(lake, "model.version=1")
    x = np.stack(frame["embedding"][frame["split"] == "db"].to_numpy()).astype(np.float32)
    for seed in (0, 1):
        with job_run(cfg, "train"):
            log_and_register_bundle(ModelBundle(make_quantizer("pq", 32, seed=seed).fit(x), cfg.model_name, 0, {}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_job_main("encode", cfg)
    return lake, out.getvalue()


@pytest.fixture
def lake(base_lake, tmp_path):
    """A copy of the base lake for one test (Delta logs hold relative paths, so copies work)."""
    shutil.copytree(base_lake[0], tmp_path / "lake")
    return tmp_path / "lake"


def config(lake, *overrides):
    return make_config(lake, "train.bits=32", f"encode.n_shards={N_SHARDS}", *overrides)


def encode(cfg, capsys) -> str:
    run_job_main("encode", cfg)
    return capsys.readouterr().out


def codes_of(spark, cfg, version=None) -> pd.DataFrame:
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return reader.load(cfg.lake.table("codes")).toPandas().set_index("clip_id").sort_index()


def expected_codes(spark, cfg, model_version: int) -> dict[str, bytes]:
    """The reference: the in-process runner's encode (no Spark) of the db rows of the embeddings
    table's latest version with the registered model (tests/test_in_process.py checks it against
    the quantizer's own encode)."""
    from audiohash.in_process import encode_table
    from audiohash.tracking import load_registered_bundle

    bundle = load_registered_bundle(cfg, str(model_version))
    encoded, _ = encode_table(cfg.lake.table("embeddings"), bundle, N_SHARDS, ("db",))
    return dict(zip(encoded.column("clip_id").to_pylist(), encoded.column("code").to_pylist()))


def assert_codes_match(codes: pd.DataFrame, expected: dict[str, bytes], model_version: int):
    assert codes.index.is_unique, "more than one code for a clip"
    assert sorted(codes.index) == sorted(expected)
    assert {clip: bytes(c) for clip, c in codes["code"].items()} == expected
    assert set(codes["model_version"]) == {model_version} and set(codes["model_name"]) == {"audiohash-pq-32b"}
    assert (codes["shard"] == [zlib.crc32(c.encode()) % N_SHARDS for c in codes.index]).all()


def version_of(spark, path) -> int:
    from audiohash.spark.tables import table_version

    return table_version(spark, str(path))


def test_first_encode_is_full_with_lineage_and_a_rerun_writes_nothing(spark, base_lake, lake, capsys):
    cfg = config(lake, "model.version=1")
    assert "encode (full: no code table written by encode yet): 2400 clips encoded" in base_lake[1]
    codes = codes_of(spark, cfg)
    assert_codes_match(codes, expected_codes(spark, cfg, 1), 1)
    # Lineage: each row names the encode run; that run names the model's run and the versions.
    (run_id,) = set(codes["encode_run_id"])
    params = mlflow.get_run(run_id).data.params
    assert (params["embeddings_version"], params["codes_version"], params["mode"]) == ("0", "0", "full")
    assert params["model_run_id"] == mlflow.MlflowClient().get_model_version("audiohash-pq-32b", "1").run_id
    assert set(codes["embedding_version"]) == {0}

    out = encode(cfg, capsys)
    assert "nothing changed (embeddings table unchanged since version 0)" in out and "stays at version 0" in out
    assert version_of(spark, cfg.lake.table("codes")) == 0


def test_table_state_lists_a_versions_files_as_spark_does(spark, lake, tmp_path):
    """``table_state`` (delta-rs over Delta's log, no JVM) lists the same files as Spark's listing,
    for a table the encode tasks wrote, one Spark's writer appended to, and after a RESTORE."""
    from delta.tables import DeltaTable

    from audiohash.spark.tables import table_state

    def listing(path):
        return sorted(spark.read.format("delta").load(str(path)).inputFiles())

    cfg = config(lake, "model.version=1")
    codes = cfg.lake.table("codes")
    write_embeddings(spark, lake / "embeddings", synthetic(10, 21, "listed"))
    for path, version in ((codes, 0), (lake / "embeddings", 1)):
        state = table_state(spark, str(path))
        assert state.version == version and state.min_reader_version == 1 and state.properties == {}
        assert sorted(state.files) == listing(path)
    assert table_state(spark, codes).partition_columns == ["shard"]
    DeltaTable.forPath(spark, str(lake / "embeddings")).restoreToVersion(0)
    state = table_state(spark, str(lake / "embeddings"))
    assert state.version == 2 and sorted(state.files) == listing(lake / "embeddings")
    assert table_state(spark, str(lake / "embeddings"), 1).files != state.files
    with pytest.raises(AudiohashError, match=f"{tmp_path / 'nowhere'} is not a Delta table"):
        table_state(spark, str(tmp_path / "nowhere"))


def test_appended_clips_are_encoded_alone_bad_ones_rejected_and_files_compacted(spark, lake, capsys):
    cfg = config(lake, "model.version=1")
    first_run = set(codes_of(spark, cfg)["encode_run_id"])
    # The full encode's 2 tasks (local[2]) each wrote one file per shard.
    assert len(spark.read.format("delta").load(cfg.lake.table("codes")).inputFiles()) == 2 * N_SHARDS
    new = pd.concat([synthetic(40, 7, "new"), synthetic(5, 8, "newq", "query")], ignore_index=True)
    bad = embedding_frame(["bad-nan", "bad-size", "bad-null"],
                          [np.full(DIM, np.nan), np.zeros(DIM - 1), None], ["class0"] * 3, ["db"] * 3)
    write_embeddings(spark, lake / "embeddings", pd.concat([new, bad], ignore_index=True))

    out = encode(config(lake, "model.version=1", "encode.optimize=true", "encode.vacuum_hours=168"), capsys)
    assert "encode (append: 1 file(s) appended" in out and "40 clips encoded" in out and "3 rejected" in out
    codes = codes_of(spark, cfg)
    assert_codes_match(codes, expected_codes(spark, cfg, 1), 1)
    new_rows = codes.index.str.startswith("new-")
    assert new_rows.sum() == 40 and len(set(codes.loc[new_rows, "encode_run_id"]) & first_run) == 0
    assert set(codes.loc[~new_rows, "encode_run_id"]) == first_run  # untouched rows keep their lineage
    rejects = spark.read.format("delta").load(cfg.lake.table("rejects")).toPandas()
    assert sorted(rejects["clip_id"]) == ["bad-nan", "bad-null", "bad-size"]
    assert "expects 24 finite values" in rejects["message"][0]
    # The append added files to the shards; OPTIMIZE left one per shard again; VACUUM ran; neither
    # hides the lineage from the next run.
    assert re.search(rf"OPTIMIZE: ([5-9]|\d\d+) files compacted into {N_SHARDS}\b", out) and "VACUUM" in out
    assert len(spark.read.format("delta").load(cfg.lake.table("codes")).inputFiles()) == N_SHARDS
    assert "nothing changed" in encode(cfg, capsys)


def test_appended_clips_with_codes_replace_them_and_duplicates_are_refused(spark, lake, capsys):
    """An appended row whose clip already has a code replaces that code (MERGE; the code files the
    tasks wrote while the known clips were counted are deleted, not committed); the known-clip
    count is the same whether the tasks read the code files or Spark's reader does; a clip twice
    in the appended files stops the run, naming it."""
    from audiohash import delta_tables
    from audiohash.spark.code_writer import count_coded
    from audiohash.spark.encode import EncodeParams, encode_codes
    from audiohash.tracking import load_registered_bundle

    cfg = config(lake, "model.version=1")
    codes_table = cfg.lake.table("codes")
    probe = pa.array(["db-00001", "db-00002", "q-00001", "nowhere"])  # query clips have no code
    assert count_coded(spark, codes_table, probe) == 2
    again = synthetic(5, 1, "db").iloc[[1, 2]]
    again["embedding"] = again["embedding"].map(lambda v: [2 * f + 1 for f in v])
    write_embeddings(spark, lake / "embeddings", pd.concat([again, synthetic(3, 9, "fresh")], ignore_index=True))

    summary = encode_codes(spark, load_registered_bundle(cfg, "1"), EncodeParams.from_config(cfg))
    assert (summary.mode, summary.encoded, summary.files_read) == ("append", 5, 1)
    assert summary.files_written is None  # the tasks' files were vetoed: 2 clips had codes, a MERGE wrote
    codes = codes_of(spark, cfg)
    assert codes.index.is_unique and len(codes) == N_DB + 3
    committed = {f for v in range(summary.codes_version + 1) for f in delta_tables.table_state(codes_table, v).files}
    on_disk = {f"file:{f}" for f in Path(codes_table).rglob("*.parquet")}
    assert on_disk == committed  # no file of the vetoed blind append is left behind
    quantizer = load_registered_bundle(cfg, "1").quantizer
    replaced = quantizer.encode(np.stack(again["embedding"].to_numpy()).astype(np.float32))
    assert [bytes(c) for c in codes.loc[["db-00001", "db-00002"], "code"]] == [bytes(c) for c in replaced]

    # Deletion vectors raise the reader protocol: the tasks may not read the files; Spark's reader counts.
    spark.sql(f"ALTER TABLE delta.`{codes_table}` SET TBLPROPERTIES ('delta.enableDeletionVectors' = true)")
    assert count_coded(spark, codes_table, probe) == 2

    write_embeddings(spark, lake / "embeddings", synthetic(2, 11, "twice").iloc[[0, 0, 1]])
    with pytest.raises(AudiohashError, match="clip_id 'twice-00000' appears more than once in the appended files"):
        run_job_main("encode", cfg)


def test_a_code_table_the_task_writer_does_not_make_is_written_by_spark(spark, lake):
    """Tasks write code files only into a table of the protocol, schema and layout they make; a code
    table with deletion vectors enabled (another protocol) is reindexed through Spark's writer."""
    from audiohash.spark.encode import EncodeParams, encode_codes
    from audiohash.tracking import load_registered_bundle

    cfg = config(lake, "model.version=1", "encode.mode=full")
    codes_table = cfg.lake.table("codes")
    spark.sql(f"ALTER TABLE delta.`{codes_table}` SET TBLPROPERTIES ('delta.enableDeletionVectors' = true)")
    before = version_of(spark, codes_table)
    summary = encode_codes(spark, load_registered_bundle(cfg, "1"), EncodeParams.from_config(cfg))
    assert (summary.mode, summary.encoded, summary.files_read, summary.files_written) == ("full", 2400, 4, None)
    assert version_of(spark, codes_table) == before + 1
    assert_codes_match(codes_of(spark, cfg), expected_codes(spark, cfg, 1), 1)


def test_changed_and_deleted_clips_propagate(spark, lake, capsys):
    from delta.tables import DeltaTable

    cfg = config(lake, "model.version=1")
    before = codes_of(spark, cfg)
    table = DeltaTable.forPath(spark, cfg.lake.table("embeddings"))
    table.update("clip_id IN ('db-00003', 'db-00004')", {"embedding": "transform(embedding, v -> v * 2 + 1)"})
    table.update("clip_id = 'db-00005'", {"label": "'relabelled'"})
    table.update("clip_id = 'db-00006'", {"embedding": f"array_repeat(CAST('NaN' AS FLOAT), {DIM})"})
    table.delete("clip_id IN ('db-00010', 'db-00011', 'db-00012')")

    out = encode(cfg, capsys)
    assert "encode (compare: " in out and "3 clips encoded" in out and "4 deleted, 1 rejected" in out
    codes = codes_of(spark, cfg)
    assert_codes_match(codes, expected_codes(spark, cfg, 1), 1)
    assert codes.loc["db-00005", "label"] == "relabelled"
    changed = codes.index[codes["encode_run_id"] != before["encode_run_id"].iloc[0]]
    assert sorted(changed) == ["db-00003", "db-00004", "db-00005"]
    assert "nothing changed" in encode(cfg, capsys)


def test_model_switch_reindexes_in_one_commit_and_rolls_back(spark, lake, capsys):
    cfg1, cfg2 = config(lake, "model.version=1"), config(lake, "model.version=2")
    out = encode(cfg2, capsys)
    assert "full reindex: model_version 1 -> 2" in out and "roll back with encode.rollback_to=0" in out
    assert version_of(spark, cfg2.lake.table("codes")) == 1  # one commit for the whole new index
    assert_codes_match(codes_of(spark, cfg2), expected_codes(spark, cfg2, 2), 2)
    assert_codes_match(codes_of(spark, cfg2, version=0), expected_codes(spark, cfg1, 1), 1)  # time travel

    out = encode(config(lake, "encode.rollback_to=0"), capsys)
    assert "restored to version 0 (audiohash-pq-32b v1) as version 2" in out
    assert_codes_match(codes_of(spark, cfg1), expected_codes(spark, cfg1, 1), 1)
    # The restore carries version 0's lineage: model 1 is up to date again.
    assert "nothing changed" in encode(cfg1, capsys)
    with pytest.raises(AudiohashError, match="has no version 99; versions: 0..2"):
        encode(config(lake, "encode.rollback_to=99"), capsys)


def test_a_model_trained_on_another_extractor_is_refused(spark, lake, capsys):
    from audiohash.bundle import ModelBundle
    from audiohash.quantizers import make_quantizer
    from audiohash.spark.encode import EncodeParams, encode_codes
    from audiohash.tracking import job_run, load_registered_bundle, log_and_register_bundle

    cfg = config(lake, "model.version=3")
    x = np.random.default_rng(0).normal(size=(300, DIM)).astype(np.float32)
    with job_run(cfg, "train"):  # version 3, trained on vectors of the same size from another extractor
        log_and_register_bundle(ModelBundle(make_quantizer("pq", 32).fit(x), cfg.model_name, 0,
                                            {"extractor_version": "logmel-v1-other"}))
    codes = cfg.lake.table("codes")
    before = version_of(spark, codes)
    refusal = r"holds embeddings of extractor test-v1, but model audiohash-pq-32b v3 was trained on logmel-v1-other"
    with pytest.raises(AudiohashError, match=refusal):
        encode(cfg, capsys)
    for direct_read in (True, False):  # the tasks' file read and Spark's reader check alike
        with pytest.raises(AudiohashError, match=refusal):
            encode_codes(spark, load_registered_bundle(cfg, "3"),
                         EncodeParams.from_config(cfg, mode="full", direct_read=direct_read))
    assert version_of(spark, codes) == before


def test_compare_mode_refuses_a_table_re_extracted_by_another_extractor_of_the_same_width(spark, lake, capsys):
    """The embeddings table overwritten in place (same id, same width) by another extractor: the
    incremental run compares fingerprints, and must check the extractor as the other modes do."""
    from audiohash.bundle import ModelBundle
    from audiohash.quantizers import make_quantizer
    from audiohash.tracking import job_run, log_and_register_bundle

    cfg = config(lake, "model.version=3")
    embeddings = cfg.lake.table("embeddings")
    x = np.random.default_rng(0).normal(size=(300, DIM)).astype(np.float32)
    with job_run(cfg, "train"):  # version 3, trained on this table's extractor
        log_and_register_bundle(ModelBundle(make_quantizer("pq", 32).fit(x), cfg.model_name, 0,
                                            {"extractor_version": "test-v1"}))
    assert "full" in encode(cfg, capsys)  # a new model version: a full reindex
    codes = cfg.lake.table("codes")
    before = version_of(spark, codes)
    frame = spark.read.format("delta").load(embeddings).toPandas().assign(extractor_version="test-v2")
    frame["embedding"] = [[float(f) for f in v] for v in frame["embedding"]]
    write_embeddings(spark, embeddings, frame, mode="overwrite", files=2)
    with pytest.raises(AudiohashError, match=r"holds embeddings of extractor test-v2, but model audiohash-pq-32b v3 "
                                             r"was trained on test-v1"):
        encode(cfg, capsys)
    assert version_of(spark, codes) == before


def test_a_run_killed_before_its_commit_leaves_the_table_as_it_was(spark, lake, capsys):
    """The driver dies (fault point ``encode.before_commit``: an exit as abrupt as SIGKILL) once the
    tasks have written every code file: nothing is committed, the old index stays, a rerun works."""
    cfg1 = config(lake, "model.version=1")
    codes_dir = Path(cfg1.lake.table("codes"))
    files_before = set(codes_dir.rglob("*.parquet"))
    env = {**os.environ, "AUDIOHASH_FAULT": "encode.before_commit:exit",
           "PYTHONPATH": os.pathsep.join([str(REPO / "lib"), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, str(REPO / "jobs" / "encode.py"), "--conf-file", str(REPO / "conf" / "small.yaml"),
            f"lake.root={lake}", "train.bits=32", f"encode.n_shards={N_SHARDS}", "model.version=2",
            "spark.master=local[2]", "spark.show_progress=false"]
    job = subprocess.run(args, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         timeout=600)
    assert job.returncode == 137, job.stdout.decode()[-3000:]
    assert set(codes_dir.rglob("*.parquet")) - files_before  # files written, never committed

    assert version_of(spark, codes_dir) == 0
    assert_codes_match(codes_of(spark, cfg1), expected_codes(spark, cfg1, 1), 1)
    cfg2 = config(lake, "model.version=2")
    out = encode(cfg2, capsys)  # the rerun
    assert "full reindex" in out
    assert version_of(spark, codes_dir) == 1
    assert_codes_match(codes_of(spark, cfg2), expected_codes(spark, cfg2, 2), 2)


def test_the_loser_of_two_concurrent_encodes_is_told_and_leaves_no_file(spark, lake, capsys):
    """Another full encode commits while this one's files are written but not committed (fault point
    ``encode.before_commit`` runs it): this run is refused with the winner's version, its files
    are deleted, the table holds the winner's index alone."""
    from audiohash import delta_tables, faults

    cfg2 = config(lake, "model.version=2", "encode.mode=full")
    codes_dir = Path(cfg2.lake.table("codes"))
    files_before = set(codes_dir.rglob("*.parquet"))
    winner = {}

    def other_run():
        winner["out"] = encode(config(lake, "model.version=1", "encode.mode=full"), capsys)

    with faults.at("encode.before_commit", other_run):
        with pytest.raises(AudiohashError, match=r"another writer committed version 1 while this run was writing "
                                                 r"\(it had read version 0\).*Run it again"):
            encode(cfg2, capsys)
    assert "wrote codes v1" in winner["out"] and version_of(spark, codes_dir) == 1
    committed = {Path(uri[len("file:"):]) for uri in delta_tables.table_state(str(codes_dir)).files}
    assert committed - files_before and set(codes_dir.rglob("*.parquet")) == files_before | committed
    assert_codes_match(codes_of(spark, cfg2), expected_codes(spark, cfg2, 1), 1)


def test_files_read_by_tasks_and_rows_from_spark_encode_alike(spark, lake):
    """The direct read (tasks read the Parquet files) and Spark's Delta reader give the same code
    rows, shards and fingerprints; the run's summary says which one ran."""
    from audiohash.spark.encode import EncodeParams, encode_codes
    from audiohash.tracking import load_registered_bundle

    cfg = config(lake, "model.version=1")
    bundle = load_registered_bundle(cfg, "1")
    tables = {}
    for direct_read in (True, False):
        codes = str(lake / f"codes-direct-{direct_read}")
        summary = encode_codes(spark, bundle, EncodeParams.from_config(cfg, codes_table=codes, mode="full",
                                                                       direct_read=direct_read))
        # This local Delta table is plain Parquet: the tasks read its 4 files themselves.
        assert summary.files_read == (4 if direct_read else None) and summary.encoded == N_DB
        # Tasks that read the files write theirs (one per shard each); Spark's writer one per shard.
        n_files = len(spark.read.format("delta").load(codes).inputFiles())
        assert n_files == (2 * N_SHARDS if direct_read else N_SHARDS)
        assert summary.files_written == (2 * N_SHARDS if direct_read else None)
        tables[direct_read] = (spark.read.format("delta").load(codes)
                               .select("clip_id", "shard", "code", "label", "source_hash").toPandas()
                               .set_index("clip_id").sort_index())
    pd.testing.assert_frame_equal(tables[True], tables[False])
    # No split named: every row, and the tasks do not read the split column.
    every = encode_codes(spark, bundle, EncodeParams.from_config(cfg, codes_table=str(lake / "codes-every-split"),
                                                                 splits=(), mode="full"))
    assert every.encoded == N_DB + N_QUERY
    assert tables[True]["source_hash"].is_unique
    assert_codes_match(tables[True].assign(model_version=1, model_name="audiohash-pq-32b"),
                       expected_codes(spark, cfg, 1), 1)
