"""The aisfx extractor against the aisfx 0.1.2 package's own code (run from its hash-checked wheel
in a subprocess, on WAV files), the checkpoint checks, and the extractor's constants.

The weights are never skipped over: without them these tests fail with the fetch instruction
(scripts/bootstrap.sh fetches them before the suite runs)."""
import fractions
import hashlib
import io
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from audiohash import aisfx
from audiohash.audio import decode_audio
from audiohash.errors import AudiohashError
from audiohash.extraction import embed_files
from audiohash.features import AisfxExtractor, get_extractor, make_extractor

SR = aisfx.SAMPLE_RATE
W = aisfx.WINDOW_SAMPLES


def weights_file(name: str) -> Path:
    path = aisfx.weights_dir() / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: {aisfx.FETCH_HINT}")
    return path


@pytest.fixture(scope="module")
def extractor() -> AisfxExtractor:
    weights_file(aisfx.CHECKPOINT_NAME)
    return make_extractor("aisfx")


# The package's path for one file (inference.main without its folder walk): its librosa
# spectrogram, transposed to (frames, 96) as blocking() expects, 'original' normalization,
# 100-frame blocks (hop 50, zero rows padding a short spectrogram), CrossNet.get_embedding.
PACKAGE_REFERENCE = textwrap.dedent("""
    import sys, types
    import numpy as np, torch
    sys.modules.setdefault("tqdm", types.SimpleNamespace(tqdm=lambda it, *a, **k: it))  # not in our venv
    from aisfx import inference, preprocessing
    from aisfx.spectrogram import spectrogram_librosa

    weights, ds_dict = inference.load_weights("cpu")
    model = inference.load_bestModel(weights, ds_dict, "cpu")
    out = {}
    for path in sys.argv[2:]:
        spec = spectrogram_librosa.compute_spectrogram(
            path, inference.SAMPLE_RATE, inference.SPEC_BLOCK_LENGTH, inference.SPEC_HOP_LENGTH,
            inference.MEL_BINS, inference.F_MIN, inference.F_MAX).T
        spec = preprocessing.spectrogram_normalize(spec, spec_norm="original")
        blocks = preprocessing.blocking(spec, inference.EMB_BLOCK_LENGTH, inference.EMB_BLOCK_LENGTH // 2, True)
        with torch.no_grad():
            out[path] = (blocks.astype(np.float32), model.get_embedding(torch.Tensor(blocks)).numpy())
    np.save(sys.argv[1], np.array(out, dtype=object), allow_pickle=True)
""")


@pytest.fixture(scope="module")
def clips(small_manifest, tmp_path_factory) -> dict[str, Path]:
    """WAV files at 44.1 kHz (float, so the package and decode_audio read the same samples):
    - gm_window: two real GM clips (different programs) upsampled and joined, cut to one window;
    - gm_short: 26 hops (0.604 s) of a third, at peak 0.3;
    - noise_burst: 0.1 s of white noise, then silence, 43 hops (0.998 s) in all;
    - gm_clip: a whole 2-s clip, 88200 samples: not a whole number of hops;
    - gm_long: the three clips joined (6 s): three windows."""
    rows = pd.read_csv(small_manifest)
    def gm(i: int) -> np.ndarray:
        path = small_manifest.parent / rows["path"][i]
        return decode_audio(path.read_bytes(), str(path), SR)
    joined = np.concatenate([gm(0), gm(40), gm(200)])
    short = gm(100)[:26 * aisfx.HOP_LENGTH]
    burst = np.zeros(43 * aisfx.HOP_LENGTH, np.float32)
    burst[2000:2000 + SR // 10] = 0.5 * np.random.default_rng(0).standard_normal(SR // 10)
    waves = {"gm_window": joined[:W], "gm_short": 0.3 * short / np.abs(short).max(),
             "noise_burst": burst, "gm_clip": gm(150), "gm_long": joined}
    folder = tmp_path_factory.mktemp("aisfx-clips")
    for name, wave in waves.items():
        sf.write(folder / f"{name}.wav", wave, SR, subtype="FLOAT")
    return {name: folder / f"{name}.wav" for name in waves}


@pytest.fixture(scope="module")
def package_output(clips, tmp_path_factory) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (the package's normalized blocks (k, 100, 96), its embeddings (k, 512))."""
    wheel = weights_file(aisfx.WHEEL_NAME)
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == aisfx.WHEEL_SHA256
    unpacked = tmp_path_factory.mktemp("aisfx-wheel")
    zipfile.ZipFile(wheel).extractall(unpacked)  # load_weights reads a file beside its module
    out = unpacked / "reference.npy"
    # The wheel is hash-checked above, so its own torch.load may unpickle it the old way.
    env = {**os.environ, "PYTHONPATH": str(unpacked), "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    done = subprocess.run([sys.executable, "-c", PACKAGE_REFERENCE, str(out), *map(str, clips.values())],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    by_path = np.load(out, allow_pickle=True).item()
    return {name: by_path[str(path)] for name, path in clips.items()}


def embed_clips(extractor, clips, names) -> pd.DataFrame:
    """The extract worker (decode, split_windows, embed) on the named files."""
    files = pd.DataFrame({"clip_id": names, "path": [str(clips[n]) for n in names],
                          "label": None, "split": None, "source": None})
    out = embed_files(files, extractor, windows_per_call=4)
    assert out["reject_reason"].isna().all(), out["reject_message"].tolist()
    return out


def test_the_extract_worker_reproduces_the_package(extractor, clips, package_output):
    names = ["gm_window", "gm_short", "noise_burst"]
    out = embed_clips(extractor, clips, names)
    assert out["clip_id"].tolist() == names and out["n_windows"].tolist() == [1, 1, 1]
    for name, ours in zip(names, out["embedding"]):
        blocks, theirs = package_output[name]
        assert blocks.shape == (1, 100, 96) and theirs.shape == (1, 512)
        # The front end on the zero-padded window is the package's spectrogram padded with zero
        # rows (these clips are whole hops long), and the embeddings agree to float rounding
        # (max abs diff 2.4e-6 on values up to 6 when written).
        wave = decode_audio(clips[name].read_bytes(), name, SR)
        padded = np.zeros((1, W), np.float32)
        padded[0, :wave.size] = wave
        spec = extractor.front_end(torch.from_numpy(padded)).numpy()
        np.testing.assert_allclose(spec, blocks, rtol=0, atol=1e-5)
        np.testing.assert_allclose(ours, theirs[0], rtol=1e-5, atol=1e-4)


def test_a_clip_of_no_whole_number_of_hops_differs_in_one_frame_only(extractor, clips, package_output):
    """88200 samples = 86 hops + 136: the package's spectrogram has 1 + 88200 // 1024 = 87 frames
    and zero rows after; frame 87 of the padded window also sees the clip's last 136 samples."""
    blocks, theirs = package_output["gm_clip"]
    wave = decode_audio(clips["gm_clip"].read_bytes(), "gm_clip", SR)
    padded = np.zeros((1, W), np.float32)
    padded[0, :wave.size] = wave
    spec = extractor.front_end(torch.from_numpy(padded)).numpy()[0]
    last = 1 + wave.size // aisfx.HOP_LENGTH
    assert (blocks[0, last:] == 0).all() and spec[last].max() > 0
    others = np.r_[0:last, last + 1:100]
    np.testing.assert_allclose(spec[others], blocks[0, others], rtol=0, atol=1e-5)
    (ours,) = embed_clips(extractor, clips, ["gm_clip"])["embedding"]
    assert np.abs(ours - theirs[0]).max() < 0.05  # 0.018 of values up to 3.5 when written


def test_a_long_file_gives_one_row_per_window(extractor, clips):
    out = embed_clips(extractor, clips, ["gm_window", "gm_long"])
    # 6 s = 264600 samples: windows at 0, W and 2 W (61848 samples, over half a window: kept).
    assert out["offset_s"].tolist() == [0.0, 0.0, W / SR, 2 * W / SR]
    assert out["clip_id"].tolist() == ["gm_window", "gm_long#0", "gm_long#2.29878", "gm_long#4.59755"]
    # Each window is normalized on its own: the first window of the long file is gm_window.
    np.testing.assert_allclose(out["embedding"][1], out["embedding"][0], rtol=1e-6, atol=1e-6)


def test_extractor_constants_and_version(extractor):
    sha = hashlib.sha256(weights_file(aisfx.CHECKPOINT_NAME).read_bytes()).hexdigest()
    assert sha == aisfx.CHECKPOINT_SHA256
    assert extractor.version == f"aisfx-0.1.2-{sha[:16]}-librosa-htk96-101376smp-v1"
    assert (extractor.sample_rate, extractor.window_samples, extractor.embedding_dim) == (44100, 101376, 512)
    assert round(W / SR * SR) == W  # what embed_files hands split_windows comes back as W samples
    x = 0.1 * np.random.default_rng(1).standard_normal((3, W)).astype(np.float32)
    x[2] = 0  # digital silence stays finite (the peak normalization leaves it alone)
    assert extractor.front_end(torch.from_numpy(x)).shape == (3, 100, 96)
    e = extractor.embed(x)
    assert e.shape == (3, 512) and e.dtype == np.float32 and np.isfinite(e).all() and (e >= 0).all()
    # Batch neighbours and a gain change nothing (each row is peak-normalized on its own).
    np.testing.assert_allclose(e[:1], extractor.embed(0.5 * x[:1]), rtol=1e-5, atol=1e-5)
    assert extractor.embed(np.zeros((0, W), np.float32)).shape == (0, 512)
    other = make_extractor("aisfx", window_s=1.0)
    assert other.window_samples == 44100 and other.version.endswith("-44100smp-v1")
    with pytest.raises(AudiohashError, match="7168"):
        make_extractor("aisfx", window_s=0.1)
    with pytest.raises(AudiohashError, match=r"\(b, 101376\)"):
        extractor.embed(np.zeros((1, 32000), np.float32))


def test_chunked_batches_equal_one_pass(extractor, monkeypatch):
    x = 0.1 * np.random.default_rng(2).standard_normal((3, W)).astype(np.float32)
    whole = extractor.embed(x)
    monkeypatch.setattr(AisfxExtractor, "MAX_CHUNK", 1)
    np.testing.assert_allclose(extractor.embed(x), whole, rtol=1e-5, atol=1e-5)


def test_altered_or_missing_checkpoint_is_refused_naming_the_path(tmp_path, monkeypatch):
    good = weights_file(aisfx.CHECKPOINT_NAME).read_bytes()
    altered = bytearray(good)
    altered[len(altered) // 2] ^= 1
    (tmp_path / "altered").mkdir()
    (tmp_path / "altered" / aisfx.CHECKPOINT_NAME).write_bytes(bytes(altered))
    bad = str(tmp_path / "altered" / aisfx.CHECKPOINT_NAME)
    with pytest.raises(AudiohashError, match=rf"{re.escape(bad)} has sha256 .*--fetch"):
        make_extractor("aisfx", weights_dir=str(tmp_path / "altered"))
    missing = str(tmp_path / "empty" / aisfx.CHECKPOINT_NAME)
    with pytest.raises(AudiohashError, match=rf"{re.escape(missing)} .*No such file.*--fetch"):
        make_extractor("aisfx", weights_dir=str(tmp_path / "empty"))
    # The folder from the environment: the cache key follows the file, so nothing stale is reused.
    get_extractor("aisfx")
    monkeypatch.setenv(aisfx.DIR_ENV, str(tmp_path / "empty"))
    with pytest.raises(AudiohashError, match=rf"{re.escape(missing)} .*bootstrap\.sh"):
        get_extractor("aisfx")
    with pytest.raises(SystemExit, match=rf"{re.escape(missing)} .*--fetch"):
        aisfx.main([])


def test_fetch_keeps_intact_files_without_downloading(monkeypatch):
    weights_file(aisfx.WHEEL_NAME)
    def no_download(*args, **kwargs):
        raise AssertionError(f"fetch ran {args}")
    monkeypatch.setattr(subprocess, "run", no_download)
    assert aisfx.fetch() == aisfx.checkpoint_path()


def test_the_unpickler_runs_no_arbitrary_code():
    buffer = io.BytesIO()
    torch.save({"embedding_net.x": fractions.Fraction(1, 3)}, buffer)  # a global not allowlisted
    with pytest.raises(AudiohashError, match="not a loadable aisfx checkpoint.*Fraction"):
        aisfx.unpickle_state_dict(buffer.getvalue(), "test bytes")
