"""Query: rank the code table for every query clip (query.split of the embeddings table) with
the registered model's asymmetric distance (or Hamming for binary codes), keep the global top-R,
append the results table and, with query.evaluate, log mAP@R, precision@R and recall@R (against
exact float search) to MLflow. query.top_r=0 ranks the whole database: mAP@all, plus the mAP@R
and precision-recall curves as artifacts.

    spark-submit jobs/query.py --conf-file conf/local.yaml query.top_r=100
"""
from audiohash.cli import job_parser, run_job


def main(cfg, args):
    import tempfile
    from pathlib import Path

    import mlflow

    from audiohash.plots import plot_map_at_r, plot_precision_recall
    from audiohash.spark.query import QueryParams, query_and_evaluate
    from audiohash.spark.session import get_spark
    from audiohash.tracking import job_run, load_registered_bundle

    spark = get_spark(cfg.spark)
    bundle = load_registered_bundle(cfg)
    name = f"{bundle.method} {bundle.quantizer.n_bits} bits"
    with job_run(cfg, "query", run_name=f"query-{bundle.model_name}-v{bundle.model_version}") as run:
        outcome = query_and_evaluate(spark, bundle, QueryParams.from_config(cfg, run_id=run.info.run_id))
        mlflow.log_params({"model_name": bundle.model_name, "model_version": bundle.model_version,
                           "method": bundle.method, "bits": bundle.quantizer.n_bits,
                           "codes_version": outcome.codes_version})
        mlflow.log_metrics(outcome.metrics)
        if outcome.curves:
            mlflow.log_dict(outcome.curves, "curves.json")
            with tempfile.TemporaryDirectory() as tmp:
                plot_map_at_r({name: outcome.curves}, Path(tmp) / "map_at_r.png", f"mAP@R, {name}")
                plot_precision_recall({name: outcome.curves}, Path(tmp) / "precision_recall.png", name)
                mlflow.log_artifacts(tmp)
    shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in outcome.metrics.items())
    print(f"query: {bundle.model_name} v{bundle.model_version} ({name}): {shown} (MLflow run {run.info.run_id})")
    return run.info.run_id


if __name__ == "__main__":
    run_job(main, job_parser(__doc__))
