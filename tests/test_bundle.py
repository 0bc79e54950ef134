"""Bundle format round trips: folder, broadcast bytes, and the MLflow registry (real sqlite store)."""
import numpy as np
import pytest

from audiohash.bundle import ModelBundle, bundle_from_bytes, bundle_to_bytes, load_bundle, save_bundle
from audiohash.errors import AudiohashError
from audiohash.quantizers import make_quantizer


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    return rng.normal(size=(2000, 24)).astype(np.float32)


def test_folder_and_bytes_round_trip_encode_identically(tmp_path, data):
    q = make_quantizer("pq", 24, seed=0).fit(data)
    bundle = ModelBundle(q, "m", 0, {"classes": ["a", "b"]})
    loaded = load_bundle(save_bundle(bundle, tmp_path / "b"))
    np.testing.assert_array_equal(loaded.quantizer.encode(data), q.encode(data))
    assert loaded.meta == {"classes": ["a", "b"]}
    again = bundle_from_bytes(bundle_to_bytes(bundle))
    np.testing.assert_array_equal(again.quantizer.lookup_tables(data[:5]), q.lookup_tables(data[:5]))
    assert bundle_to_bytes(bundle) == bundle_to_bytes(again)  # deterministic bytes


def test_not_a_bundle_is_named(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(AudiohashError, match="not a model bundle"):
        load_bundle(tmp_path / "x")


def test_registry_round_trip_and_aliases(tmp_path, data):
    from conftest import make_config

    from audiohash.tracking import job_run, load_registered_bundle, log_and_register_bundle, set_alias

    cfg = make_config(tmp_path / "lake", "train.bits=16")
    versions = []
    for seed in (0, 1):
        q = make_quantizer("pq", 16, seed=seed).fit(data)
        with job_run(cfg, "train"):
            versions.append(log_and_register_bundle(ModelBundle(q, cfg.model_name, 0, {})))
    assert versions == [1, 2]
    set_alias(cfg, "production", 1)
    first = load_registered_bundle(cfg, "production")
    latest = load_registered_bundle(cfg, "latest")
    assert (first.model_version, latest.model_version) == (1, 2)
    assert load_registered_bundle(cfg, "2").model_version == 2
    np.testing.assert_array_equal(latest.quantizer.encode(data), q.encode(data))
    with pytest.raises(AudiohashError, match="audiohash-pq-16b.*'staging'"):
        load_registered_bundle(cfg, "staging")
