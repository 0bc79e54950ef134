"""Extractors: logmel statistics and timbre descriptors checked against hand-worked properties;
torchscript against the eager model it was saved from; the registry and the per-process cache."""
import hashlib

import librosa
import numpy as np
import pytest
import torch

from audiohash.errors import AudiohashError
from audiohash.features import LogMelExtractor, TimbreExtractor, TorchScriptExtractor, get_extractor, make_extractor

SR = 16000
# torch 2.15 marks torch.jit.script/trace/save deprecated; the tests still need TorchScript files.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


@pytest.fixture(scope="module")
def logmel() -> LogMelExtractor:
    return make_extractor("logmel")


def noise(b: int, n: int = 32000, seed: int = 0, scale: float = 0.1) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal((b, n))).astype(np.float32)


# ---- logmel --------------------------------------------------------------------------------------
def test_logmel_shape_dtype_finite_deterministic(logmel):
    assert (logmel.sample_rate, logmel.window_samples, logmel.embedding_dim) == (16000, 32000, 128)
    x = noise(5)
    x[4] = 0  # a silent (padded) row must stay finite: eps floors the log
    e = logmel.embed(x)
    assert e.shape == (5, 128) and e.dtype == np.float32 and np.isfinite(e).all()
    np.testing.assert_array_equal(e, logmel.embed(x))
    # Silence: every band at log(eps), the level at log(32 * eps): level-free mean and max -log(32).
    flat = np.full(32, -np.log(32.0))
    np.testing.assert_allclose(e[4], np.r_[flat, np.zeros(32), flat, np.zeros(32)], atol=1e-5)
    assert logmel.embed(np.zeros((0, 32000), np.float32)).shape == (0, 128)


def test_logmel_batch_rows_are_independent(logmel):
    x = noise(6, seed=1) * np.linspace(0.1, 2, 6, dtype=np.float32)[:, None]
    batch = logmel.embed(x)
    for i in range(6):
        np.testing.assert_allclose(batch[i], logmel.embed(x[i : i + 1])[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch[::-1], logmel.embed(x[::-1]), rtol=1e-5, atol=1e-5)


def test_gain_changes_no_statistic(logmel):
    # Power scales by g^2 in every bin, so log(mel) moves by log(g^2) wherever mel >> eps: so does
    # the level, which the mean and max are taken relative to; spreads do not move at all.
    x = noise(2, seed=2)
    base, loud = logmel.embed(x), logmel.embed(3.0 * x)
    np.testing.assert_allclose(loud, base, atol=1e-3)


def test_statistics_by_hand():
    # A tone that sounds in the second half of the window only: the mean over time sits below the
    # max (half the frames are silence), the tone's band changes between frames only where it
    # starts, and the level is the loudest frame's total power.
    ext = make_extractor("logmel", n_mels=8)
    t = np.arange(32000) / SR
    x = np.where(t >= 1.0, 0.5 * np.sin(2 * np.pi * 1000 * t), 0.0)[None].astype(np.float32)
    e = ext.embed(x)[0].reshape(4, 8)
    spec = np.abs(librosa.stft(x[0], n_fft=1024, hop_length=160, win_length=1024, window="hann", center=False)) ** 2
    logmel = np.log(librosa.filters.mel(sr=SR, n_fft=1024, n_mels=8) @ spec + 1e-6)  # (8, frames)
    level = np.log(np.exp(logmel).sum(0)).max()
    np.testing.assert_allclose(e[0], logmel.mean(1) - level, atol=2e-3)
    np.testing.assert_allclose(e[1], logmel.std(1), atol=2e-3)
    np.testing.assert_allclose(e[2], logmel.max(1) - level, atol=2e-3)
    np.testing.assert_allclose(e[3], np.diff(logmel, axis=1).std(1), atol=2e-3)
    assert (e[2] > e[0] + 1).all()


@pytest.mark.parametrize("band", [3, 10, 20, 28])
def test_sine_peaks_in_the_band_centred_on_its_frequency(logmel, band):
    # Slaney mel centres for 32 bands over 0-8000 Hz, computed independently of the extractor.
    centres = librosa.mel_frequencies(n_mels=34, fmin=0.0, fmax=8000.0)[1:-1]
    f = centres[band]
    t = np.arange(32000) / SR
    e = logmel.embed((0.5 * np.sin(2 * np.pi * f * t))[None].astype(np.float32))
    assert int(np.argmax(e[0, :32])) == band
    assert int(np.argmax(e[0, 64:96])) == band


def test_logmel_version_follows_parameters(logmel):
    assert logmel.version == make_extractor("logmel").version
    assert logmel.version.startswith("logmel-v2-32mel-1024fft")
    changes = [{"n_mels": 64}, {"hop_length": 320}, {"fmin": 50.0}, {"window_s": 1.0},
               {"win_length": 400}]
    others = [make_extractor("logmel", **kw).version for kw in changes]
    assert len({logmel.version, *others}) == 6
    assert make_extractor("logmel", n_mels=64).embedding_dim == 256


def test_logmel_rejects_bad_batches_and_parameters(logmel):
    for bad in [np.zeros(32000, np.float32), np.zeros((2, 16000), np.float32)]:
        with pytest.raises(AudiohashError, match="32000"):
            logmel.embed(bad)
    x = noise(2)
    x[1, 5] = np.nan
    with pytest.raises(AudiohashError, match="NaN"):
        logmel.embed(x)
    with pytest.raises(AudiohashError, match="n_fft"):
        make_extractor("logmel", window_s=0.05)
    with pytest.raises(AudiohashError, match="fmax"):
        make_extractor("logmel", fmax=9000.0)


# ---- timbre --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def timbre() -> TimbreExtractor:
    return make_extractor("timbre")


T = np.arange(32000) / SR


def descriptor(e: np.ndarray, name: str) -> np.ndarray:
    """The named descriptor columns of timbre rows e (b, 224), in the order the docstring gives."""
    spans = {"cepstral": (128, 144), "envelope": (144, 153), "modulation": (153, 177), "shape": (177, 187),
             "harmonicity": (187, 192), "shift": (192, 224)}
    lo, hi = spans[name]
    return e[:, lo:hi]


def harmonic(f0: float, n: int = 10, amplitude: float = 0.3) -> np.ndarray:
    """A steady tone of n harmonics (amplitudes 1/k) below 8 kHz, peak about ``amplitude``."""
    ks = [k for k in range(1, n + 1) if k * f0 < 7800]
    x = sum(np.sin(2 * np.pi * k * f0 * T) / k for k in ks)
    return (amplitude * x / np.abs(x).max()).astype(np.float32)


def test_timbre_is_logmel_plus_96_descriptors(timbre, logmel):
    assert (timbre.embedding_dim, timbre.window_samples) == (224, 32000)
    assert timbre.version.startswith("timbre-v1-32mel-1024fft") and timbre.version != logmel.version
    x = noise(3, seed=4)
    x[2] = 0  # digital silence stays finite
    e = timbre.embed(x)
    assert e.shape == (3, 224) and e.dtype == np.float32 and np.isfinite(e).all()
    np.testing.assert_allclose(e[:, :128], logmel.embed(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(e[1], timbre.embed(x[1:2])[0], rtol=1e-4, atol=1e-4)
    assert timbre.embed(np.zeros((0, 32000), np.float32)).shape == (0, 224)
    assert make_extractor("timbre", n_mels=64).embedding_dim == 4 * 64 + 96


def test_timbre_gain_changes_no_descriptor(timbre):
    # As for logmel: wherever the recording's noise floor is far above eps (any real recording).
    tones = np.stack([np.zeros_like(T), harmonic(330.0), harmonic(440.0) * (T > 0.7)])
    x = (tones + noise(3, seed=5, scale=0.01)).astype(np.float32)
    for gain in (0.5, 3.0):
        np.testing.assert_allclose(timbre.embed(gain * x), timbre.embed(x), atol=1e-2)


def test_timbre_descriptors_by_hand(timbre):
    steady, half = harmonic(220.0), harmonic(220.0) * (T >= 1.0)
    sine = (0.3 * np.sin(2 * np.pi * 1000 * T)).astype(np.float32)
    tremolo = (sine * (1 + 0.5 * np.sin(2 * np.pi * 6 * T))).astype(np.float32)
    e = timbre.embed(np.stack([steady, half, sine, tremolo, noise(1, seed=6)[0]]))
    env = descriptor(e, "envelope")
    np.testing.assert_allclose(env[0, :5], 0.0, atol=0.05)  # a steady tone: every frame at the level
    assert env[1, 0] < -10 and abs(env[1, 4]) < 0.05  # half silence: the 0.1 quantile is the floor
    shape = descriptor(e, "shape")  # w-mean/std of log centroid, log spread, log flatness, log roll-off
    assert abs(shape[2, 0] - np.log(1001.0)) < 0.02 and shape[2, 1] < 0.01  # a sine's centroid is its frequency
    # White noise: every bin's power is exponential, E[log P] - log E[P] = -Euler's gamma.
    assert abs(shape[4, 4] - (-0.5772)) < 0.05 and shape[2, 4] < -5
    harm = descriptor(e, "harmonicity")  # peak w-mean, w-std, max; log f0 mean, std
    # f0 at the peak quefrency, a whole number of samples: 16000 / 73 = 219.2 Hz
    assert abs(harm[0, 3] - np.log(220.0)) < 0.01 and harm[0, 4] < 0.01
    assert harm[0, 0] > 3 * harm[4, 0]  # a harmonic tone's cepstral peak stands far above noise's
    mod = descriptor(e, "modulation")[3].reshape(3, 8)  # rows: 1-4, 4-10, 10-30 Hz; columns: band groups
    group = int(np.argmax(timbre.embed(sine[None])[0, 64:96])) // 4  # the group holding the sine's band
    assert mod[1, group] > mod[0, group] + 2 and mod[1, group] > mod[2, group] + 2
    steady_mod = descriptor(e, "modulation")[2].reshape(3, 8)
    assert mod[1, group] > steady_mod[1, group] + 5  # 6 Hz tremolo, not a steady sine


def test_timbre_shift_spectrum_barely_moves_with_the_note(timbre):
    # Above 1 kHz mel is nearly logarithmic: a sine an octave higher shifts the 96-band spectrum,
    # which changes the band means a lot and the DFT magnitudes little.
    e = timbre.embed(np.stack([0.3 * np.sin(2 * np.pi * f * T) for f in (1500.0, 3000.0)]).astype(np.float32))
    moved_shift = np.linalg.norm(descriptor(e, "shift")[0] - descriptor(e, "shift")[1]) / np.linalg.norm(descriptor(e, "shift")[0])
    moved_bands = np.linalg.norm(e[0, :32] - e[1, :32]) / np.linalg.norm(e[0, :32])
    assert moved_shift < 0.25 * moved_bands


def test_timbre_rejects_parameters_it_cannot_use():
    for n_mels in (8, 20):
        with pytest.raises(AudiohashError, match="multiple of 8 above 16"):
            make_extractor("timbre", n_mels=n_mels)
    with pytest.raises(AudiohashError, match="n_bands"):
        make_extractor("timbre", n_bands=64)


# ---- registry and cache ----------------------------------------------------------------------
def test_unknown_extractor_lists_known_ones():
    with pytest.raises(AudiohashError, match=r"'vggish'.*logmel, timbre, torchscript"):
        make_extractor("vggish")
    with pytest.raises(AudiohashError, match="n_bands"):
        make_extractor("logmel", n_bands=64)


def test_get_extractor_caches_per_parameter_set():
    a = get_extractor("logmel", n_mels=48)
    assert get_extractor("logmel", n_mels=48) is a
    assert get_extractor("logmel", n_mels=40) is not a
    assert get_extractor("logmel") is not a


# ---- torchscript ---------------------------------------------------------------------------------
class TinyConv(torch.nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.conv = torch.nn.Conv1d(1, 8, kernel_size=64, stride=32)
        self.proj = torch.nn.Linear(8, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x.unsqueeze(1)))  # (b, 8, frames)
        return self.proj(h.mean(dim=2))  # (b, dim)


class Flat(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)  # (b,): not an embedding batch


class BatchWide(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : x.shape[0]]  # (b, b): its width depends on the batch size


def save_scripted(module: torch.nn.Module, path) -> str:
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(module), str(path))
    return str(path)


def test_torchscript_matches_the_eager_model(tmp_path):
    torch.manual_seed(0)
    eager = TinyConv(dim=16).eval()
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.trace(eager, torch.zeros(1, 32000)), str(path))
    ext = make_extractor("torchscript", path=str(path))
    assert ext.embedding_dim == 16 and ext.window_samples == 32000 and ext.sample_rate == 16000
    assert ext.version == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    x = noise(3, seed=3)
    out = ext.embed(x)
    with torch.no_grad():
        ref = eager(torch.from_numpy(x)).numpy()
    assert out.shape == (3, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(AudiohashError, match="32000"):
        ext.embed(noise(2, n=16000))


def test_torchscript_window_parameter(tmp_path):
    path = save_scripted(TinyConv(dim=7), tmp_path / "m.pt")
    ext = make_extractor("torchscript", path=path, window_s=1.0)
    assert ext.window_samples == 16000 and ext.embed(noise(2, n=16000)).shape == (2, 7)


def test_torchscript_bad_files_name_the_path(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(AudiohashError, match="missing.pt"):
        make_extractor("torchscript", path=str(missing))
    state = tmp_path / "state_dict.pt"
    torch.save(TinyConv().state_dict(), str(state))  # a checkpoint, not TorchScript
    with pytest.raises(AudiohashError, match="state_dict.pt.*not a TorchScript"):
        make_extractor("torchscript", path=str(state))
    text = tmp_path / "text.pt"
    text.write_text("not a model")
    with pytest.raises(AudiohashError, match="text.pt.*not a TorchScript"):
        make_extractor("torchscript", path=str(text))
    flat = save_scripted(Flat(), tmp_path / "flat.pt")
    with pytest.raises(AudiohashError, match=r"flat.pt returned \(2,\)"):
        make_extractor("torchscript", path=flat)
    with pytest.raises(AudiohashError, match="path"):
        make_extractor("torchscript")


def test_torchscript_width_must_stay_what_the_probe_saw(tmp_path):
    ext = make_extractor("torchscript", path=save_scripted(BatchWide(), tmp_path / "wide.pt"))
    assert ext.embedding_dim == 2 and ext.embed(noise(2)).shape == (2, 2)
    with pytest.raises(AudiohashError, match="wide.pt returned width 3"):
        ext.embed(noise(3))


def test_torchscript_model_that_fails_on_the_window_is_reported(tmp_path):
    # 0.001 s = 16 samples, shorter than the conv kernel: the probe at load time fails.
    path = save_scripted(TinyConv(), tmp_path / "tiny.pt")
    with pytest.raises(AudiohashError, match="tiny.pt failed on input"):
        make_extractor("torchscript", path=path, window_s=0.001)


def test_get_extractor_reloads_a_replaced_model_file(tmp_path):
    path = save_scripted(TinyConv(dim=4), tmp_path / "m.pt")
    first = get_extractor("torchscript", path=path)
    assert get_extractor("torchscript", path=path) is first
    torch.jit.save(torch.jit.script(TinyConv(dim=5)), path)
    second = get_extractor("torchscript", path=path)
    assert second is not first and second.embedding_dim == 5 and second.version != first.version
    assert isinstance(second, TorchScriptExtractor)
