"""Embedding extractors: a batch of fixed-length windows in, one float32 vector per window out.

Four extractors share the ``Extractor`` interface:
- ``logmel`` (no weights): four statistics over time of each log-mel band (level-free
  mean and max, std, std of the frame-to-frame change), 4 * n_mels dims.
- ``timbre`` (default, no weights): logmel's statistics plus 96 descriptors of the envelope,
  modulation, spectral shape, harmonicity and a note-independent spectrum, 4 * n_mels + 96 dims.
- ``torchscript``: any TorchScript file mapping a waveform batch (b, samples) to (b, d).
- ``aisfx`` (pretrained weights, ``audiohash.aisfx``): a CNN trained on sound-effects libraries
  (Ma & Lerch, ISMIR 2022), 512 dims from 2.3-s windows at 44.1 kHz.

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

from audiohash import aisfx
from audiohash.audio import DEFAULT_WINDOW_S, TARGET_SR
from audiohash.errors import AudiohashError


def file_fingerprint(path) -> tuple:
    """(mtime in ns, size) of a weights file, for the extractor cache key; () when it cannot be
    read (the extractor's constructor then reports the missing file by name)."""
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (st.st_mtime_ns, st.st_size)


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
            parts = self._squared_stft(x)
            mel = parts @ self.mel_fb + self.eps  # (b, frames, mels)
            return self._features(parts, mel).numpy()

    def _features(self, parts: torch.Tensor, mel: torch.Tensor) -> torch.Tensor:
        """The output columns from the squared STFT parts and the mel power; here the band statistics."""
        return self._band_statistics(torch.log(mel), torch.log(mel.sum(dim=2)))

    def _squared_stft(self, x: torch.Tensor) -> torch.Tensor:
        """(b, frames, 2 * bins): squared real and imaginary parts, [re0^2, im0^2, re1^2, ...]."""
        # One STFT for the whole batch: (b, bins, frames) complex64.
        spec = torch.stft(
            x, self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
            window=self.window, center=False, return_complex=True,
        )
        # torch lays the STFT out frame-major, so this is normally a view and the in-place
        # square touches no new memory.
        return torch.view_as_real(spec.transpose(1, 2)).flatten(2).square_()

    @staticmethod
    def _band_statistics(logmel: torch.Tensor, frame_power: torch.Tensor) -> torch.Tensor:
        """(b, frames, mels) log mel power (eps included), (b, frames) log of each frame's summed
        mel power -> (b, 4 * mels) statistics."""
        level = frame_power.amax(dim=1, keepdim=True)  # (b, 1): loudest frame
        std, mean = torch.std_mean(logmel, dim=1, correction=0)
        change = torch.std(logmel[:, 1:] - logmel[:, :-1], dim=1, correction=0)
        return torch.cat([mean - level, std, logmel.amax(dim=1) - level, change], dim=1)


def _weighted_mean_std(values: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of (b, frames) values, the mean and std under (b, frames) weights summing to 1."""
    mean = (weights * values).sum(dim=1)
    return mean, (weights * (values - mean[:, None]) ** 2).sum(dim=1).sqrt()


class TimbreExtractor(LogMelExtractor):
    """logmel's 4 * n_mels band statistics plus 96 clip descriptors of timbre (224 dims by default).

    The band statistics describe the spectrum where a sound is; an instrument's identity sits
    also in what they blur: how its loudness evolves, how fast its bands flicker, how noisy or
    harmonic it is, and its spectral shape independent of the note played. Descriptors, in order
    (frames weighted toward the loud ones by w = softmax over time of 2 x log frame power, i.e.
    in proportion to the squared power, so the sound outweighs the noise floor between notes):
    - 16 cepstral spreads: std over time of MFCC 1-16 (orthonormal DCT-II of the log-mel frames);
    - 9 envelope: the frame level (log total power minus the clip's loudest frame's) at
      quantiles 0.1, 0.25, 0.5, 0.75, 0.9; the std, mean rise, mean fall and largest jump of its
      frame-to-frame change;
    - 24 modulation: 8 groups of adjacent bands, log power of each group's log-envelope
      fluctuation at 1-4, 4-10 and 10-30 Hz (note rate, vibrato and tremolo, roughness);
    - 10 spectral shape (linear frequency): w-mean and w-std of the log centroid, log spread,
      log flatness and log 85% roll-off; log mean and log max of the spectral flux;
    - 5 harmonicity: the real cepstrum's highest peak at fundamental 40-1000 Hz per frame, its
      w-mean, w-std and max; the log fundamental at that peak, mean and std under weights
      toward frames both loud and harmonic;
    - 32 note-independent spectrum: |DFT| coefficients 1-32, along frequency, of the w-mean
      log spectrum on 96 mel bands from 50 Hz (mel is logarithmic above 1 kHz, so playing an
      instrument higher mostly shifts this spectrum, which moves the DFT's phase, not its size).
    Every descriptor is a difference or ratio of powers, so like the band statistics it does not
    change with the recording's gain. On the GM benchmark (benchmarks/quality.py, README Results)
    they lifted mAP@all at 32 bits, over logmel v2 alone, from 0.29 to 0.37 for PQ, 0.47 to 0.64
    for DQN and 0.60 to 0.83 for the successor.
    """

    name = "timbre"
    N_CEPSTRAL, N_GROUPS, MODULATION_HZ = 16, 8, ((1, 4), (4, 10), (10, 30))
    F0_HZ, SHIFT_BANDS, SHIFT_FMIN, N_SHIFT = (40.0, 1000.0), 96, 50.0, 32
    N_DESCRIPTORS = N_CEPSTRAL + 9 + 3 * N_GROUPS + 10 + 5 + N_SHIFT
    # Floors the power of one FFT bin before a log: far below 16-bit quantization noise in a bin
    # (about 3e-8 with this window), so it only keeps digital silence finite and the gain
    # invariance holds for any real recording (eps, sized for mel bands, would flatten quiet bins).
    BIN_FLOOR = 1e-10
    TOP_DB = 80.0

    def __init__(self, **params):  # logmel's parameters (the signature below says so to make_extractor)
        super().__init__(**params)
        n_mels, bins = self.n_mels, self.n_fft // 2 + 1
        if n_mels <= self.N_CEPSTRAL or n_mels % self.N_GROUPS:
            raise AudiohashError(f"timbre: n_mels must be a multiple of {self.N_GROUPS} above "
                                 f"{self.N_CEPSTRAL}, got {n_mels}")
        lowest_f0 = max(self.F0_HZ[0], 2.0 * self.sample_rate / self.n_fft)  # quefrency within the frame
        self.quefrencies = (int(self.sample_rate / self.F0_HZ[1]), int(self.sample_rate / lowest_f0))
        self.embedding_dim = 4 * n_mels + self.N_DESCRIPTORS
        self.version = "timbre-v1-" + self.version.removeprefix("logmel-v2-")
        k, n = np.arange(1, self.N_CEPSTRAL + 1)[None], np.arange(n_mels)[:, None]
        dct = np.sqrt(2.0 / n_mels) * np.cos(np.pi * k * (2 * n + 1) / (2 * n_mels))  # ortho DCT-II rows 1..16
        self.dct = torch.from_numpy(dct.astype(np.float32))  # (mels, 16)
        self.frequencies = torch.linspace(0, self.sample_rate / 2, bins)
        fb = librosa.filters.mel(sr=self.sample_rate, n_fft=self.n_fft, n_mels=self.SHIFT_BANDS,
                                 fmin=self.SHIFT_FMIN, fmax=self.sample_rate / 2)
        self.shift_fb = torch.from_numpy(fb.T.astype(np.float32))  # (bins, 96)
        self.frame_rate = self.sample_rate / self.hop_length

    def _features(self, parts: torch.Tensor, mel: torch.Tensor) -> torch.Tensor:
        power = parts.unflatten(2, (-1, 2)).sum(dim=3)  # (b, frames, bins) |X|^2
        logmel, frame_power = torch.log(mel), torch.log(mel.sum(dim=2))
        return torch.cat([self._band_statistics(logmel, frame_power),
                          self._descriptors(power, logmel, frame_power)], dim=1)

    def _descriptors(self, power: torch.Tensor, logmel: torch.Tensor, frame_power: torch.Tensor) -> torch.Tensor:
        eps, floor = self.eps, self.BIN_FLOOR
        level = frame_power - frame_power.amax(dim=1, keepdim=True)
        weights = torch.softmax(2.0 * frame_power, dim=1)
        out = [(logmel @ self.dct).std(dim=1, correction=0)]
        # envelope
        rise = level[:, 1:] - level[:, :-1]
        quantiles = torch.quantile(level, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9]), dim=1).T
        out += [quantiles, torch.stack([rise.std(dim=1, correction=0), rise.clamp(min=0).mean(dim=1),
                                        rise.clamp(max=0).mean(dim=1), rise.abs().amax(dim=1)], dim=1)]
        # modulation of band-group envelopes
        groups = logmel.unflatten(2, (self.N_GROUPS, -1)).mean(dim=3)
        spectrum = torch.fft.rfft(groups - groups.mean(dim=1, keepdim=True), dim=1).abs().square()
        rates = torch.arange(spectrum.shape[1]) * self.frame_rate / groups.shape[1]
        out += [torch.log(spectrum[:, (rates >= lo) & (rates < hi)].mean(dim=1) + eps) for lo, hi in self.MODULATION_HZ]
        # spectral shape
        share = power / (power.sum(dim=2, keepdim=True) + floor)
        centroid = (share * self.frequencies).sum(dim=2)
        spread = (share * (self.frequencies - centroid[..., None]) ** 2).sum(dim=2).sqrt()
        logpower = torch.log(power + floor)
        flatness = logpower.mean(dim=2) - torch.log(power.mean(dim=2) + floor)
        below = (torch.cumsum(share, dim=2) < 0.85).sum(dim=2).clamp(max=len(self.frequencies) - 1)
        rolloff = self.frequencies[below]
        for v in (torch.log(centroid + 1), torch.log(spread + 1), flatness, torch.log(rolloff + 1)):
            out += list(_weighted_mean_std(v, weights))
        flux = (logpower[:, 1:] - logpower[:, :-1]).clamp(min=0).mean(dim=2)
        out += [torch.log(flux.mean(dim=1) + eps), torch.log(flux.amax(dim=1) + eps)]
        # harmonicity: the real cepstrum's peak within the fundamental range
        lo, hi = self.quefrencies
        cepstrum = torch.fft.irfft(logpower, n=self.n_fft, dim=2)[:, :, lo:hi]
        peak, at = cepstrum.max(dim=2)
        out += list(_weighted_mean_std(peak, weights)) + [peak.amax(dim=1)]
        f0 = torch.log(self.sample_rate / (at + lo).float())
        out += list(_weighted_mean_std(f0, torch.softmax(2.0 * frame_power + 20.0 * peak, dim=1)))
        # note-independent spectrum
        shift = torch.log(power @ self.shift_fb + floor)
        # At most TOP_DB below the clip's strongest band, as librosa.power_to_db's top_db: the
        # silence between a pure tone's partials is then as deep whatever the gain.
        shift = torch.maximum(shift, shift.amax(dim=(1, 2), keepdim=True) - self.TOP_DB * np.log(10) / 10)
        mean_shift = (weights[..., None] * shift).sum(dim=1)
        out.append(torch.fft.rfft(mean_shift - mean_shift.mean(dim=1, keepdim=True), dim=1).abs()[:, 1:self.N_SHIFT + 1])
        return torch.cat([v if v.ndim == 2 else v[:, None] for v in out], dim=1)


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
        if not isinstance(params.get("path"), (str, os.PathLike)):
            return ()  # make_extractor / the constructor report the missing or bad parameter
        return file_fingerprint(params["path"])

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


class AisfxExtractor(Extractor):
    """aiSFX's pretrained embedding (``audiohash.aisfx``): (b, window_samples) at 44.1 kHz ->
    (b, 512): per channel of the last conv block, the max over time of its mean over frequency
    (non-negative: it comes after a ReLU).

    window_s: None = the package's own block, 99 * 1024 = 101376 samples (2.299 s), which the
    centred STFT turns into exactly its 100 frames; other lengths work (the network pools over
    time) but the model saw 100-frame blocks in training. A shorter clip arrives zero-padded by
    ``audio.split_windows``; for a clip of a whole number of hops (1024 samples) that is the
    package's own zero-row padding of its spectrogram, otherwise the first padding frame differs:
    it still holds the clip's last (n mod 1024) samples where the package has a zero row (max
    abs difference 0.018 in the embedding of a 2-s clip, tests/test_aisfx.py). Each window is
    peak-normalized on its own, as the package does each file.
    weights_dir: the folder holding checkpoint.pth; None = $AUDIOHASH_AISFX_DIR or its default.
    version: the checkpoint's sha256 (first 16 hex digits), the front end and the window.
    """

    name = "aisfx"
    # Windows per forward pass, whatever batch the caller hands in: each of the first block's
    # feature maps is 2.5 MB a window, and at 4 they stay in cache better than at 8 or 16
    # (about 32 vs 35-40 ms a window on 2 cores); it also bounds the memory a large batch takes.
    MAX_CHUNK = 4

    def __init__(self, window_s: float | None = None, weights_dir: str | None = None):
        self.sample_rate = aisfx.SAMPLE_RATE
        self.window_samples = (aisfx.WINDOW_SAMPLES if window_s is None
                               else int(round(window_s * self.sample_rate)))
        if self.window_samples < aisfx.MIN_SAMPLES:
            raise AudiohashError(f"aisfx: window of {self.window_samples} samples is shorter than "
                                 f"the {aisfx.MIN_SAMPLES} (8 frames) the network needs")
        self.embedding_dim = aisfx.EMBEDDING_DIM
        self.front_end = aisfx.LogMelFrontEnd()
        self.net, sha256 = aisfx.pretrained_net(weights_dir)
        self.version = (f"aisfx-{aisfx.PACKAGE_VERSION}-{sha256[:16]}-librosa-htk96-"
                        f"{self.window_samples}smp-v1")

    @classmethod
    def fingerprint(cls, params: dict) -> tuple:
        # The folder may come from the environment, and a worker can outlive a job: key the cache
        # on the file actually read, so a replaced or moved checkpoint is loaded (and checked) anew.
        path = aisfx.checkpoint_path(params.get("weights_dir"))
        return (str(path), *file_fingerprint(path))

    def embed(self, batch: np.ndarray) -> np.ndarray:
        x = self._as_batch(batch)
        if x.shape[0] == 0:
            return np.zeros((0, self.embedding_dim), np.float32)
        with torch.inference_mode():
            return torch.cat([self.net(self.front_end(chunk)) for chunk in x.split(self.MAX_CHUNK)]).numpy()


TimbreExtractor.__signature__ = inspect.signature(LogMelExtractor)

EXTRACTORS: dict[str, type[Extractor]] = {
    "logmel": LogMelExtractor,
    "timbre": TimbreExtractor,
    "torchscript": TorchScriptExtractor,
    "aisfx": AisfxExtractor,
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
