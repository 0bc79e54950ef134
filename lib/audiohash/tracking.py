"""MLflow in one place: the tracking store, runs, and the model registry for bundles.

Default store: a sqlite database under the lake (``lake/mlflow.db``) with artifacts under
``lake/mlartifacts``; ``mlflow ui --backend-store-uri sqlite:///lake/mlflow.db`` shows it. Any
tracking URI (an MLflow server, Databricks) is taken from ``mlflow.tracking_uri``.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from typing import Iterator

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from audiohash.bundle import ModelBundle, load_bundle, save_bundle
from audiohash.config import Config, config_to_dict
from audiohash.errors import AudiohashError

log = logging.getLogger("audiohash.tracking")
BUNDLE_ARTIFACT = "bundle"


def use_store(cfg: Config) -> str:
    """Point MLflow at the configured store and make sure the experiment exists; return its id."""
    mlflow.set_tracking_uri(cfg.tracking_uri)
    experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(cfg.mlflow.experiment, artifact_location=cfg.artifact_root)
    except MlflowException:  # created meanwhile by a concurrent job
        return mlflow.get_experiment_by_name(cfg.mlflow.experiment).experiment_id


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@contextlib.contextmanager
def job_run(cfg: Config, job: str, run_name: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one job, with the resolved config logged as params and as conf.yaml.

    Nested under the active run when there is one (a report's parent run)."""
    experiment_id = use_store(cfg)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name or job, nested=nested) as run:
        mlflow.set_tag("audiohash.job", job)
        params = {f"conf.{k}": str(v)[:500] for k, v in _flatten(config_to_dict(cfg)).items()}
        mlflow.log_params(params)
        mlflow.log_dict(config_to_dict(cfg), "conf.yaml")
        yield run


def log_and_register_bundle(bundle: ModelBundle) -> int:
    """Log the bundle as an artifact of the active run and register it; returns the new version."""
    run = mlflow.active_run()
    if run is None:
        raise AudiohashError("log_and_register_bundle needs an active MLflow run")
    client = MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        save_bundle(bundle, tmp)
        mlflow.log_artifacts(tmp, BUNDLE_ARTIFACT)
    try:
        client.create_registered_model(bundle.model_name)
    except MlflowException:
        pass  # already registered: add a version
    source = f"{run.info.artifact_uri}/{BUNDLE_ARTIFACT}"
    version = client.create_model_version(bundle.model_name, source=source, run_id=run.info.run_id)
    bundle.model_version = int(version.version)
    mlflow.set_tags({"audiohash.model_name": bundle.model_name, "audiohash.model_version": version.version})
    log.info("registered %s version %s (run %s)", bundle.model_name, version.version, run.info.run_id)
    return bundle.model_version


def resolve_model_version(name: str, version: str) -> tuple[int, str]:
    """'3', 'latest' or an alias ('production') -> (version number, run id). Error names both."""
    client = MlflowClient()
    try:
        if version.isdigit():
            mv = client.get_model_version(name, version)
        elif version == "latest":
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise AudiohashError(f"model {name!r} has no registered version; run jobs/train.py first")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = client.get_model_version_by_alias(name, version)
    except MlflowException as exc:
        raise AudiohashError(
            f"model {name!r} version/alias {version!r} not found in {mlflow.get_tracking_uri()}: {exc.message}"
        ) from None
    return int(mv.version), mv.run_id


def load_registered_bundle(cfg: Config, version: str | None = None) -> ModelBundle:
    """Load the bundle registered as (cfg.model_name, version or cfg.model.version)."""
    use_store(cfg)
    number, _ = resolve_model_version(cfg.model_name, version or cfg.model.version)
    source = MlflowClient().get_model_version(cfg.model_name, str(number)).source
    local = mlflow.artifacts.download_artifacts(artifact_uri=source)
    bundle = load_bundle(local)
    bundle.model_version = number
    return bundle


def set_alias(cfg: Config, alias: str, version: int) -> None:
    use_store(cfg)
    MlflowClient().set_registered_model_alias(cfg.model_name, alias, str(version))
