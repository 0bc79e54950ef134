"""Embedding extractors: a batch of fixed-length windows in, one float32 vector per window out.

Two extractors share the ``Extractor`` interface:
- ``logmel`` (default, no weights): four statistics over time of each log-mel band (level-free
  mean and max, std, std of the frame-to-frame change), 4 * n_mels dims.
- ``torchscript``: any TorchScript file mapping a waveform batch (b, samples) to (b, d).

The Spark layer builds them through ``get_extractor`` (one instance per Python worker process
and parameter set, so a model is loaded once, not once per batch), decodes with
``decode_audio(..., target_sr=extractor.sample_rate)`` and cuts ``extractor.window_samples``-long
windows. Nothing here sets torch's thread count: the caller sets it from ``spark.task.cpus``.
"""
from __future__ import annotations

import abc
import hashlib
import inspect
import io
import json
import os
import warnings

import librosa
import numpy as np
import torch

from audiohash.audio import DEFAULT_WINDOW_S, TARGET_SR
from audiohash.errors import AudiohashError


class Extractor(abc.ABC):
    """Interface of every extractor.

    name: registry name. version: changes whenever the output for the same input may change
    (parameters, model file checksum); stored beside the embeddings so mismatches are caught.
    sample_rate: Hz the input must have. window_samples: samples per input row.
    embedding_dim: output columns.
    """

    name: str
    version: str
    sample_rate: int
    window_samples: int
    embedding_dim: int

    @abc.abstractmethod
    def embed(self, batch: np.ndarray) -> np.ndarray:
        """Embed float32 (b, window_samples) at ``sample_rate`` -> float32 (b, embedding_dim)."""

    @classmethod
    def fingerprint(cls, params: dict) -> tuple:
        """Cache-key parts beyond the parameters (e.g. a model file's mtime); none by default."""
        return ()

    def _as_batch(self, batch: np.ndarray) -> torch.Tensor:
        """Check a (b, window_samples) batch; wrap it as a float32 tensor (no copy if possible)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 2 or batch.shape[1] != self.window_samples:
            raise AudiohashError(
                f"{self.name}: expected a batch of shape (b, {self.window_samples}), "
                f"got {batch.shape}"
            )
        if not np.isfinite(batch).all():
            raise AudiohashError(f"{self.name}: input batch holds NaN or inf samples")
        return torch.from_numpy(batch)


class LogMelExtractor(Extractor):
    """Log-mel band statistics, per band: [mean over time - level, std over time,
    max over time - level, std over time of the frame-to-frame change], 4 * n_mels dims.

    level: the clip's loudest frame, log of its total mel power. Subtracting it makes every
    statistic independent of the recording's gain (a gain g adds log(g**2) to every log-mel value,
    so to the level too), which the v1 statistics (plain mean and std) were not: clips of one
    sound at different levels sat far apart. The max keeps the spectrum at the sound's peak
    whatever share of the window it fills; the spread of the frame-to-frame change measures
    how the spectrum moves (attack, vibrato, tremolo, noise), which the v1 mean and std could
    not tell from a steady note. On the GM benchmark (benchmarks/quality.py, README Results) this
    lifted mAP@all at 32 bits from 0.16 to 0.29 for PQ and 0.37 to 0.47 for DQN, at 128 dims too.

    Defaults: 64 ms Hann window (n_fft = win_length = 1024, so every FFT bin is measured, not
    interpolated by zero-padding), 10 ms hop, 32 Slaney mel bands over 0-8000 Hz. Frames are
    taken without centre padding so every frame is real audio; 2-s windows give 194 frames.
    Units: natural log of mel-weighted power (full-scale amplitude 1.0); eps floors silence.
    """

    name = "logmel"

    def __init__(
        self,
        window_s: float = DEFAULT_WINDOW_S,
        n_fft: int = 1024,
        win_length: int = 1024,
        hop_length: int = 160,
        n_mels: int = 32,
        fmin: float = 0.0,
        fmax: float = TARGET_SR / 2,
        eps: float = 1e-6,
    ):
        self.sample_rate = TARGET_SR
        self.window_samples = int(round(window_s * TARGET_SR))
        if not 0 < win_length <= n_fft or hop_length <= 0 or n_mels <= 0:
            raise AudiohashError(
                f"logmel: need 0 < win_length <= n_fft, hop_length > 0, n_mels > 0; got "
                f"win_length={win_length}, n_fft={n_fft}, hop_length={hop_length}, n_mels={n_mels}"
            )
        if self.window_samples < n_fft:
            raise AudiohashError(
                f"logmel: window of {self.window_samples} samples is shorter than n_fft={n_fft}"
            )
        if not 0 <= fmin < fmax <= TARGET_SR / 2:
            raise AudiohashError(
                f"logmel: need 0 <= fmin < fmax <= {TARGET_SR // 2} Hz, got {fmin}, {fmax}"
            )
        self.n_fft, self.win_length, self.hop_length = n_fft, win_length, hop_length
        self.n_mels, self.eps = n_mels, eps
        self.embedding_dim = 4 * n_mels
        self.window = torch.hann_window(win_length, periodic=True, dtype=torch.float32)
        # librosa gives (n_mels, bins). Each row is repeated for the real and the imaginary part, so
        # (frames, [re0, im0, re1, im1, ...]) squared in place @ (2 * bins, mels) = |X|^2 @ fb
        # without allocating a separate power spectrogram (the STFT is the batch's largest tensor).
        fb = librosa.filters.mel(sr=TARGET_SR, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
        self.mel_fb = torch.from_numpy(np.repeat(fb.T, 2, axis=0).astype(np.float32))
        # Every parameter that changes the output is in the version, readable in a table.
        self.version = (
            f"logmel-v2-{n_mels}mel-{n_fft}fft-{win_length}win-{hop_length}hop-"
            f"{fmin:g}-{fmax:g}hz-{self.window_samples}smp-eps{eps:g}"
        )

    def embed(self, batch: np.ndarray) -> np.ndarray:
        x = self._as_batch(batch)
        if x.shape[0] == 0:
            return np.zeros((0, self.embedding_dim), np.float32)
        with torch.inference_mode():
            # One STFT for the whole batch: (b, bins, frames) complex64.
            spec = torch.stft(
                x, self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                window=self.window, center=False, return_complex=True,
            )
            # (b, frames, 2 * bins) real view; torch lays the STFT out frame-major, so this is
            # normally a view and the in-place square touches no new memory.
            parts = torch.view_as_real(spec.transpose(1, 2)).flatten(2).square_()
            mel = parts @ self.mel_fb + self.eps  # (b, frames, mels)
            logmel = torch.log(mel)
            level = torch.log(mel.sum(dim=2).amax(dim=1, keepdim=True))  # (b, 1): loudest frame
            std, mean = torch.std_mean(logmel, dim=1, correction=0)
            change = torch.std(logmel[:, 1:] - logmel[:, :-1], dim=1, correction=0)
            return torch.cat([mean - level, std, logmel.amax(dim=1) - level, change], dim=1).numpy()


class TorchScriptExtractor(Extractor):
    """Any TorchScript module: forward(float32 (b, samples)) -> float32 (b, d).

    path: the .pt file (torch.jit.save output). window_s / sample_rate: what the model expects.
    version: first 16 hex digits of the file's sha256. embedding_dim: read by running the model
    once on a zero batch at load time, which also rejects models with the wrong output shape.
    """

    name = "torchscript"

    def __init__(
        self, path: str, window_s: float = DEFAULT_WINDOW_S, sample_rate: int = TARGET_SR
    ):
        self.path = str(path)
        self.sample_rate = int(sample_rate)
        self.window_samples = int(round(window_s * self.sample_rate))
        try:
            with open(self.path, "rb") as f:
                blob = f.read()
        except OSError as e:
            raise AudiohashError(
                f"torchscript: cannot read model file {self.path}: {e.strerror}"
            ) from e
        # Hash and load the same bytes, so the version always describes the model in memory.
        self.version = hashlib.sha256(blob).hexdigest()[:16]
        try:
            # torch 2.15 flags TorchScript as deprecated on every load; it still loads and runs,
            # and one warning per worker and model would only clutter the executor logs.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self.model = torch.jit.load(io.BytesIO(blob), map_location="cpu")
        except Exception as e:  # torch raises RuntimeError, ValueError or zipfile errors here
            raise AudiohashError(
                f"torchscript: {self.path} is not a TorchScript file (save it with torch.jit.save "
                f"of a scripted or traced module): {e}"
            ) from e
        self.model.eval()
        # Probe with 2 rows so a model that drops or mixes the batch dimension is caught too.
        self.embedding_dim = self._run(torch.zeros(2, self.window_samples)).shape[1]

    @classmethod
    def fingerprint(cls, params: dict) -> tuple:
        # A worker process can outlive a job: a model file replaced in place must not hit the cache.
        try:
            st = os.stat(params["path"])
        except (KeyError, TypeError, OSError):
            return ()  # make_extractor / the constructor report the missing parameter or file
        return (st.st_mtime_ns, st.st_size)

    def _run(self, x: torch.Tensor) -> np.ndarray:
        """Run the model on (b, window_samples); return float32 (b, d), d > 0, all finite."""
        try:
            with torch.inference_mode():
                out = self.model(x)
        except Exception as e:  # a scripted model raises torch.jit.Error / RuntimeError
            raise AudiohashError(
                f"torchscript: model {self.path} failed on input {tuple(x.shape)}: {e}"
            ) from e
        b = x.shape[0]
        if not (isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == b
                and out.shape[1] > 0):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise AudiohashError(
                f"torchscript: model {self.path} returned {got} for input {tuple(x.shape)}, "
                f"expected ({b}, d)"
            )
        out = out.to(torch.float32).numpy()
        if not np.isfinite(out).all():
            raise AudiohashError(f"torchscript: model {self.path} returned NaN or inf embeddings")
        return out

    def embed(self, batch: np.ndarray) -> np.ndarray:
        x = self._as_batch(batch)
        if x.shape[0] == 0:
            return np.zeros((0, self.embedding_dim), np.float32)
        out = self._run(x)
        if out.shape[1] != self.embedding_dim:  # shape-dependent models can change width
            raise AudiohashError(
                f"torchscript: model {self.path} returned width {out.shape[1]} on a batch of "
                f"{x.shape[0]}, but {self.embedding_dim} at load time"
            )
        return out


EXTRACTORS: dict[str, type[Extractor]] = {
    "logmel": LogMelExtractor,
    "torchscript": TorchScriptExtractor,
}


def make_extractor(name: str, **params) -> Extractor:
    """Build a new extractor; AudiohashError for an unknown name or parameter."""
    cls = EXTRACTORS.get(name)
    if cls is None:
        known = ", ".join(sorted(EXTRACTORS))
        raise AudiohashError(f"unknown extractor {name!r}; known extractors: {known}")
    try:  # check the keywords before building, so a TypeError raised inside is not misreported
        inspect.signature(cls).bind(**params)
    except TypeError as e:
        raise AudiohashError(f"extractor {name!r}: bad parameters {sorted(params)}: {e}") from e
    return cls(**params)


_CACHE: dict[tuple, Extractor] = {}


def get_extractor(name: str, **params) -> Extractor:
    """Per-process cached ``make_extractor``: same (name, params) -> same instance.

    Spark reuses Python workers across tasks, so a model is loaded once per worker. The key is
    the JSON of the parameters (lists and paths included) plus the extractor's fingerprint.
    """
    cls = EXTRACTORS.get(name)
    extra = cls.fingerprint(params) if cls is not None else ()
    key = (name, json.dumps(params, sort_keys=True, default=str), extra)
    if key not in _CACHE:
        _CACHE[key] = make_extractor(name, **params)
    return _CACHE[key]
