"""The distributed query on real Delta code tables equals one in-process faiss scan of the same codes,
for DQN codes (asymmetric distance through the network) and ITQ codes (Hamming), whatever the query
batching: rankings by (distance, clip_id), with the many equal distances such codes produce."""

import dataclasses
import time

import numpy as np
import pytest
from conftest import run_job_main
from test_encode_spark import N_DB, N_QUERY, N_SHARDS, config, synthetic, write_embeddings

pytestmark = [pytest.mark.spark, pytest.mark.slow]

K = 40


@pytest.fixture(scope="module", params=["dqn", "itq"])
def encoded(request, spark, tmp_path_factory):
    """A lake whose code table holds version 1 of ``method`` (registered in MLflow, encoded by the job)."""
    import pandas as pd

    from audiohash.bundle import ModelBundle
    from audiohash.quantizers import make_quantizer
    from audiohash.tracking import job_run, log_and_register_bundle

    method = request.param
    lake = tmp_path_factory.mktemp(f"query-{method}")
    frame = pd.concat([synthetic(N_DB, 1, "db"), synthetic(N_QUERY, 2, "q", "query")], ignore_index=True)
    write_embeddings(spark, lake / "embeddings", frame, mode="overwrite", files=3)
    bits = 32 if method == "dqn" else 16  # ITQ: at most one bit per input dimension (24 here)
    cfg = config(lake, f"train.method={method}", f"train.bits={bits}", "model.version=1")
    db = frame[frame["split"] == "db"]
    x = np.stack(db["embedding"].to_numpy()).astype(np.float32)
    labels = np.where(np.arange(len(db)) % 10 == 0, db["label"].str[-1].astype(int), -1)  # 10% labeled
    hyper = {"steps": 150, "warmup_steps": 50, "refit_every": 50} if method == "dqn" else {}
    quantizer = make_quantizer(method, bits, seed=0, **hyper).fit(x, labels)
    with job_run(cfg, "train"):
        log_and_register_bundle(ModelBundle(quantizer, cfg.model_name, 0, {}))
    run_job_main("encode", cfg)
    xq = np.stack(frame.loc[frame["split"] == "query", "embedding"].to_numpy()).astype(np.float32)
    return cfg, xq


@pytest.mark.parametrize("direct_read", [True, False], ids=["files-read-by-tasks", "rows-from-spark"])
def test_distributed_ranking_equals_one_in_process_scan(spark, encoded, direct_read):
    from audiohash.in_process import search_table
    from audiohash.ranking import ranking_mismatch
    from audiohash.spark.query import SEARCH_STAGES, ScanParams, search_codes
    from audiohash.spark.tables import table_state
    from audiohash.tracking import load_registered_bundle

    cfg, xq = encoded
    bundle = load_registered_bundle(cfg)
    table = cfg.lake.table("codes")
    # The reference: the in-process runner's scan of every code, ranked by (distance, clip_id).
    D_ref, ids_ref, version = search_table(table, bundle, xq, N_DB)
    assert D_ref.shape == (len(xq), N_DB)
    assert any(len(np.unique(d)) < len(d) for d in D_ref), "no equal distances: tie-breaking not exercised"
    for query_batch in (1000, 34) if direct_read else (34,):  # one batch and 3 (Spark's reader: 3)
        started = time.perf_counter()
        found = search_codes(spark, bundle, xq, ScanParams(table, K, query_batch, direct_read=direct_read))
        elapsed = time.perf_counter() - started
        D, got = found.distances, found.clip_ids
        # Where the time went: every stage timed, the scan job not free, no time counted twice.
        assert list(found.stage_seconds) == list(SEARCH_STAGES)
        assert found.stage_seconds["spark_job"] > 0 and sum(found.stage_seconds.values()) <= elapsed
        assert found.version == version and found.codes_per_query == N_DB
        # This local Delta table is plain Parquet: the tasks read its files themselves where allowed.
        assert found.files_read == (len(table_state(spark, table).files) if direct_read else None)
        assert ranking_mismatch(D, got, D_ref, ids_ref, complete=True) is None
        tied = D[:, 1:] == D[:, :-1]
        assert (got[:, 1:][tied] > got[:, :-1][tied]).all(), "equal distances not ordered by clip_id"


def test_queries_of_another_extractor_are_refused_before_anything_is_written(spark, encoded, tmp_path):
    import dataclasses

    from audiohash.errors import AudiohashError
    from audiohash.spark.query import QueryParams, query_and_evaluate
    from audiohash.tracking import load_registered_bundle

    cfg, _ = encoded
    bundle = load_registered_bundle(cfg)
    other = dataclasses.replace(bundle, meta={**bundle.meta, "extractor_version": "timbre-v0-other"})
    results = tmp_path / "results"
    with pytest.raises(AudiohashError, match=r"holds embeddings of extractor test-v1, but model audiohash-\w+-\d+b "
                                             r"v1 was trained on timbre-v0-other"):
        query_and_evaluate(spark, other, QueryParams.from_config(cfg, results_table=str(results), top_r=K,
                                                                 results_r=10, float_reference=False))
    assert not results.exists()


def test_a_code_table_without_encode_lineage_is_refused(spark, encoded, tmp_path):
    from audiohash.errors import AudiohashError
    from audiohash.spark.query import ScanParams, search_codes
    from audiohash.tracking import load_registered_bundle

    cfg, xq = encoded
    copy = str(tmp_path / "copied-codes")  # the same rows, written by something else than encode
    spark.read.format("delta").load(cfg.lake.table("codes")).write.format("delta").save(copy)
    with pytest.raises(AudiohashError, match=r"copied-codes \(version 0\) was not written by jobs/encode.py"):
        search_codes(spark, load_registered_bundle(cfg), xq, ScanParams(copy, K, 1000))


# ---- the inverted file -----------------------------------------------------------------------------
NLIST = 12


@pytest.fixture(scope="module")
def ivf_lake(spark, tmp_path_factory):
    """A code table encoded by the job with a PQ model that has NLIST lists (shards = list ranges)."""
    import pandas as pd

    from audiohash.bundle import ModelBundle
    from audiohash.quantizers import make_quantizer
    from audiohash.tracking import job_run, log_and_register_bundle

    lake = tmp_path_factory.mktemp("query-ivf")
    frame = pd.concat([synthetic(N_DB, 1, "db"), synthetic(N_QUERY, 2, "q", "query")], ignore_index=True)
    write_embeddings(spark, lake / "embeddings", frame, mode="overwrite", files=2)
    cfg = config(lake, "train.bits=32", "model.version=1")
    db = frame[frame["split"] == "db"]
    x = np.stack(db["embedding"].to_numpy()).astype(np.float32)
    quantizer = make_quantizer("pq", 32, seed=0).fit(x).fit_lists(x, NLIST)
    with job_run(cfg, "train"):
        log_and_register_bundle(ModelBundle(quantizer, cfg.model_name, 0, {}))
    run_job_main("encode", cfg)
    xq = np.stack(frame.loc[frame["split"] == "query", "embedding"].to_numpy()).astype(np.float32)
    return cfg, xq


@pytest.mark.parametrize("direct_read", [True, False], ids=["files-read-by-tasks", "rows-from-spark"])
def test_probed_scan_equals_the_in_process_scan_of_the_same_lists(spark, ivf_lake, direct_read):
    from audiohash.in_process import search_table
    from audiohash.ranking import ranking_mismatch
    from audiohash.spark.query import ScanParams, search_codes
    from audiohash.tracking import load_registered_bundle

    cfg, xq = ivf_lake
    bundle = load_registered_bundle(cfg)
    table = cfg.lake.table("codes")
    for nprobe in (2, NLIST) if direct_read else (2,):  # Spark's reader: the shard filter once
        D_ref, ids_ref, _ = search_table(table, bundle, xq, K, nprobe=nprobe)
        found = search_codes(spark, bundle, xq, ScanParams(table, K, 50, direct_read=direct_read, nprobe=nprobe))
        assert found.nprobe == nprobe
        assert ranking_mismatch(found.distances, found.clip_ids, D_ref, ids_ref, complete=True) is None
        assert (found.codes_per_query < N_DB) if nprobe < NLIST else (found.codes_per_query == N_DB)
    if direct_read:
        D_all, ids_all, _ = search_table(table, bundle, xq, K)  # every list probed: the exhaustive ranking
        assert ranking_mismatch(found.distances, found.clip_ids, D_all, ids_all, complete=True) is None


def scan_tasks(spark, search) -> int:
    """The most tasks of any stage of the Spark jobs that ``search()`` runs (Spark's status tracker)."""
    sc = spark.sparkContext
    group = f"scan-tasks-{time.monotonic_ns()}"  # this search's jobs only
    sc.setJobGroup(group, "counting the scan's tasks")
    try:
        search()
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)  # later jobs of this thread: no group
    tracker = sc.statusTracker()
    stages = [tracker.getStageInfo(stage) for job in tracker.getJobIdsForGroup(group)
              for stage in tracker.getJobInfo(job).stageIds]
    return max(stage.numTasks for stage in stages)


def test_a_probed_scan_groups_files_by_the_lists_cache_an_exhaustive_one_by_bytes(spark, ivf_lake, monkeypatch):
    """With exhaustive groups of at most 1 byte (one data file each), the probed scan still reads
    the table in one task per core (groups up to half the lists cache) and ranks as in-process."""
    from audiohash.in_process import search_table
    from audiohash.ranking import ranking_mismatch
    from audiohash.spark import query
    from audiohash.spark.tables import table_state
    from audiohash.tracking import load_registered_bundle

    cfg, xq = ivf_lake
    bundle = load_registered_bundle(cfg)
    table = cfg.lake.table("codes")
    n_files, cores = len(table_state(spark, table).files), spark.sparkContext.defaultParallelism
    assert n_files > cores, "not more files than cores: nothing to group"
    monkeypatch.setattr(query, "SCAN_TASK_BYTES", 1)
    assert scan_tasks(spark, lambda: query.search_codes(
        spark, bundle, xq, query.ScanParams(table, K, 1000, nprobe=0))) == n_files
    found = []
    assert scan_tasks(spark, lambda: found.append(query.search_codes(
        spark, bundle, xq, query.ScanParams(table, K, 1000, nprobe=NLIST)))) == cores
    D_ref, ids_ref, _ = search_table(table, bundle, xq, K, nprobe=NLIST)
    assert ranking_mismatch(found[0].distances, found[0].clip_ids, D_ref, ids_ref, complete=True) is None
    # No lists cache: the probed scan's groups are the exhaustive scan's.
    assert scan_tasks(spark, lambda: query.search_codes(
        spark, bundle, xq, query.ScanParams(table, K, 1000, nprobe=NLIST, lists_cache_mb=0))) == n_files


def test_files_of_unprobed_lists_are_never_read_and_appended_codes_land_in_their_lists(spark, ivf_lake, tmp_path):
    import shutil

    from audiohash import delta_tables, ivf
    from audiohash.encoding import shard_of_lists
    from audiohash.spark.query import ScanParams, search_codes
    from audiohash.tracking import load_registered_bundle

    cfg, xq = ivf_lake
    lake = tmp_path / "lake"
    shutil.copytree(cfg.lake.root, lake)
    cfg = config(lake, "train.bits=32", "model.version=1")
    bundle = load_registered_bundle(cfg)
    q = bundle.quantizer
    table = cfg.lake.table("codes")
    # One query, one list: the scan tasks read the files of that list's shard only.
    probe = ivf.nearest_lists(q.query_side(xq[:1]), q.ivf_centroids, 1)
    shard = int(shard_of_lists(probe, NLIST, N_SHARDS)[0, 0])
    state = delta_tables.table_state(table)
    in_shard = [f for f, part in zip(state.files, state.partitions) if part["shard"] == shard]
    found = search_codes(spark, bundle, xq[:1], ScanParams(table, K, 1000, nprobe=1))
    assert 0 < found.files_read == len(in_shard) < len(state.files)
    assert set(found.clip_ids[0][found.clip_ids[0] != None]) <= set(  # noqa: E711 (an object array)
        spark.read.format("delta").load(table).filter(f"list_id = {int(probe[0, 0])}").toPandas()["clip_id"])
    # An incremental run appends new clips: each code in its list, in its list's shard.
    new = synthetic(300, 9, "new")
    write_embeddings(spark, lake / "embeddings", new)
    run_job_main("encode", cfg)
    codes = spark.read.format("delta").load(table).toPandas().set_index("clip_id")
    assert len(codes) == N_DB + 300 and codes.index.is_unique
    added = codes.loc[new["clip_id"]]
    lists = ivf.assign_lists(q.query_side(np.stack(new["embedding"].to_numpy()).astype(np.float32)), q.ivf_centroids)
    assert added["list_id"].tolist() == lists.tolist()
    assert added["shard"].tolist() == shard_of_lists(lists, NLIST, N_SHARDS).tolist()


def test_query_job_probes_lists_for_top_r_and_ranks_every_code_for_map_at_all(spark, ivf_lake, tmp_path):
    from audiohash.spark.query import QueryParams, query_and_evaluate
    from audiohash.tracking import load_registered_bundle

    cfg, _ = ivf_lake
    bundle = load_registered_bundle(cfg)
    params = QueryParams.from_config(cfg, results_table=str(tmp_path / "results"), float_reference=False)
    probed = query_and_evaluate(spark, bundle, dataclasses.replace(params, top_r=K, nprobe=2))
    assert probed.metrics["nprobe"] == 2 and probed.metrics["codes_per_query"] < N_DB
    assert probed.metrics["search_spark_job_s"] > 0  # the stages of the search, logged with the run
    assert 0 < probed.metrics[f"ivf_recall_at_{K}"] < 1  # evaluation mode: against every code's ranking
    every = query_and_evaluate(spark, bundle, dataclasses.replace(params, top_r=0, nprobe=2))
    assert every.metrics["nprobe"] == 0 and every.metrics["codes_per_query"] == N_DB
    assert "map_all" in every.metrics and f"map_at_{K}" in probed.metrics
