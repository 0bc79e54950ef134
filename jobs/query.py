"""Query: rank the code table for every query clip (query.split of the embeddings table) with
the registered model's asymmetric distance (or Hamming for binary codes), keep the global top-R,
write the results table and, with query.evaluate, log mAP@R, precision@R and recall@R (against
exact float search) to MLflow. query.top_r=0 ranks the whole database (mAP@all).

    spark-submit jobs/query.py --conf-file conf/local.yaml query.top_r=100
"""
from audiohash.cli import job_parser, run_job


def main(cfg, args):
    import logging
    import time

    import mlflow
    import numpy as np
    import pandas as pd

    from audiohash.evaluation import exact_float_topk, ranked_positions, retrieval_metrics
    from audiohash.schemas import RESULTS_DDL
    from audiohash.spark.query import search_codes
    from audiohash.spark.session import get_spark
    from audiohash.spark.tables import append_delta, read_embeddings
    from audiohash.tracking import job_run, load_registered_bundle

    log = logging.getLogger("audiohash.query")
    spark = get_spark(cfg.spark)
    bundle = load_registered_bundle(cfg)
    query_ids, query_labels, xq, _ = read_embeddings(spark, cfg.lake.table("embeddings"), [cfg.query.split])
    codes_table = cfg.lake.table("codes")
    with job_run(cfg, "query", run_name=f"query-{bundle.model_name}-v{bundle.model_version}") as run:
        started = time.time()
        D, ranked_ids = search_codes(spark, bundle, codes_table, xq, cfg.query.top_r or 2**62, cfg.query.query_batch)
        seconds = time.time() - started
        R = ranked_ids.shape[1]
        metrics = {"query_s": seconds, "queries_per_s": len(xq) / seconds, "n_queries": len(xq), "R": R}
        keep = min(R, cfg.query.results_r)
        results = pd.DataFrame({
            "query_id": np.repeat(query_ids, keep), "rank": np.tile(np.arange(1, keep + 1, dtype=np.int32), len(xq)),
            "clip_id": ranked_ids[:, :keep].ravel(), "distance": D[:, :keep].ravel(),
            "run_id": run.info.run_id, "model_name": bundle.model_name,
            "model_version": np.int32(bundle.model_version)})
        append_delta(spark.createDataFrame(results, RESULTS_DDL), cfg.lake.table("results"))
        if cfg.query.evaluate:
            db = spark.read.format("delta").load(codes_table).select("clip_id", "label").orderBy("clip_id").toPandas()
            db_ids, db_labels = db["clip_id"].to_numpy(object), db["label"].to_numpy(object)
            reference = None
            if cfg.query.float_reference:
                xb_ids, _, xb, _ = read_embeddings(spark, cfg.lake.table("embeddings"), cfg.encode.splits)
                if np.array_equal(xb_ids, db_ids):
                    reference = exact_float_topk(xq, xb, R)
                else:
                    log.warning("embeddings and code table hold different clips: recall@R skipped")
            metrics.update(retrieval_metrics(query_labels, db_labels, ranked_positions(ranked_ids, db_ids), reference))
        mlflow.log_params({"model_name": bundle.model_name, "model_version": bundle.model_version,
                           "method": bundle.method, "top_r": R})
        mlflow.log_metrics(metrics)
    shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    print(f"query: {bundle.model_name} v{bundle.model_version} ({bundle.method}, {bundle.quantizer.n_bits} bits): "
          f"{shown} (MLflow run {run.info.run_id})")


if __name__ == "__main__":
    run_job(main, job_parser(__doc__))
