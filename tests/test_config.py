import pytest

from audiohash.config import load_config, parse_override
from audiohash.errors import AudiohashError


def test_defaults_then_file_then_overrides(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("train:\n  bits: 16\nlake:\n  root: /data/lake\n")
    cfg = load_config(conf, ["train.bits=32", "model.version=3", "dataset.banks=[fluidr3]"])
    assert cfg.train.bits == 32
    assert cfg.lake.root == "/data/lake"
    assert cfg.model.version == "3"  # a version number is kept as the string the registry takes
    assert cfg.dataset.banks == ["fluidr3"]
    assert cfg.lake.table("codes") == "/data/lake/codes"
    assert cfg.model_name == "audiohash-pq-32b"
    assert cfg.tracking_uri == "sqlite:////data/lake/mlflow.db"


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(AudiohashError, match=r"'train\.bitz'"):
        load_config(None, ["train.bitz=3"])
    conf = tmp_path / "c.yaml"
    conf.write_text("querry:\n  top_r: 3\n")
    with pytest.raises(AudiohashError, match=r"c\.yaml.*'querry'"):
        load_config(conf)


def test_bad_values_are_named():
    with pytest.raises(AudiohashError, match=r"'train\.bits'.*integer"):
        load_config(None, ["train.bits=many"])
    with pytest.raises(AudiohashError, match=r"'train\.bits'.*multiple of 8"):
        load_config(None, ["train.bits=12"])
    with pytest.raises(AudiohashError, match=r"'query\.evaluate'.*true or false"):
        load_config(None, ["query.evaluate=maybe"])
    with pytest.raises(AudiohashError, match="key=value"):
        parse_override("train.bits")


def test_dict_keys_merge_and_floats_accept_ints():
    cfg = load_config(None, ["spark.extra={spark.a: 1}", "spark.extra={spark.b: x}", "train.label_fraction=1"])
    assert cfg.spark.extra == {"spark.a": "1", "spark.b": "x"}
    assert cfg.train.label_fraction == 1.0


def test_repo_conf_files_load():
    from conftest import REPO

    for path in sorted((REPO / "conf").glob("*.yaml")):
        load_config(path)


def test_window_s_zero_means_the_extractors_own_window():
    from audiohash.features import make_extractor

    cfg = load_config(None)
    assert cfg.extract.window_s == 0 and cfg.extract.extractor_params() == {}
    # timbre's own window is the 2 s it always had: its version (and so its tables) is unchanged.
    assert (make_extractor("timbre", **cfg.extract.extractor_params()).version
            == make_extractor("timbre", window_s=2.0).version)
    assert load_config(None, ["extract.window_s=3"]).extract.extractor_params() == {"window_s": 3.0}
    torchscript = load_config(None, ["extract.extractor=torchscript", "extract.model_path=m.pt"])
    assert torchscript.extract.extractor_params() == {"path": "m.pt"}
    with pytest.raises(AudiohashError, match=r"'extract\.window_s'.*>= 0"):
        load_config(None, ["extract.window_s=-1"])
