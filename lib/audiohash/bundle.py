"""The one model-bundle format: a folder (or the same files zipped in memory for a broadcast).

- ``bundle.json``: method, params, model name/version, extractor, classes, lineage.
- ``arrays.npz``: named numpy arrays (codebooks, rotations, standardizer), loaded with
  ``allow_pickle=False``.
- ``network.pt``: a torch state dict (networks only), loaded with ``weights_only=True``.

Nothing is pickled, so a bundle can be loaded from an untrusted store and by a newer version.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from audiohash.errors import AudiohashError
from audiohash.quantizers import Quantizer, QuantizerState, load_quantizer

BUNDLE_FORMAT = 1
_FILES = ("bundle.json", "arrays.npz", "network.pt")


@dataclass
class ModelBundle:
    """A trained quantizer plus what encode/query need to trust it."""

    quantizer: Quantizer
    model_name: str
    model_version: int = 0  # set by the registry; 0 = not registered yet
    meta: dict = field(default_factory=dict)  # extractor, embedding_dim, classes, lineage

    @property
    def method(self) -> str:
        return self.quantizer.method


def _to_files(bundle: ModelBundle) -> dict[str, bytes]:
    state = bundle.quantizer.state()
    header = {
        "format": BUNDLE_FORMAT,
        "method": state.method,
        "metric": bundle.quantizer.metric,
        "code_size": bundle.quantizer.code_size,
        "model_name": bundle.model_name,
        "model_version": bundle.model_version,
        "params": state.params,
        "meta": bundle.meta,
    }
    files = {"bundle.json": json.dumps(header, indent=2, sort_keys=True).encode()}
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in state.arrays.items()})
    files["arrays.npz"] = buf.getvalue()
    if state.torch_state is not None:
        import torch

        buf = io.BytesIO()
        torch.save(state.torch_state, buf)
        files["network.pt"] = buf.getvalue()
    return files


def _from_files(files: dict[str, bytes], source: str) -> ModelBundle:
    try:
        header = json.loads(files["bundle.json"])
    except KeyError:
        raise AudiohashError(f"{source}: not a model bundle (no bundle.json)") from None
    if header.get("format") != BUNDLE_FORMAT:
        raise AudiohashError(
            f"{source}: bundle format {header.get('format')!r}, this audiohash reads {BUNDLE_FORMAT}"
        )
    with np.load(io.BytesIO(files["arrays.npz"]), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    torch_state = None
    if "network.pt" in files:
        import torch

        torch_state = torch.load(io.BytesIO(files["network.pt"]), weights_only=True, map_location="cpu")
    quantizer = load_quantizer(QuantizerState(header["method"], header["params"], arrays, torch_state))
    return ModelBundle(quantizer, header["model_name"], int(header["model_version"]), header["meta"])


def save_bundle(bundle: ModelBundle, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in _to_files(bundle).items():
        (folder / name).write_bytes(data)
    return folder


def load_bundle(folder: str | Path) -> ModelBundle:
    folder = Path(folder)
    files = {name: (folder / name).read_bytes() for name in _FILES if (folder / name).exists()}
    return _from_files(files, str(folder))


def bundle_to_bytes(bundle: ModelBundle) -> bytes:
    """The bundle's files in one zip (what the driver broadcasts to executors)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in sorted(_to_files(bundle).items()):
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def bundle_from_bytes(data: bytes, source: str = "broadcast bundle") -> ModelBundle:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        files = {name: zf.read(name) for name in zf.namelist()}
    return _from_files(files, source)


_CACHE: dict[str, ModelBundle] = {}


def cached_bundle_from_bytes(data: bytes) -> ModelBundle:
    """Executors call this per task: the bundle is rebuilt once per Python worker, keyed by content."""
    key = hashlib.sha256(data).hexdigest()
    if key not in _CACHE:
        _CACHE.clear()  # one model at a time per worker is enough; keeps memory bounded
        _CACHE[key] = bundle_from_bytes(data)
    return _CACHE[key]


def refuse_other_extractor(found: str | None, bundle: ModelBundle, embeddings_table: str) -> None:
    """AudiohashError naming both versions when embeddings of extractor version ``found`` (None: no
    rows) do not match the one the bundle was trained on; bundles without one pass."""
    expected = bundle.meta.get("extractor_version")
    if expected and found is not None and found != expected:
        raise AudiohashError(
            f"{embeddings_table} holds embeddings of extractor {found}, but model {bundle.model_name} "
            f"v{bundle.model_version} was trained on {expected}: train a model on these embeddings "
            f"(jobs/train.py) or re-extract with {expected}; nothing was written")
