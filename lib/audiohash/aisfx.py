"""aiSFX: a CNN pretrained on sound-effects libraries, its log-mel front end and its weights.

Ma & Lerch, "Representation Learning for the Automatic Indexing of Sound Effects Libraries",
ISMIR 2022 (https://github.com/alisonbma/aisfx). The weights are the PyPI wheel aisfx==0.1.2's
``aisfx/models/checkpoint.pth``, licensed CC BY 4.0 (c) 2022 A. B. Ma and A. Lerch: credit them
wherever embeddings or results from this model are shared.

The network and the front end are written here in plain torch, not imported from the package:
its pins (numpy 1.23, librosa 0.9.2) conflict with ours, so it is never installed. Only its
checkpoint is read, and only as data: its sha256 is checked against ``CHECKPOINT_SHA256`` before
``torch.load(weights_only=True)`` unpickles it with exactly the three numpy globals it holds.

Shapes: waveform (b, samples) float32 at 44.1 kHz -> ``LogMelFrontEnd`` -> (b, frames, 96)
normalized log-mel -> ``EmbeddingNet`` -> (b, 512). With centre padding a window of
``WINDOW_SAMPLES`` = 99 * 1024 samples (2.299 s) gives exactly the package's 100-frame block.

Weights live in ``$AUDIOHASH_AISFX_DIR`` (default ``~/.cache/audiohash/aisfx-0.1.2``), put there
by scripts/bootstrap.sh or ``python -m audiohash.aisfx --fetch [--dir D]``, which also keeps the
verified wheel beside the checkpoint (tests compare with the package's own code from it).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import librosa
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from audiohash.errors import AudiohashError

PACKAGE_VERSION = "0.1.2"
WHEEL_NAME = f"aisfx-{PACKAGE_VERSION}-py2.py3-none-any.whl"
WHEEL_SHA256 = "bfe219950715af179e9a1653e7117cc1852baef267cd6596c42cad74afe1d194"
CHECKPOINT_NAME = "checkpoint.pth"
CHECKPOINT_IN_WHEEL = "aisfx/models/checkpoint.pth"
CHECKPOINT_SHA256 = "499ea75909c932a2f94c35fa722fa4fabc5bcb7e84917209cc5f7402627b7eb5"
DIR_ENV = "AUDIOHASH_AISFX_DIR"
DEFAULT_DIR = Path.home() / ".cache" / "audiohash" / f"aisfx-{PACKAGE_VERSION}"
FETCH_HINT = "run scripts/bootstrap.sh or `python -m audiohash.aisfx --fetch`"

# The package's front end (aisfx/inference.py, spectrogram/spectrogram_librosa.py).
SAMPLE_RATE = 44100
N_FFT = 2048  # = win_length
HOP_LENGTH = 1024
N_MELS = 96
FMIN, FMAX = 0.0, 22050.0
BLOCK_FRAMES = 100  # frames per embedding block
WINDOW_SAMPLES = (BLOCK_FRAMES - 1) * HOP_LENGTH  # 101376: 1 + n // hop = 100 centred frames
MIN_SAMPLES = 7 * HOP_LENGTH  # 8 frames: the fewest that survive the network's three 2x time pools
# preprocessing.spectrogram_normalize(spec_norm='original'): (spec - 0) / the largest log-mel value
# over the paper's training spectrograms.
SPEC_SCALE = 9.457798957824707
EMBEDDING_DIM = 512


# ---- the weights ---------------------------------------------------------------------------------
def weights_dir(directory: str | os.PathLike | None = None) -> Path:
    """The weights folder: ``directory`` if given, else $AUDIOHASH_AISFX_DIR, else DEFAULT_DIR."""
    return Path(directory or os.environ.get(DIR_ENV) or DEFAULT_DIR).expanduser()


def checkpoint_path(directory: str | os.PathLike | None = None) -> Path:
    return weights_dir(directory) / CHECKPOINT_NAME


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_checkpoint(path: str | os.PathLike) -> bytes:
    """The checkpoint's bytes, after checking them against CHECKPOINT_SHA256.

    Raises AudiohashError naming ``path`` when it is missing, unreadable or altered.
    """
    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        raise AudiohashError(
            f"aisfx: cannot read the weights file {path} ({e.strerror}); {FETCH_HINT} "
            f"(the folder is ${DIR_ENV}, default {DEFAULT_DIR})") from e
    digest = _sha256(blob)
    if digest != CHECKPOINT_SHA256:
        raise AudiohashError(
            f"aisfx: the weights file {path} has sha256 {digest[:16]}..., not aisfx "
            f"{PACKAGE_VERSION}'s checkpoint {CHECKPOINT_SHA256[:16]}...; it is altered or "
            f"incomplete: {FETCH_HINT} to replace it")
    return blob


def _checkpoint_globals() -> list:
    """The only non-torch globals the checkpoint's pickle holds: its ds_dict maps dataset names
    to (numpy int64 index, class count). Found by loading with weights_only=True until it passed."""
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import scalar
    # The pickle names the numpy 1 module; numpy 2 keeps the function under numpy._core.
    return [(scalar, "numpy.core.multiarray.scalar"), np.dtype, np.dtypes.Int64DType]


def unpickle_state_dict(blob: bytes, source: str) -> dict[str, torch.Tensor]:
    """The EmbeddingNet weights from checkpoint bytes (a pickled (state_dict, ds_dict) tuple),
    loaded without running pickled code; the ``embedding_net.`` prefix is stripped and the
    classifier heads (``fc.*``, unused for embeddings) dropped."""
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            state, _ = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or zipfile errors
        # torch's message suggests weights_only=False; keep only its reason (e.g. the global).
        reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
        raise AudiohashError(f"aisfx: {source} is not a loadable aisfx checkpoint: "
                             f"{reason.group(1) if reason else e}") from e
    prefix = "embedding_net."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ---- the network (aisfx/models/cnn2d.py: EmbeddingNet('max', 3, 1, 64)) --------------------------
class ConvBlock(nn.Module):
    """Two 3x3 convolutions (no bias), each followed by batch norm and ReLU, then a max pool."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, pool: tuple[int, int]) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.max_pool2d(x, pool) if pool != (1, 1) else x  # a 1x1 pool is the identity


class EmbeddingNet(nn.Module):
    """(b, frames, 96) normalized log-mel -> (b, 512): four conv blocks (64, 128, 256, 512
    channels; 2x2 pools after the first three), then the mean over frequency and the max over
    time. Parameter names match the checkpoint's ``embedding_net.*`` keys, prefix stripped."""

    POOLS = ((2, 2), (2, 2), (2, 2), (1, 1))

    def __init__(self, channels: int = 64):
        super().__init__()
        widths = [1, channels, 2 * channels, 4 * channels, 8 * channels]
        for i in range(4):
            setattr(self, f"conv_block{i + 1}", ConvBlock(widths[i], widths[i + 1]))

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        x = spec[:, None]  # (b, 1, frames, mels)
        for i, pool in enumerate(self.POOLS):
            x = getattr(self, f"conv_block{i + 1}")(x, pool)
        return x.mean(dim=3).amax(dim=2)  # (b, 512, frames/8, 12) -> (b, 512)


def pretrained_net(directory: str | os.PathLike | None = None) -> tuple[EmbeddingNet, str]:
    """The network with aisfx 0.1.2's weights, in eval mode, and the checkpoint's sha256.
    Raises AudiohashError naming the file when it is missing or altered."""
    path = checkpoint_path(directory)
    blob = read_checkpoint(path)
    net = EmbeddingNet()
    net.load_state_dict(unpickle_state_dict(blob, str(path)))  # strict: every key must match
    return net.eval(), _sha256(blob)


# ---- the front end (spectrogram_librosa.py + preprocessing.py) -----------------------------------
class LogMelFrontEnd(nn.Module):
    """(b, samples) float32 at 44.1 kHz -> (b, 1 + samples // 1024, 96) float32.

    Per row, as the package per file: peak-normalize to max |y| = 1 (a silent row is left as is),
    power STFT (periodic Hann 2048, hop 1024, centre padding with zeros), 96 HTK mel bands over
    0-22050 Hz with unit-area (L1) filters, log10(1 + 1e4 * power), divided by SPEC_SCALE.
    Units: the package's training range maps to [0, 1]; digital silence is 0.
    """

    def __init__(self):
        super().__init__()
        fb = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX,
                                 htk=True, norm=1.0)  # (mels, bins)
        # Not persistent: derived from the constants above, so no part of the weights.
        self.register_buffer("mel_fb", torch.from_numpy(fb.T.astype(np.float32)), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT, periodic=True), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        peak = x.abs().amax(dim=1, keepdim=True)
        x = x / torch.where(peak > 0, peak, torch.ones_like(peak))
        spec = torch.stft(x, N_FFT, hop_length=HOP_LENGTH, win_length=N_FFT, window=self.window,
                          center=True, pad_mode="constant", return_complex=True)  # (b, bins, frames)
        power = torch.view_as_real(spec).square().sum(dim=3)
        mel = power.transpose(1, 2) @ self.mel_fb  # (b, frames, mels)
        return torch.log10(1.0 + 1e4 * mel) / SPEC_SCALE


# ---- fetching the weights ------------------------------------------------------------------------
def _file_sha256(path: Path) -> str | None:
    try:
        return _sha256(path.read_bytes())
    except OSError:
        return None


def fetch(directory: str | os.PathLike | None = None) -> Path:
    """Put the verified wheel and its checkpoint.pth into the weights folder; return the
    checkpoint's path. Idempotent: files already present and intact are kept (no download).

    Downloads with pip in hash-checking mode, checks both sha256s again, and writes each file
    under a temporary name in the same folder before renaming it, so a reader never sees half a
    file. Raises AudiohashError when pip fails or a hash differs.
    """
    target = weights_dir(directory)
    checkpoint, wheel = target / CHECKPOINT_NAME, target / WHEEL_NAME
    if _file_sha256(checkpoint) == CHECKPOINT_SHA256 and _file_sha256(wheel) == WHEEL_SHA256:
        return checkpoint
    try:
        target.mkdir(parents=True, exist_ok=True)
        staging = tempfile.TemporaryDirectory(prefix=".fetch-", dir=target)
    except OSError as e:
        raise AudiohashError(f"aisfx: cannot write the weights folder {target}: {e.strerror}; "
                             f"give another one with --dir or ${DIR_ENV}") from e
    with staging as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"aisfx=={PACKAGE_VERSION} --hash=sha256:{WHEEL_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
               "--require-hashes", "-r", str(requirements), "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise AudiohashError(f"aisfx: `{' '.join(cmd)}` failed ({done.returncode}): "
                                 f"{done.stderr.strip()[-2000:]}")
        downloaded = Path(tmp) / WHEEL_NAME
        if _file_sha256(downloaded) != WHEEL_SHA256:
            raise AudiohashError(f"aisfx: pip gave {downloaded} with sha256 "
                                 f"{_file_sha256(downloaded)}, expected {WHEEL_SHA256}")
        with zipfile.ZipFile(downloaded) as z:
            blob = z.read(CHECKPOINT_IN_WHEEL)
        if _sha256(blob) != CHECKPOINT_SHA256:
            raise AudiohashError(f"aisfx: {CHECKPOINT_IN_WHEEL} in {WHEEL_NAME} has sha256 "
                                 f"{_sha256(blob)}, expected {CHECKPOINT_SHA256}")
        extracted = Path(tmp) / CHECKPOINT_NAME
        extracted.write_bytes(blob)
        os.replace(downloaded, wheel)
        os.replace(extracted, checkpoint)
    return checkpoint


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m audiohash.aisfx",
                                 description="Check, or with --fetch download, the aisfx weights.")
    ap.add_argument("--fetch", action="store_true",
                    help=f"download aisfx=={PACKAGE_VERSION} with pip (hash-checked) unless present")
    ap.add_argument("--dir", default=None, help=f"weights folder (default ${DIR_ENV} or {DEFAULT_DIR})")
    args = ap.parse_args(argv)
    try:
        path = fetch(args.dir) if args.fetch else checkpoint_path(args.dir)
        read_checkpoint(path)
    except AudiohashError as e:
        sys.exit(str(e))
    print(f"{path}: aisfx {PACKAGE_VERSION} weights, sha256 {CHECKPOINT_SHA256[:16]}... verified")


if __name__ == "__main__":
    main()
