"""The distributed query on real Delta code tables equals one in-process faiss scan of the same codes,
for DQN codes (asymmetric distance through the network) and ITQ codes (Hamming), whatever the query
batching: rankings by (distance, clip_id), with the many equal distances such codes produce."""

import numpy as np
import pytest
from conftest import run_job_main
from test_encode_spark import N_DB, N_QUERY, config, synthetic, write_embeddings

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
    from audiohash.spark.query import ScanParams, search_codes
    from audiohash.spark.tables import table_state
    from audiohash.tracking import load_registered_bundle

    cfg, xq = encoded
    bundle = load_registered_bundle(cfg)
    table = cfg.lake.table("codes")
    # The reference: the in-process runner's scan of every code, ranked by (distance, clip_id).
    D_ref, ids_ref, version = search_table(table, bundle, xq, N_DB)
    assert D_ref.shape == (len(xq), N_DB)
    assert any(len(np.unique(d)) < len(d) for d in D_ref), "no equal distances: tie-breaking not exercised"
    for query_batch in (1000, 7):  # one batch, and 15 batches
        found = search_codes(spark, bundle, xq, ScanParams(table, K, query_batch, direct_read=direct_read))
        D, got = found.distances, found.clip_ids
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
