"""Decoding real files written with soundfile, resampling against analytic references, rejections
from real corrupt inputs, and windowing."""
import io

import numpy as np
import pytest
import soundfile as sf

from audiohash.audio import AudioRejected, decode_audio, split_windows
from audiohash.errors import AudiohashError


def encode(x: np.ndarray, sr: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def sine(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def peak(x: np.ndarray, sr: int) -> tuple[float, float]:
    """(frequency of the largest FFT bin in Hz, amplitude sqrt(2) * RMS) of a single sine."""
    k = int(np.argmax(np.abs(np.fft.rfft(x * np.hanning(x.size)))))
    return k * sr / x.size, float(np.sqrt(2 * np.mean(np.square(x, dtype=np.float64))))


def rejection(data: bytes, source: str = "clip.wav", **kw) -> AudioRejected:
    with pytest.raises(AudioRejected) as info:
        decode_audio(data, source, **kw)
    return info.value


# ---- decoding ----------------------------------------------------------------------------------
def test_pcm16_wav_at_16k_round_trips_within_one_lsb():
    x = sine(440, 16000, 1.0)
    y = decode_audio(encode(x, 16000, subtype="PCM_16"), "a.wav")
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.max(np.abs(y - x)) <= 1 / 32768


def test_float_wav_is_exact_and_not_clipped():
    x = sine(440, 16000, 1.0, amp=1.5)  # float formats may exceed full scale: kept as is
    y = decode_audio(encode(x, 16000, subtype="FLOAT"), "a.wav")
    np.testing.assert_array_equal(y, x)


def test_flac_8_channels_44k_is_averaged_and_resampled():
    sr, n = 44100, 44100 * 2 + 17
    s = sine(1000, sr, n / sr, amp=1.0)[:n]
    # Two channels cancel, six carry 0.4: the mean is 0.3 * s (the sum 2.4 * s, channel 0 0.8 * s).
    chans = np.stack([0.8 * s, -0.8 * s] + [0.4 * s] * 6, axis=1)
    y = decode_audio(encode(chans, sr, "FLAC"), "multi.flac")
    assert y.shape == (round(n * 16000 / sr),)
    freq, amp = peak(y, 16000)
    assert abs(freq - 1000) <= 16000 / y.size
    assert amp == pytest.approx(0.3, rel=0.01)
    # Sample by sample against the analytic 1 kHz sine at 16 kHz (soxr compensates its delay);
    # edges excluded where the resampler's filter runs off the signal.
    t = np.arange(y.size) / 16000
    ref = 0.3 * np.sin(2 * np.pi * 1000 * t)
    assert np.max(np.abs(y[500:-500] - ref[500:-500])) < 1e-3


def test_resampler_is_band_limited_not_linear_interpolation():
    sr = 44100
    # 6 kHz is below the new Nyquist: kept with its shape; linear interpolation errs by ~5%.
    y = decode_audio(encode(sine(6000, sr, 1.0), sr, subtype="FLOAT"), "hi.wav")
    t = np.arange(y.size) / 16000
    assert np.max(np.abs(y[500:-500] - 0.5 * np.sin(2 * np.pi * 6000 * t)[500:-500])) < 2e-3
    # 10 kHz is above 8 kHz: must be filtered out; linear interpolation would fold it to 6 kHz.
    tone = sine(10000, sr, 1.0) + sine(500, sr, 1.0, amp=0.01)  # quiet 500 Hz keeps it non-silent
    y = decode_audio(encode(tone, sr, subtype="FLOAT"), "alias.wav")
    spec = np.abs(np.fft.rfft(y[500:-500] * np.hanning(y.size - 1000)))
    freqs = np.fft.rfftfreq(y.size - 1000, 1 / 16000)
    assert np.max(spec[np.abs(freqs - 6000) < 50]) < 1e-3 * np.max(spec[np.abs(freqs - 500) < 50])


@pytest.mark.skipif("OGG" not in sf.available_formats(), reason="libsndfile built without OGG")
def test_ogg_vorbis_stereo_48k():
    x = sine(2000, 48000, 1.5)
    y = decode_audio(encode(np.stack([x, x], axis=1), 48000, "OGG", "VORBIS"), "a.ogg")
    assert y.shape == (24000,)
    freq, amp = peak(y, 16000)
    assert abs(freq - 2000) <= 16000 / y.size
    assert amp == pytest.approx(0.5, rel=0.05)  # lossy codec


# ---- rejections ----------------------------------------------------------------------------------
def test_zero_bytes_is_empty():
    err = rejection(b"", "s3://bucket/zero.wav")
    assert err.reason == "empty" and err.source == "s3://bucket/zero.wav"
    assert "s3://bucket/zero.wav" in str(err) and isinstance(err, AudiohashError)


def test_valid_header_without_frames_is_empty():
    assert rejection(encode(np.zeros(0, np.float32), 16000, subtype="PCM_16")).reason == "empty"


def test_text_named_wav_is_unsupported_format():
    err = rejection(b"this is a text file, not audio\n" * 20, "notes.wav")
    assert err.reason == "unsupported_format" and "notes.wav" in str(err)


def test_truncated_header_is_unreadable():
    data = encode(sine(440, 16000, 1.0), 16000, subtype="PCM_16")
    assert rejection(data[:20]).reason == "unreadable"  # cut inside the 'fmt ' chunk
    assert rejection(data[:40]).reason == "unreadable"  # 'data' chunk marker missing


def test_truncated_wav_body_decodes_the_frames_present():
    x = sine(440, 16000, 2.0)
    data = encode(x, 16000, subtype="PCM_16")
    y = decode_audio(data[: 44 + 2 * 12000], "cut.wav")  # 44-byte header + 12000 16-bit frames
    assert y.shape == (12000,)
    assert np.max(np.abs(y - x[:12000])) <= 1 / 32768
    assert rejection(data[: 44 + 2 * 4000]).reason == "too_short"  # 0.25 s left


def test_truncated_flac_is_unreadable():
    data = encode(sine(440, 16000, 2.0), 16000, "FLAC")
    assert rejection(data[: len(data) // 2], "cut.flac").reason == "unreadable"


def test_nan_float_wav():
    x = sine(440, 16000, 1.0)
    x[100:200] = np.nan
    err = rejection(encode(x, 16000, subtype="FLOAT"))
    assert err.reason == "nan_samples" and "100 of 16000" in str(err)
    inf = encode(np.full(16000, np.inf, np.float32), 16000, subtype="FLOAT")
    assert rejection(inf).reason == "nan_samples"


def test_silence():
    zeros = encode(np.zeros(16000, np.float32), 16000, subtype="PCM_16")
    assert rejection(zeros).reason == "all_silent"
    hiss = np.random.default_rng(0).normal(0, 1e-5, 16000).astype(np.float32)
    assert rejection(encode(hiss, 16000, subtype="FLOAT")).reason == "all_silent"
    quiet = sine(440, 16000, 1.0, amp=1e-3)  # -60 dBFS is quiet audio, not silence
    assert decode_audio(encode(quiet, 16000, subtype="PCM_16"), "quiet.wav").size == 16000


def test_too_short_uses_the_native_duration_and_the_parameter():
    data = encode(sine(440, 44100, 0.4), 44100, subtype="PCM_16")
    err = rejection(data)
    assert err.reason == "too_short" and "0.400 s" in str(err)
    assert decode_audio(data, "x.wav", min_duration_s=0.3).shape == (6400,)
    assert decode_audio(encode(sine(440, 16000, 0.6), 16000), "ok.wav").shape == (9600,)


# ---- windowing ----------------------------------------------------------------------------------
def test_ten_minute_file_back_to_back_windows():
    sr = 16000
    wave = (np.arange(600 * sr) % 10007).astype(np.float32)  # no period of 2 s: offsets checkable
    windows = split_windows(wave, sr, window_s=2.0)
    assert len(windows) == 300
    assert [o for o, _ in windows] == [2.0 * i for i in range(300)]
    for offset, w in windows[::37]:
        start = int(offset * sr)
        np.testing.assert_array_equal(w, wave[start : start + 2 * sr])
    assert all(w.shape == (32000,) and w.dtype == np.float32 for _, w in windows)
    assert len(split_windows(wave, sr, window_s=2.0, max_windows=25)) == 25
    overlapping = split_windows(wave, sr, window_s=2.0, hop_s=0.5)
    # 1197 full windows, then 598.5 (1.5 s of audio) and 599.0 (1 s: exactly half) are kept
    assert len(overlapping) == 1199 and overlapping[-1][0] == 599.0


def test_trailing_partial_window_kept_if_at_least_half_full():
    sr = 16000
    wave = np.ones(int(600.7 * sr), np.float32)
    assert len(split_windows(wave, sr, 2.0)) == 300  # 0.7 s tail < 1 s: dropped
    wave = np.ones(int(601.3 * sr), np.float32)
    windows = split_windows(wave, sr, 2.0)
    assert len(windows) == 301 and windows[-1][0] == 600.0
    tail = windows[-1][1]
    assert tail[: int(1.3 * sr)].min() == 1 and not tail[int(1.3 * sr) :].any()


def test_short_clip_is_padded_to_one_window():
    wave = np.ones(int(0.6 * 16000), np.float32)
    [(offset, w)] = split_windows(wave, 16000, 2.0)
    assert offset == 0.0 and w.shape == (32000,)
    assert w[:9600].min() == 1 and not w[9600:].any()
    assert split_windows(np.zeros(0, np.float32), 16000, 2.0) == []


def test_windows_do_not_alias_the_input():
    wave = np.ones(64000, np.float32)
    windows = split_windows(wave, 16000, 2.0)
    windows[0][1][:] = 0
    assert wave.min() == 1


@pytest.mark.parametrize(
    "kw", [{"window_s": 0}, {"hop_s": -1.0}, {"max_windows": 0}, {"min_fill": 0}]
)
def test_bad_window_parameters(kw):
    with pytest.raises(AudiohashError):
        split_windows(np.ones(32000, np.float32), 16000, **{"window_s": 2.0, **kw})
