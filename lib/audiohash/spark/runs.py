"""The four stages as tracked runs: what ``jobs/*.py`` run under spark-submit and what the report
job calls in its own process. Each builds its stage's params from the config, runs the stage
(``spark.extract``, ``training``, ``spark.encode``, ``spark.query``) in an MLflow run with the
config logged, prints its one summary line and returns the MLflow run id (extract: None)."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np

from audiohash.config import Config
from audiohash.spark.session import get_spark
from audiohash.tracking import job_run


def extract(cfg: Config) -> None:
    from audiohash.spark.extract import ExtractParams, extract_embeddings

    summary = extract_embeddings(get_spark(cfg.spark), ExtractParams.from_config(cfg))
    print(summary.line())


def train(cfg: Config) -> str:
    from audiohash.spark.tables import embeddings_extractor, read_embeddings
    from audiohash.tracking import log_and_register_bundle
    from audiohash.ivf import default_nlist
    from audiohash.training import hide_labels, train_bundle

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
        if cfg.train.ivf_lists:  # the inverted file, in the code space of the trained model
            nlist = default_nlist(len(x)) if cfg.train.ivf_lists < 0 else cfg.train.ivf_lists
            started = time.time()
            bundle.quantizer.fit_lists(x, nlist)
            metrics.update({"ivf_lists": nlist, "ivf_train_s": time.time() - started})
        mlflow.log_params({"method": cfg.train.method, "bits": cfg.train.bits,
                           "label_fraction": cfg.train.label_fraction, "embeddings_version": version})
        mlflow.log_metrics(metrics)
        version_number = log_and_register_bundle(bundle)
    print(f"train: {cfg.train.method} at {cfg.train.bits} bits on {len(x)} clips"
          f"{f' ({n_unlabeled_rows} of splits {cfg.train.unlabeled_splits} unlabeled)' if n_unlabeled_rows else ''}"
          f" in {metrics['train_s']:.1f} s; "
          f"registered {cfg.model_name} version {version_number} (MLflow run {run.info.run_id})")
    return run.info.run_id


def encode(cfg: Config) -> str:
    from audiohash.spark.code_table import maintain_codes, rollback_codes
    from audiohash.spark.encode import EncodeParams, encode_codes
    from audiohash.tracking import load_registered_bundle, resolve_model_version

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


def query(cfg: Config) -> str:
    from audiohash.plots import plot_map_at_r, plot_precision_recall
    from audiohash.spark.query import QueryParams, query_and_evaluate
    from audiohash.tracking import load_registered_bundle

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
