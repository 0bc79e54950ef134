"""The extract stage's pure core without Spark: manifests and folder listings to input files, the
plan (missing / too large / clip_id taken / already embedded), byte-balanced slicing, and the
worker on real files written with soundfile, checked against the extractor run by hand."""
import io

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from audiohash.errors import AudiohashError
from audiohash.extraction import (OUTPUT_COLUMNS, balanced_order, base_clip_ids, embed_files, folder_inputs,
                                  hadoop_path, manifest_inputs, plan_extract)
from audiohash.features import Extractor, make_extractor

SR = 16000


@pytest.fixture(scope="module")
def logmel():
    return make_extractor("logmel")


def tone(seconds: float, freq: float = 440.0, sr: int = SR, amp: float = 0.3, seed: int = 0) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    noise = 0.01 * np.random.default_rng(seed).standard_normal(t.size)
    return (amp * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def write(path, x, sr=SR, **kw) -> str:
    sf.write(path, x, sr, **kw)
    return str(path)


def files_frame(paths, clip_ids=None) -> pd.DataFrame:
    return pd.DataFrame({"clip_id": clip_ids or [f"c{i}" for i in range(len(paths))], "path": paths,
                         "label": "lab", "split": "db", "source": None})


# ---- input files ---------------------------------------------------------------------------
def test_hadoop_path_forms():
    assert hadoop_path("/a/b/../c.wav") == "file:/a/c.wav"
    assert hadoop_path("file:///a/b.wav") == "file:/a/b.wav"
    assert hadoop_path("file:/a/b.wav") == "file:/a/b.wav"
    assert hadoop_path("s3a://bucket/x y.wav") == "s3a://bucket/x y.wav"


def test_manifest_paths_ids_and_optional_columns(tmp_path):
    frame = pd.DataFrame({"path": ["dog/1.wav", "/elsewhere/2.flac", "s3a://b/k/3.ogg"],
                          "clip_id": ["", "two", None], "soundfont": ["fluidr3", "x", "y"]})
    out = manifest_inputs(frame, str(tmp_path / "manifest.csv"))
    assert list(out.columns) == ["clip_id", "path", "label", "split", "source"]
    assert out["path"].tolist() == [f"file:{tmp_path}/dog/1.wav", "file:/elsewhere/2.flac", "s3a://b/k/3.ogg"]
    # Empty clip_id: relative to the manifest's folder without suffix, else the whole path.
    assert out["clip_id"].tolist() == ["dog/1", "two", "s3a://b/k/3"]
    assert out["source"].tolist() == ["fluidr3", "x", "y"]
    assert out["label"].isna().all() and out["split"].isna().all()


def test_manifest_nulls_stay_null_and_numbers_become_text(tmp_path):
    frame = pd.DataFrame({"path": ["a.wav", "b.wav"], "label": [None, 7], "split": [np.nan, "db"]})
    out = manifest_inputs(frame, str(tmp_path / "m.parquet"))
    assert out["label"].tolist() == [None, "7"]
    assert out["split"].tolist() == [None, "db"]


@pytest.mark.parametrize("frame, words", [
    (pd.DataFrame({"file": ["a.wav"]}), ["no 'path' column", "file"]),
    (pd.DataFrame({"path": ["a.wav", ""]}), ["row 3", "empty path"]),
    (pd.DataFrame({"path": ["a.wav", "b.wav"], "clip_id": ["x", "x"]}), ["clip_id 'x'", "rows [2, 3]"]),
    (pd.DataFrame({"path": ["a.wav", "./a.wav"], "clip_id": ["x", "y"]}), ["path", "a.wav", "rows [2, 3]"]),
])
def test_manifest_errors_name_the_row_or_column(tmp_path, frame, words):
    with pytest.raises(AudiohashError) as info:
        manifest_inputs(frame, str(tmp_path / "manifest.csv"))
    for word in words:
        assert word in str(info.value)


def test_folder_inputs_label_is_the_class_folder_and_non_audio_is_left_out():
    root = "file:/data/esc"
    listed = [f"{root}/dog/1-100.wav", f"{root}/dog/deep/2.FLAC", f"{root}/rain/3.ogg", f"{root}/top.wav",
              f"{root}/README.txt", f"{root}/meta/esc50.csv"]
    out = folder_inputs(listed, root)
    assert out.set_index("path")[["clip_id", "label"]].to_dict("index") == {
        f"{root}/dog/1-100.wav": {"clip_id": "dog/1-100", "label": "dog"},
        f"{root}/dog/deep/2.FLAC": {"clip_id": "dog/deep/2", "label": "dog"},
        f"{root}/rain/3.ogg": {"clip_id": "rain/3", "label": "rain"},
        f"{root}/top.wav": {"clip_id": "top", "label": None},
    }


# ---- plan ----------------------------------------------------------------------------------
def test_plan_hand_worked():
    inputs = pd.DataFrame({"clip_id": list("abcdefg"), "path": [f"file:/{x}.wav" for x in "abcdefg"],
                           "label": None, "split": None, "source": None})
    listed = pd.DataFrame({"path": ["file:/a.wav", "file:/b.wav", "file:/d.wav", "file:/e.wav", "file:/f.wav",
                                    "file:/g.wav", "file:/unlisted.wav"], "length": [10, 20, 40, 5000, 60, 0, 70]})
    # a is embedded (skipped even though listed); f's clip_id belongs to another file already.
    embedded = pd.DataFrame({"path": ["file:/a.wav", "file:/old.wav"], "clip_id": ["a", "f"]})
    todo, rejects, skipped = plan_extract(inputs, listed, embedded, max_file_bytes=1000)
    assert skipped == 1
    assert todo[["clip_id", "length"]].values.tolist() == [["b", 20], ["d", 40]]
    assert dict(zip(rejects["clip_id"], rejects["reject_reason"])) == {
        "c": "missing", "e": "too_large", "f": "duplicate_clip_id", "g": "empty"}
    assert "file:/old.wav" in rejects.set_index("clip_id").loc["f", "reject_message"]


def test_base_clip_ids_of_windowed_rows():
    rows = pd.DataFrame({"path": ["p1", "p2", "p2", "p2", "p3"],
                         "clip_id": ["one", "long#0", "long#2", "long#4", "with#hash"]})
    ids = base_clip_ids(rows["clip_id"], rows["path"])
    assert ids.to_dict() == {"p1": "one", "p2": "long", "p3": "with#hash"}


def spark_slices(n: int, k: int) -> list[tuple[int, int]]:
    """Spark's ParallelCollectionRDD cut of n rows into k slices (the LocalTableScan partitions)."""
    return [((i * n) // k, ((i + 1) * n) // k) for i in range(k)]


@pytest.mark.parametrize("seed", range(300))
def test_balanced_order_evens_bytes_over_spark_slices(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 400)), int(rng.integers(1, 9))
    lengths = rng.integers(1, 10**7, n) if seed % 3 else np.full(n, 64044)
    if seed % 5 == 0:
        lengths[:3] *= 50  # a few ten-minute files among clips
    order = balanced_order(lengths, k)
    assert sorted(order.tolist()) == list(range(n))
    totals = [lengths[order[a:b]].sum() for a, b in spark_slices(n, k)]
    # Largest first, dealt round-robin: no slice is more than one file away from another.
    assert max(totals) - min(totals) <= lengths.max()


# ---- worker --------------------------------------------------------------------------------
def test_valid_files_match_the_extractor_run_by_hand(tmp_path, logmel):
    paths = [write(tmp_path / f"{i}.wav", tone(2.0, 200 + 100 * i, seed=i), subtype="PCM_16") for i in range(5)]
    out = embed_files(files_frame(paths), logmel, windows_per_call=3)
    assert list(out.columns) == OUTPUT_COLUMNS
    assert out["clip_id"].tolist() == [f"c{i}" for i in range(5)] and out["reject_reason"].isna().all()
    assert out["offset_s"].tolist() == [0.0] * 5 and out["n_windows"].tolist() == [1] * 5
    for path, vector in zip(paths, out["embedding"]):
        x, sr = sf.read(path, dtype="float32")
        np.testing.assert_allclose(vector, logmel.embed(x[None])[0], rtol=1e-5, atol=1e-5)
    # Given the bytes instead of reading them: the same rows.
    with_bytes = files_frame(paths).assign(content=[open(p, "rb").read() for p in paths])
    again = embed_files(with_bytes, logmel, windows_per_call=1)
    np.testing.assert_allclose(np.stack(again["embedding"]), np.stack(out["embedding"]), rtol=1e-5, atol=1e-5)


def test_long_file_becomes_windows_named_by_offset(tmp_path, logmel):
    x = tone(5.5, 300.0)
    path = write(tmp_path / "long.wav", x, subtype="FLOAT")
    out = embed_files(files_frame([path], ["long"]), logmel)
    # 0-2, 2-4, 4-5.5 (3/4 full, zero-padded): kept.
    assert out["clip_id"].tolist() == ["long#0", "long#2", "long#4"]
    assert out["offset_s"].tolist() == [0.0, 2.0, 4.0] and out["n_windows"].tolist() == [3, 3, 3]
    by_hand = np.zeros((3, 32000), np.float32)
    by_hand[0], by_hand[1], by_hand[2, :24000] = x[:32000], x[32000:64000], x[64000:]
    np.testing.assert_allclose(np.stack(out["embedding"]), logmel.embed(by_hand), rtol=1e-5, atol=1e-5)
    capped = embed_files(files_frame([path], ["long"]), logmel, max_windows=2)
    assert capped["clip_id"].tolist() == ["long#0", "long#2"]


def test_every_bad_file_is_one_reject_row_with_its_reason(tmp_path, logmel):
    good = write(tmp_path / "good.wav", tone(2.0), subtype="PCM_16")
    (tmp_path / "zero.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("not audio at all\n" * 10)
    nan = tone(2.0)
    nan[100:200] = np.nan
    buf = io.BytesIO()
    sf.write(buf, tone(2.0), SR, format="WAV", subtype="PCM_16")
    (tmp_path / "truncated_header.wav").write_bytes(buf.getvalue()[:30])
    paths = [good, str(tmp_path / "zero.wav"), str(tmp_path / "text.wav"),
             write(tmp_path / "nan.wav", nan, subtype="FLOAT"), write(tmp_path / "silent.wav", np.zeros(32000, np.float32)),
             write(tmp_path / "short.wav", tone(0.2)), str(tmp_path / "absent.wav"),
             str(tmp_path / "truncated_header.wav")]
    out = embed_files(files_frame(paths), logmel, windows_per_call=2)
    assert out.groupby("path").size().to_dict() == dict.fromkeys(paths, 1)
    assert dict(zip(out["path"], out["reject_reason"])) == {
        good: None, paths[1]: "empty", paths[2]: "unsupported_format", paths[3]: "nan_samples",
        paths[4]: "all_silent", paths[5]: "too_short", paths[6]: "missing", paths[7]: "unreadable"}
    rejected = out[out["reject_reason"].notna()]
    assert rejected["embedding"].isna().all() and (rejected["n_windows"] == 0).all()
    assert all(p in m for p, m in zip(rejected["path"], rejected["reject_message"]))
    # Bytes handed over as None (the reader could not read them).
    unread = embed_files(files_frame([good]).assign(content=[None]), logmel)
    assert unread["reject_reason"].tolist() == ["unreadable"]


class LoudnessGate(Extractor):
    """A real extractor for the failure paths: RMS per window; raises on a batch holding a window
    louder than ``fail_above``, and returns NaN for a window louder than ``nan_above``."""

    name, version, sample_rate, window_samples, embedding_dim = "gate", "gate-v1", SR, 32000, 1

    def __init__(self, fail_above=np.inf, nan_above=np.inf):
        self.fail_above, self.nan_above, self.calls = fail_above, nan_above, []

    def embed(self, batch):
        rms = np.sqrt(np.mean(np.square(batch, dtype=np.float64), axis=1))
        self.calls.append(len(batch))
        if (rms > self.fail_above).any():
            raise RuntimeError("window too loud for this model")
        return np.where(rms > self.nan_above, np.nan, rms)[:, None].astype(np.float32)


def test_an_extractor_failure_rejects_only_its_file(tmp_path):
    quiet = [write(tmp_path / f"q{i}.wav", tone(2.0, amp=0.1, seed=i), subtype="FLOAT") for i in range(4)]
    loud = write(tmp_path / "loud.wav", tone(2.0, amp=0.9), subtype="FLOAT")
    gate = LoudnessGate(fail_above=0.5)
    out = embed_files(files_frame(quiet[:2] + [loud] + quiet[2:]), gate, windows_per_call=8)
    assert dict(zip(out["path"], out["reject_reason"])) == {**dict.fromkeys(quiet), loud: "extractor_error"}
    assert "too loud" in out.set_index("path").loc[loud, "reject_message"]
    assert gate.calls == [5, 1, 1, 1, 1, 1]  # one batch, then file by file to find the culprit


def test_a_file_with_one_nan_window_is_rejected_whole(tmp_path):
    x = np.concatenate([tone(2.0, amp=0.1), tone(2.0, amp=0.9), tone(2.0, amp=0.1)])
    long = write(tmp_path / "long.wav", x, subtype="FLOAT")
    fine = write(tmp_path / "fine.wav", tone(4.0, amp=0.1), subtype="FLOAT")
    out = embed_files(files_frame([long, fine], ["long", "fine"]), LoudnessGate(nan_above=0.5))
    assert out["clip_id"].tolist() == ["long", "fine#0", "fine#2"]  # no window of 'long' is kept
    assert out["reject_reason"].tolist() == ["nan_embedding", None, None]
