"""Encode: load a registered model bundle from MLflow (model.version: a number, 'latest' or an
alias), encode every embedding in the executors and write the sharded Delta code table in one
commit.

    spark-submit jobs/encode.py --conf-file conf/local.yaml model.version=3
"""
from audiohash.cli import job_parser, run_job


def main(cfg, args):
    import mlflow

    from audiohash.spark.encode import encode_table
    from audiohash.spark.session import get_spark
    from audiohash.tracking import job_run, load_registered_bundle

    spark = get_spark(cfg.spark)
    bundle = load_registered_bundle(cfg)
    with job_run(cfg, "encode", run_name=f"encode-{bundle.model_name}-v{bundle.model_version}") as run:
        summary = encode_table(spark, bundle, cfg.lake.table("embeddings"), cfg.lake.table("codes"),
                               cfg.lake.table("rejects"), cfg.encode.n_shards, cfg.encode.splits)
        mlflow.log_params({"model_name": bundle.model_name, "model_version": bundle.model_version,
                           "embeddings_version": summary.embeddings_version,
                           "codes_version": summary.codes_version})
        mlflow.log_metrics({"encoded": summary.encoded, "rejected": summary.rejected,
                            "encode_s": summary.seconds})
    print(summary.line() + f" (MLflow run {run.info.run_id})")


if __name__ == "__main__":
    run_job(main, job_parser(__doc__))
