"""The four jobs end to end on the small rendered dataset: real local Spark, Delta, MLflow."""
import faiss
import mlflow
import numpy as np
import pytest
from conftest import make_config, run_job_main

pytestmark = [pytest.mark.spark, pytest.mark.slow]


@pytest.fixture(scope="module")
def pipeline(spark, small_manifest, tmp_path_factory):
    """Run extract -> train (PQ, 32 bits) -> encode -> query once; tests read what it left."""
    lake = tmp_path_factory.mktemp("lake")
    cfg = make_config(lake, f"extract.input={small_manifest}", "train.bits=32", "query.results_r=20")
    run_job_main("extract", cfg)
    run_job_main("train", cfg, method=None, bits=None, label_fraction=None)
    run_job_main("encode", cfg)
    run_job_main("query", cfg)
    return cfg


def read(spark, cfg, name):
    return spark.read.format("delta").load(cfg.lake.table(name))


def test_every_file_is_embedded_once(spark, pipeline, small_manifest):
    import pandas as pd

    manifest = pd.read_csv(small_manifest)
    emb = read(spark, pipeline, "embeddings").toPandas()
    assert sorted(emb["clip_id"]) == sorted(manifest["clip_id"])
    assert {len(v) for v in emb["embedding"]} == {224}
    assert set(emb["extractor"]) == {"timbre"}  # the default
    merged = emb.merge(manifest, on="clip_id")
    assert (merged["label_x"] == merged["label_y"]).all() and (merged["split_x"] == merged["split_y"]).all()


def test_code_table_has_one_code_per_db_clip(spark, pipeline):
    codes = read(spark, pipeline, "codes").toPandas()
    emb = read(spark, pipeline, "embeddings").toPandas()
    assert sorted(codes["clip_id"]) == sorted(emb.loc[emb["split"] == "db", "clip_id"])
    assert {len(c) for c in codes["code"]} == {4}
    assert set(codes["model_name"]) == {"audiohash-pq-32b"} and set(codes["model_version"]) == {1}
    assert codes["shard"].between(0, pipeline.encode.n_shards - 1).all()


def test_distributed_top_r_equals_faiss_index_pq(spark, pipeline):
    from audiohash.arrow_arrays import code_matrix
    from audiohash.spark.tables import read_embeddings
    from audiohash.tracking import load_registered_bundle

    bundle = load_registered_bundle(pipeline)
    codes = read(spark, pipeline, "codes").select("clip_id", "code").orderBy("clip_id").toArrow()
    db_ids = codes.column("clip_id").to_numpy(zero_copy_only=False)
    index = faiss.IndexPQ(bundle.quantizer.centroids.shape[0] * bundle.quantizer.centroids.shape[2],
                          bundle.quantizer.code_size, 8)
    faiss.copy_array_to_vector(bundle.quantizer.centroids.ravel(), index.pq.centroids)
    index.is_trained = True
    index.add_sa_codes(code_matrix(codes.column("code"), bundle.quantizer.code_size))
    query_ids, _, xq, _ = read_embeddings(spark, pipeline.lake.table("embeddings"), ["query"])
    D_ref, I_ref = index.search(bundle.quantizer.transform(xq), 20)
    results = read(spark, pipeline, "results").toPandas().sort_values(["query_id", "rank"])
    assert len(results) == len(query_ids) * 20
    for q, qid in enumerate(query_ids):
        ours = results[results["query_id"] == qid]
        np.testing.assert_allclose(ours["distance"].to_numpy(), D_ref[q], rtol=1e-4, atol=1e-4)
        # Same clip at every rank whose distance is not tied with a neighbour's (faiss orders ties freely).
        d = D_ref[q]
        gaps = np.diff(d) > 1e-4 * np.maximum(1.0, np.abs(d[1:]))
        untied = np.concatenate([[gaps[0]], gaps[1:] & gaps[:-1], [gaps[-1]]])
        assert untied.sum() > 5
        assert list(ours["clip_id"].to_numpy()[untied]) == list(db_ids[I_ref[q][untied]])


def read_labels(cfg):
    import pandas as pd

    return pd.read_csv(cfg.extract_input)["label"]


def test_runs_and_metrics_are_in_mlflow(pipeline):
    from audiohash.tracking import use_store

    experiment_id = use_store(pipeline)
    runs = mlflow.search_runs([experiment_id])
    assert set(runs["tags.audiohash.job"]) == {"train", "encode", "query"}
    query_run = runs[runs["tags.audiohash.job"] == "query"].iloc[0]
    # PQ on log-mel statistics ranks same-class clips far above chance on this dataset.
    n_classes = len(set(read_labels(pipeline)))
    assert query_run["metrics.map_all"] > 2.0 / n_classes
    assert 0 < query_run["metrics.recall_at_" + str(int(query_run["metrics.R"]))] <= 1


def test_query_batches_give_the_same_ranking(spark, pipeline):
    from audiohash.in_process import search_table
    from audiohash.ranking import ranking_mismatch
    from audiohash.spark.query import ScanParams, search_codes
    from audiohash.spark.tables import read_embeddings
    from audiohash.tracking import load_registered_bundle

    bundle = load_registered_bundle(pipeline)
    _, _, xq, _ = read_embeddings(spark, pipeline.lake.table("embeddings"), ["query"])
    one = search_codes(spark, bundle, xq, ScanParams(pipeline.lake.table("codes"), 15, 1000))
    many = search_codes(spark, bundle, xq, ScanParams(pipeline.lake.table("codes"), 15, 7))
    D_one, ids_one, v_one, D_many, ids_many, v_many = (one.distances, one.clip_ids, one.version, many.distances,
                                                       many.clip_ids, many.version)
    assert v_one == v_many
    # The reference: the in-process runner's scan of every code, ranked by (distance, clip_id).
    D_ref, ids_ref, v_ref = search_table(pipeline.lake.table("codes"), bundle, xq, 1 << 30)
    assert v_ref == v_one
    for D, ids in ((D_one, ids_one), (D_many, ids_many)):
        assert ranking_mismatch(D, ids, D_ref, ids_ref, complete=True) is None


def test_search_service_ranks_a_clip_as_the_query_job_does(spark, pipeline, small_manifest):
    """audiohash.search (no Spark) over the job's code table: a query clip by id, and by its audio
    file (decoded and embedded again), gets the query job's results table ranking."""
    import pandas as pd

    from audiohash.ranking import ranking_mismatch
    from audiohash.search import SearchEngine

    engine = SearchEngine.open(make_config(pipeline.lake.root, f"extract.input={pipeline.extract.input}",
                                           "train.bits=32", "model.version=1"))
    results = read(spark, pipeline, "results").toPandas().sort_values(["query_id", "rank"])
    manifest = pd.read_csv(small_manifest)
    paths = dict(zip(manifest["clip_id"], manifest["path"]))
    for query_id in sorted(set(results["query_id"]))[:4]:
        job = results[results["query_id"] == query_id]
        D_job, ids_job = job["distance"].to_numpy()[None], job["clip_id"].to_numpy(object)[None]
        audio = (small_manifest.parent / paths[query_id]).read_bytes()
        for found in (engine.search(clip_id=query_id, top=20), engine.search(audio=audio, top=20)):
            D = np.asarray([[h.distance for h in found.hits]], np.float32)
            ids = np.asarray([[h.clip_id for h in found.hits]], object)
            assert ranking_mismatch(D, ids, D_job, ids_job, complete=False) is None


def test_query_refuses_codes_of_another_model_version(spark, pipeline):
    from audiohash.errors import AudiohashError

    run_job_main("train", pipeline, method=None, bits=None, label_fraction=None)  # registers version 2
    newer = make_config(pipeline.lake.root, f"extract.input={pipeline.extract.input}", "train.bits=32",
                        "model.version=2")
    with pytest.raises(AudiohashError, match=r"audiohash-pq-32b:1.*audiohash-pq-32b:2"):
        run_job_main("query", newer)


def test_train_takes_unlabeled_splits_and_hides_named_classes(spark, pipeline):
    """train.unlabeled_splits adds rows without their labels; train.unlabeled_classes hides a class's
    labels (and a class no row has is refused by name)."""
    import pandas as pd

    from audiohash.errors import AudiohashError
    from audiohash.tracking import load_registered_bundle

    manifest = pd.read_csv(pipeline.extract_input)
    db, query = manifest[manifest["split"] == "db"], manifest[manifest["split"] == "query"]
    hidden = sorted(db["label"].unique())[0]
    cfg = make_config(pipeline.lake.root, f"extract.input={pipeline.extract.input}", "train.method=dqn",
                      "train.bits=16", "train.hyper.dqn={steps: 40, warmup_steps: 20, refit_every: 20}",
                      "train.unlabeled_splits=[query]", f"train.unlabeled_classes=[{hidden}]")
    run_job_main("train", cfg, method=None, bits=None, label_fraction=None)
    meta = load_registered_bundle(cfg).meta
    assert meta["n_train"] == len(db) + len(query)
    # Labels come from the db split's classes but the hidden one: round(0.1 x its clips), at least 1, each.
    per_class = db[db["label"] != hidden].groupby("label").size()
    assert meta["n_labeled"] == sum(max(1, round(0.1 * n)) for n in per_class)
    assert hidden not in meta["classes"] and meta["unlabeled_splits"] == ["query"]
    cfg.train.unlabeled_classes = ["no-such-class"]
    with pytest.raises(AudiohashError, match=r"train.unlabeled_classes: no training row has the class\(es\) \['no-such-class'\]"):
        run_job_main("train", cfg, method=None, bits=None, label_fraction=None)


def test_train_job_trains_the_inverted_file_in_the_code_space(spark, pipeline):
    """train.ivf_lists=-1: about 4 sqrt(n) lists (at most n / 39), in the bundle; binary codes are refused."""
    from audiohash.errors import AudiohashError
    from audiohash.ivf import assign_lists, default_nlist
    from audiohash.spark.tables import read_embeddings
    from audiohash.tracking import load_registered_bundle

    cfg = make_config(pipeline.lake.root, f"extract.input={pipeline.extract.input}", "train.method=opq",
                      "train.bits=32", "train.ivf_lists=-1")
    run_job_main("train", cfg, method=None, bits=None, label_fraction=None)
    quantizer = load_registered_bundle(cfg).quantizer
    _, _, x, _ = read_embeddings(spark, pipeline.lake.table("embeddings"), ["db"])
    assert quantizer.nlist == default_nlist(len(x)) and quantizer.ivf_centroids.shape[1] == quantizer.query_side(x).shape[1]
    lists = assign_lists(quantizer.query_side(x), quantizer.ivf_centroids)
    assert len(np.unique(lists)) > quantizer.nlist // 2  # the lists are used, not one big list
    itq = make_config(pipeline.lake.root, f"extract.input={pipeline.extract.input}", "train.method=itq",
                      "train.bits=16", "train.ivf_lists=-1")
    with pytest.raises(AudiohashError, match=r"itq: its codes have no inverted file"):
        run_job_main("train", itq, method=None, bits=None, label_fraction=None)
