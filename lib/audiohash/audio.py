"""Decode audio bytes to 16 kHz mono float32 and cut them into fixed-length windows.

Pure functions over numpy arrays (no Spark): the Spark layer calls ``decode_audio`` once per file
inside mapInPandas/mapInArrow and ``split_windows`` to emit one ``clip_id#offset`` row per window.

A file that cannot become a usable waveform raises ``AudioRejected`` with a machine-readable
``reason`` (one of ``AudioRejected.REASONS``) so the caller can count rejects per reason instead of
failing the job. Checks run in this order, the first failing one wins:

- ``empty``: zero bytes, or a valid header with zero frames;
- ``unsupported_format``: libsndfile does not recognise the container or its encoding
  (e.g. a text file named ``.wav``);
- ``unreadable``: a recognised but damaged file (malformed header, decoder error mid-stream);
- ``nan_samples``: any NaN or +-inf sample (float WAV/FLAC can carry them);
- ``too_short``: fewer than ``min_duration_s`` seconds of audio;
- ``all_silent``: RMS below ``silence_rms`` (full scale = 1.0).

Truncated files: libsndfile shortens a WAV whose body was cut off to the frames actually present
without an error, so those frames are decoded (and then face the checks above); a compressed
stream (FLAC, OGG) whose decoder reports an error is rejected as ``unreadable`` rather than
indexed half-decoded, since the last decoded block may already be garbage.
"""
from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import soxr

from audiohash.errors import AudiohashError

TARGET_SR = 16000  # Hz; every extractor in audiohash.features consumes 16 kHz mono
DEFAULT_WINDOW_S = 2.0  # default clip length fed to the extractors
MIN_DURATION_S = 0.5
SILENCE_RMS = 1e-4  # -80 dBFS: below 16-bit dither level, i.e. digital silence plus noise floor
_READ_BLOCK_FRAMES = 1 << 16  # decode in blocks so an 8-channel file never sits in memory whole

# libsndfile's public error codes meaning "not a format/encoding I can decode" (sndfile.h:
# SF_ERR_UNRECOGNISED_FORMAT = 1, SF_ERR_UNSUPPORTED_ENCODING = 4); every other code is a
# recognised file that is damaged.
_UNSUPPORTED_CODES = frozenset({1, 4})


class AudioRejected(AudiohashError):
    """A file that cannot be turned into a usable waveform.

    ``reason`` is one of ``REASONS`` (stable strings, fit for a ``reject_reason`` column);
    ``source`` is the path or id the caller passed; the message names both.
    """

    REASONS = frozenset(
        {"unreadable", "empty", "too_short", "all_silent", "nan_samples", "unsupported_format"}
    )

    def __init__(self, source: str, reason: str, detail: str):
        if reason not in self.REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(f"{source}: rejected ({reason}): {detail}")
        self.source = source
        self.reason = reason


def _read_mono(data: bytes, source: str) -> tuple[np.ndarray, int]:
    """Decode ``data`` with libsndfile; return (mono float32 (n,), native sample rate in Hz)."""
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr = f.samplerate
            blocks = []
            # Read until libsndfile returns nothing rather than trusting f.frames: a truncated
            # file's header can claim more frames than the body holds.
            while len(block := f.read(_READ_BLOCK_FRAMES, dtype="float32", always_2d=True)):
                blocks.append(block.mean(axis=1, dtype=np.float32))
    except sf.LibsndfileError as e:
        reason = "unsupported_format" if e.code in _UNSUPPORTED_CODES else "unreadable"
        raise AudioRejected(source, reason, e.error_string) from e
    mono = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    return mono, sr


def decode_audio(
    data: bytes,
    source: str,
    target_sr: int = TARGET_SR,
    min_duration_s: float = MIN_DURATION_S,
    silence_rms: float = SILENCE_RMS,
) -> np.ndarray:
    """Decode one audio file to mono float32 at ``target_sr``.

    data: the file's bytes, any container libsndfile reads (WAV, FLAC, OGG/Vorbis, MP3, AIFF, ...),
        any sample rate, any channel count.
    source: path or id of the file, used only in rejection messages.
    Returns float32 array (n,), samples in [-1, 1] for integer formats (float formats are not
    clipped), n = round(frames * target_sr / native_sr).
    Channels are averaged (not summed), so a mono file copied to N channels decodes unchanged.
    Resampling uses soxr 'HQ' (band-limited, anti-aliased): content above target_sr / 2 is
    removed, not folded back as linear interpolation would.
    Raises AudioRejected (see the module docstring for reasons and their order).
    """
    if len(data) == 0:
        raise AudioRejected(source, "empty", "zero-byte file")
    mono, sr = _read_mono(data, source)
    if mono.size == 0:
        raise AudioRejected(source, "empty", "file holds no audio frames")
    if not np.isfinite(mono).all():
        bad = int(np.count_nonzero(~np.isfinite(mono)))
        raise AudioRejected(source, "nan_samples", f"{bad} of {mono.size} samples are NaN or inf")
    duration = mono.size / sr
    if duration < min_duration_s:
        raise AudioRejected(
            source, "too_short", f"{duration:.3f} s of audio, minimum is {min_duration_s} s"
        )
    # float64 accumulation: a float32 running sum over millions of samples is too coarse to
    # compare a mean square near 1e-8 (RMS 1e-4) with the threshold.
    rms = float(np.sqrt(np.mean(np.square(mono, dtype=np.float64))))
    if rms < silence_rms:
        raise AudioRejected(
            source, "all_silent", f"RMS {rms:.2e} below threshold {silence_rms:.0e}"
        )
    if sr != target_sr:
        mono = soxr.resample(mono, sr, target_sr, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def split_windows(
    wave: np.ndarray,
    sr: int,
    window_s: float = DEFAULT_WINDOW_S,
    hop_s: float | None = None,
    max_windows: int | None = None,
    min_fill: float = 0.5,
) -> list[tuple[float, np.ndarray]]:
    """Cut a waveform into fixed-length windows.

    wave: float32 (n,) at ``sr`` Hz. window_s / hop_s: window length and step in seconds
    (hop_s defaults to window_s: back-to-back windows). max_windows: keep only the first ones,
    to bound the cost of very long files.
    Returns [(offset_s, window float32 (round(window_s * sr),)), ...] ordered by offset.

    Padding rule: a window is emitted when at least ``min_fill`` of it is real audio, and its
    missing tail is zero-padded; so a long file's trailing partial window is kept if it holds
    >= min_fill of a window, else dropped (a mostly-zero window would embed as near-silence and
    pollute retrieval). The exception is a clip with less audio than that in total (decode_audio
    already enforced the minimum duration): it still gives one padded window at offset 0.
    The windows are rows of one fresh (k, window) array, not views of ``wave``, so
    ``np.stack([w for _, w in windows])`` makes the extractor batch.
    """
    if window_s <= 0 or (hop_s is not None and hop_s <= 0):
        raise AudiohashError(
            f"split_windows: window_s and hop_s must be > 0, got {window_s}, {hop_s}"
        )
    if max_windows is not None and max_windows < 1:
        raise AudiohashError(f"split_windows: max_windows must be >= 1, got {max_windows}")
    if not 0 < min_fill <= 1:
        raise AudiohashError(f"split_windows: min_fill must be in (0, 1], got {min_fill}")
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise AudiohashError(f"split_windows: expected a 1-d waveform, got shape {wave.shape}")
    n = wave.size
    if n == 0:
        return []
    win = int(round(window_s * sr))
    hop = int(round((hop_s if hop_s is not None else window_s) * sr))
    # Starts whose window holds >= min_fill real samples (at least start 0, for short clips);
    # integer sample positions keep the offsets exact multiples of the hop.
    min_samples = int(np.ceil(min_fill * win))
    starts = np.arange(0, max(n - min_samples + 1, 1), hop)[:max_windows]
    # Pad once at the end so every start indexes a full window, then gather all windows at once.
    padded = np.concatenate([wave, np.zeros(max(int(starts[-1]) + win - n, 0), np.float32)])
    frames = np.lib.stride_tricks.sliding_window_view(padded, win)[starts]
    return [(float(s) / sr, frame) for s, frame in zip(starts, frames)]
