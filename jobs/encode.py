"""Encode: load a registered model bundle from MLflow (model.version: a number, 'latest' or an
alias), encode the embeddings in the executors and bring the sharded Delta code table up to date
in one atomic commit. Incremental by default: only new or changed clips are encoded, deleted
ones removed, nothing written when nothing changed; a new model version re-encodes everything.

    spark-submit jobs/encode.py --conf-file conf/local.yaml model.version=production
    spark-submit jobs/encode.py --conf-file conf/local.yaml encode.mode=full encode.optimize=true
    spark-submit jobs/encode.py --conf-file conf/local.yaml encode.rollback_to=7   # restore version 7
"""
from audiohash.cli import job_parser, run_job


def main(cfg, args):
    import mlflow

    from audiohash.spark.code_table import maintain_codes, rollback_codes
    from audiohash.spark.encode import EncodeParams, encode_codes
    from audiohash.spark.session import get_spark
    from audiohash.tracking import job_run, load_registered_bundle, resolve_model_version

    spark = get_spark(cfg.spark)
    codes_table = cfg.lake.table("codes")
    if cfg.encode.rollback_to >= 0:
        with job_run(cfg, "encode", run_name=f"encode-rollback-to-v{cfg.encode.rollback_to}") as run:
            version, lineage = rollback_codes(spark, codes_table, cfg.encode.rollback_to)
            mlflow.log_params({"rollback_to": cfg.encode.rollback_to, "codes_version": version})
        model = f"{lineage.model_name} v{lineage.model_version}" if lineage else "unknown model"
        print(f"encode: code table restored to version {cfg.encode.rollback_to} ({model}) as version {version} "
              f"(MLflow run {run.info.run_id})")
        return run.info.run_id
    bundle = load_registered_bundle(cfg)
    _, model_run_id = resolve_model_version(bundle.model_name, str(bundle.model_version))
    with job_run(cfg, "encode", run_name=f"encode-{bundle.model_name}-v{bundle.model_version}") as run:
        summary = encode_codes(spark, bundle, EncodeParams.from_config(cfg, run_id=run.info.run_id,
                                                                       model_run_id=model_run_id))
        maintenance = maintain_codes(spark, codes_table, cfg.encode.optimize, cfg.encode.vacuum_hours) \
            if summary.wrote else []
        mlflow.log_params({"model_name": bundle.model_name, "model_version": bundle.model_version,
                           "model_run_id": model_run_id, "mode": summary.mode, "reason": summary.reason[:500],
                           "embeddings_version": summary.embeddings_version,
                           "codes_version_before": summary.previous_version, "codes_version": summary.codes_version})
        mlflow.log_metrics({"encoded": summary.encoded, "deleted": summary.deleted, "rejected": summary.rejected,
                            "encode_s": summary.seconds})
    print(summary.line() + f" (MLflow run {run.info.run_id})")
    for line in maintenance:
        print("encode: " + line)
    return run.info.run_id


if __name__ == "__main__":
    run_job(main, job_parser(__doc__))
