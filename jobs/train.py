"""Train: read the embeddings table on the driver, sample the labeled fraction, fit the
quantizer (train.method at train.bits), log everything to MLflow and register the model bundle.

    spark-submit jobs/train.py --conf-file conf/local.yaml --method pq --bits 64 --label-fraction 0.1
"""
from audiohash.cli import job_parser, run_job


def main(cfg, args):
    import mlflow
    import numpy as np

    from audiohash.spark.session import get_spark
    from audiohash.spark.tables import embeddings_extractor, read_embeddings
    from audiohash.tracking import job_run, log_and_register_bundle
    from audiohash.training import hide_labels, train_bundle

    for key, value in (("method", args.method), ("bits", args.bits), ("label_fraction", args.label_fraction)):
        if value is not None:
            setattr(cfg.train, key, value)
    spark = get_spark(cfg.spark)
    table = cfg.lake.table("embeddings")
    splits = cfg.train.splits or cfg.encode.splits
    clip_ids, labels, x, version = read_embeddings(spark, table, splits)
    extractor, extractor_version = embeddings_extractor(spark, table, splits, version)  # rows exist: x has them
    n_unlabeled_rows = 0
    if cfg.train.unlabeled_splits:  # more training rows, their labels hidden
        _, _, x_more, _ = read_embeddings(spark, table, cfg.train.unlabeled_splits, version)
        x, labels = np.vstack([x, x_more]), np.concatenate([labels, np.full(len(x_more), None, object)])
        n_unlabeled_rows = len(x_more)
    if cfg.train.unlabeled_classes:
        labels = hide_labels(labels, cfg.train.unlabeled_classes)
    meta = {"embedding_dim": int(x.shape[1]), "extractor": extractor, "extractor_version": extractor_version,
            "embeddings_table": table, "embeddings_version": version,
            "unlabeled_splits": list(cfg.train.unlabeled_splits), "unlabeled_classes": list(cfg.train.unlabeled_classes)}
    with job_run(cfg, "train", run_name=f"train-{cfg.train.method}-{cfg.train.bits}b") as run:
        bundle, metrics = train_bundle(cfg.train.method, cfg.train.bits, x, labels, cfg.train.label_fraction,
                                       cfg.train.seed, cfg.train.hyper, cfg.model_name, meta)
        mlflow.log_params({"method": cfg.train.method, "bits": cfg.train.bits,
                           "label_fraction": cfg.train.label_fraction, "embeddings_version": version})
        mlflow.log_metrics(metrics)
        version_number = log_and_register_bundle(bundle)
    print(f"train: {cfg.train.method} at {cfg.train.bits} bits on {len(x)} clips"
          f"{f' ({n_unlabeled_rows} of splits {cfg.train.unlabeled_splits} unlabeled)' if n_unlabeled_rows else ''}"
          f" in {metrics['train_s']:.1f} s; "
          f"registered {cfg.model_name} version {version_number} (MLflow run {run.info.run_id})")
    return run.info.run_id


if __name__ == "__main__":
    parser = job_parser(__doc__)
    parser.add_argument("--method", help="shortcut for train.method (pq, opq, itq, sh, agh, dqn, ...)")
    parser.add_argument("--bits", type=int, help="shortcut for train.bits")
    parser.add_argument("--label-fraction", type=float, help="shortcut for train.label_fraction")
    run_job(main, parser)
