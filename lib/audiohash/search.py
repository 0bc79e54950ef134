"""Find sounds like this one without Spark: a registered model and its code table in memory.

``SearchEngine.open(cfg)`` loads a registered model (``model.version``: a number, "latest" or an
alias) and the newest code table version whose encode lineage names it, read with delta-rs and
pyarrow like the in-process runner (``in_process.version_state``: no JVM), plus the label, source,
split and path of those clips from the embeddings table version that lineage names. The codes go
into one faiss index as they are (no re-encoding): ``Quantizer.filled_scan_index`` (ADC, 4-bit
fast-scan or Hamming, as the model has it), or for a model with lists and ``query.nprobe`` > 0 the
inverted file of the query job (``ranking.list_codes``). A query is an audio file's bytes (decoded,
windowed and embedded by ``extraction.embed_files`` with the extractor the model was trained on:
the extract job's worker), a clip id (its embedding in the embeddings table, as the query job reads
queries) or an embedding vector. Rows sit in clip_id order and results are ordered by
(distance, clip_id), so a clip ranks the codes exactly as the query job ranks them.

Filters (``where``: column -> allowed values) select rows before the scan: a filtered query scans
an index holding only the matching codes (kept for the last few filters), never a post-filtered
fixed top-K. ``refresh()`` loads a newer code table version and swaps it in at once: every search
reads one ``Snapshot``.

CLI: ``python -m audiohash.search FILE.wav [--top 10] [--where label=dog] [--conf-file F] [KEY=VALUE ...]``.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from audiohash import in_process, ivf
from audiohash.arrow_arrays import code_matrix
from audiohash.bundle import ModelBundle
from audiohash.encoding import Lineage
from audiohash.errors import AudiohashError
from audiohash.ranking import check_lineage, clip_id_order
from audiohash.table_files import read_parquet_files

log = logging.getLogger("audiohash.search")

# Columns of the indexed clips a result shows and a filter may name (label from the code table, the
# rest from the embeddings table version the code table's lineage names).
METADATA_COLUMNS = ("label", "source", "split", "path")
FILTERS_KEPT = 8  # filtered indexes kept per snapshot (a filter's first query builds its index)
EXTERNAL_EXTRACTOR = "external"  # embeddings computed elsewhere: search takes vectors only


@dataclass
class Hit:
    clip_id: str
    distance: float
    label: str | None
    source: str | None
    path: str | None

    def to_dict(self) -> dict:
        return {"clip_id": self.clip_id, "distance": self.distance, "label": self.label, "source": self.source,
                "path": self.path}


@dataclass
class SearchResult:
    hits: list[Hit]
    codes_version: int
    scanned: int  # codes the filter left to the scan (all codes without a filter)
    timing_ms: dict[str, float] = field(default_factory=dict)  # extract, model, scan

    def to_dict(self) -> dict:
        return {"codes_version": self.codes_version, "scanned": self.scanned, "timing_ms": self.timing_ms,
                "results": [{"rank": i + 1, **h.to_dict()} for i, h in enumerate(self.hits)]}


class Snapshot:
    """One code table version in memory: its clips in clip_id order, their metadata, the model that
    made them and a faiss index over the codes (plus filtered ones, built on first use)."""

    def __init__(self, bundle: ModelBundle, version: int, lineage: Lineage, clip_ids: pa.Array,
                 codes: np.ndarray, lists: np.ndarray | None, metadata: dict[str, pa.Array], nprobe: int):
        self.bundle, self.version, self.lineage = bundle, version, lineage
        self.clip_ids, self.codes, self.lists, self.metadata = clip_ids, codes, lists, metadata
        quantizer = bundle.quantizer
        self.nprobe = min(nprobe, quantizer.nlist) if lists is not None else 0
        self.index = self._index(np.arange(len(codes)))
        self._filtered: OrderedDict[tuple, tuple[np.ndarray, object]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.clip_ids)

    def _index(self, rows: np.ndarray):
        """A faiss index over the codes of ``rows`` (ascending: clip_id order), ids 0..len(rows)-1."""
        quantizer = self.bundle.quantizer
        if self.nprobe:  # the query job's inverted file (``ranking.list_codes``)
            index = ivf.ivf_index(quantizer.ivf_centroids, quantizer.centroids)
            ivf.add_codes(index, self.codes[rows], self.lists[rows])
            return index
        return quantizer.filled_scan_index(self.codes[rows])

    def rows_where(self, where: dict[str, list[str]]) -> np.ndarray:
        """Row numbers (in clip_id order) whose metadata matches every column's allowed values."""
        keep = np.ones(len(self), bool)
        for column, values in where.items():
            if column not in self.metadata:
                raise AudiohashError(f"cannot filter by {column!r}: the indexed clips carry "
                                     f"{', '.join(sorted(self.metadata))}")
            keep &= pc.is_in(self.metadata[column], value_set=pa.array(values, pa.string())).to_numpy(
                zero_copy_only=False)
        return np.flatnonzero(keep)

    def filtered(self, where: dict[str, list[str]]) -> tuple[np.ndarray | None, object]:
        """(rows or None for all, the index holding just those rows' codes)."""
        if not where:
            return None, self.index
        key = tuple(sorted((c, tuple(sorted(v))) for c, v in where.items()))
        with self._lock:
            if key in self._filtered:
                self._filtered.move_to_end(key)
                return self._filtered[key]
        rows = self.rows_where(where)
        entry = (rows, self._index(rows) if len(rows) else None)
        with self._lock:
            self._filtered[key] = entry
            while len(self._filtered) > FILTERS_KEPT:
                self._filtered.popitem(last=False)
        return entry

    def scan(self, query_side: np.ndarray, k: int, where: dict[str, list[str]] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """Top k of one query side vector (1, d'): D float32 (k',), rows int64 (k',) ordered by
        (distance, clip_id), and how many codes the filter left."""
        rows, index = self.filtered(where or {})
        n = len(self) if rows is None else len(rows)
        k = min(k, n)
        if k <= 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64), n
        quantizer = self.bundle.quantizer
        if self.nprobe:
            probes = ivf.nearest_lists(query_side, quantizer.ivf_centroids, self.nprobe)
            D, I = ivf.search_lists(index, query_side, probes, k)
        else:
            dtype = np.float32 if quantizer.metric == "adc" else np.uint8
            D, I = index.search(np.ascontiguousarray(query_side, dtype), k)
        D, I = D[0].astype(np.float32), I[0].astype(np.int64)
        found = I >= 0
        D, I = D[found], I[found]
        if rows is not None:
            I = rows[I]
        order = np.lexsort((I, D))  # ties by row = by clip_id, as the jobs' merge
        return D[order], I[order], n

    def hits(self, D: np.ndarray, rows: np.ndarray) -> list[Hit]:
        taken = pa.array(rows, pa.int64())
        ids = self.clip_ids.take(taken).to_pylist()
        meta = {c: self.metadata[c].take(taken).to_pylist() if c in self.metadata else [None] * len(rows)
                for c in ("label", "source", "path")}
        return [Hit(ids[i], float(D[i]), meta["label"][i], meta["source"][i], meta["path"][i])
                for i in range(len(rows))]


def load_snapshot(bundle: ModelBundle, codes_table: str, nprobe: int, version: int | None = None) -> Snapshot:
    """The code table's version (latest: None) in memory, refused unless the bundle's model wrote it."""
    started = time.time()
    version, lineage = in_process.code_table_lineage(codes_table, version)
    check_lineage(lineage, codes_table, version, bundle)
    columns = ["clip_id", "code", "label", "list_id"]
    state = in_process.version_state(codes_table, version, columns)
    batches = [b for b in read_parquet_files(state.files, columns) if b.num_rows]
    if not batches:
        raise AudiohashError(f"code table {codes_table} version {version} holds no codes; run jobs/encode.py")
    table = pa.Table.from_batches(batches).combine_chunks()
    order = clip_id_order(table.column("clip_id").chunk(0))
    if order is not None:
        table = table.take(pa.array(order))
    clip_ids = table.column("clip_id").chunk(0)
    codes = code_matrix(table.column("code").chunk(0), bundle.quantizer.code_size)
    lists = table.column("list_id").to_numpy(zero_copy_only=False)
    lists = None if bundle.quantizer.nlist == 0 or pd.isna(lists).any() else lists.astype(np.int32)
    metadata = {"label": table.column("label").chunk(0), **clip_metadata(lineage, clip_ids)}
    snapshot = Snapshot(bundle, version, lineage, clip_ids, codes, lists, metadata, nprobe)
    log.info("loaded %d codes of %s version %d (model %s v%d) in %.2f s", len(snapshot), codes_table, version,
             bundle.model_name, bundle.model_version, time.time() - started)
    return snapshot


def clip_metadata(lineage: Lineage, clip_ids: pa.Array) -> dict[str, pa.Array]:
    """source, split and path of ``clip_ids`` (sorted) from the embeddings table version the lineage
    names, aligned with them (null where a clip is missing there)."""
    wanted = ["clip_id", "source", "split", "path"]
    try:
        state = in_process.version_state(lineage.embeddings_table, lineage.embeddings_version, wanted)
    except (AudiohashError, OSError) as exc:  # the codes still serve; results lack paths
        log.warning("no source/split/path for the results: %s", exc)
        return {}
    rows = pa.Table.from_batches([b for b in read_parquet_files(state.files, wanted) if b.num_rows])
    if rows.num_rows == 0:
        return {}
    at = pc.index_in(clip_ids, value_set=rows.column("clip_id").combine_chunks())
    return {c: rows.column(c).combine_chunks().take(at) for c in ("source", "split", "path")}


def embedding_of(lineage: Lineage, clip_id: str) -> np.ndarray:
    """The embedding of ``clip_id`` in the embeddings table version the lineage names (what the query
    job reads for its queries); AudiohashError naming the clip and the table if it has none."""
    state = in_process.version_state(lineage.embeddings_table, lineage.embeddings_version, ["clip_id", "embedding"])
    import pyarrow.dataset as ds

    dataset = ds.dataset(list(_local_paths(state.files)), format="parquet")
    found = dataset.to_table(columns=["embedding"], filter=ds.field("clip_id") == clip_id)
    if found.num_rows == 0 or found.column(0)[0].as_py() is None:
        raise AudiohashError(f"clip {clip_id!r} has no embedding in {lineage.embeddings_table} version "
                             f"{lineage.embeddings_version}; search by audio file or embedding instead")
    return np.asarray(found.column(0)[0].as_py(), np.float32)[None]


def _local_paths(uris):
    from audiohash.delta_tables import local_path

    return (local_path(u) or u for u in uris)


class SearchEngine:
    """A model, its extractor and the current ``Snapshot``; thread-safe (a search reads the snapshot
    once, ``refresh`` swaps in a new one)."""

    def __init__(self, cfg, snapshot: Snapshot):
        self.cfg = cfg
        self.snapshot = snapshot
        self._extractor = None
        self._extractor_lock = threading.Lock()
        self._refresh_lock = threading.Lock()

    @classmethod
    def open(cls, cfg, version: int | None = None) -> "SearchEngine":
        from audiohash.tracking import load_registered_bundle

        bundle = load_registered_bundle(cfg)
        return cls(cfg, load_snapshot(bundle, cfg.lake.table("codes"), cfg.query.nprobe, version))

    # ---- what a query is ------------------------------------------------------------------------
    def warm_up(self) -> threading.Thread:
        """Build the extractor in a background thread (a few seconds: torch, librosa's filterbanks),
        so the first audio query does not wait for it; errors surface at that query."""
        def build():
            try:
                self.extractor
            except Exception:  # noqa: BLE001 - reported to the query that needs it
                pass
        thread = threading.Thread(target=build, name="audiohash-warm-up", daemon=True)
        thread.start()
        return thread

    @property
    def extractor(self):
        """The extractor the model's embeddings were made with (its version checked), built once."""
        with self._extractor_lock:
            return self._build_extractor()

    def _build_extractor(self):
        if self._extractor is None:
            from audiohash.features import get_extractor

            meta = self.snapshot.bundle.meta
            name = meta.get("extractor")
            if name == EXTERNAL_EXTRACTOR:
                raise AudiohashError(f"model {self.snapshot.bundle.model_name} was trained on external embeddings "
                                     f"({meta.get('extractor_version')}): search with an embedding vector, not audio")
            extractor = get_extractor(name or self.cfg.extract.extractor, **self.cfg.extract.extractor_params())
            expected = meta.get("extractor_version")
            if expected and extractor.version != expected:
                raise AudiohashError(
                    f"model {self.snapshot.bundle.model_name} was trained on embeddings of extractor {expected}, "
                    f"but extract.* of this config gives {extractor.version}: set extract.window_s / "
                    f"extract.model_path as when the embeddings were extracted")
            self._extractor = extractor
        return self._extractor

    def embed_audio(self, data: bytes, name: str = "query") -> np.ndarray:
        """An audio file's bytes -> the embedding (1, d) of its first window, as the extract job makes
        it (``extraction.embed_files``); AudiohashError with the decoder's reason for a bad file."""
        from audiohash.extraction import embed_files

        files = pd.DataFrame({"clip_id": [name], "path": [name], "label": [None], "split": [None],
                              "source": [None], "content": [data]})
        rows = embed_files(files, self.extractor, max_windows=1)
        if rows["reject_reason"].iloc[0] is not None:
            raise AudiohashError(f"{name}: {rows['reject_message'].iloc[0]} ({rows['reject_reason'].iloc[0]})")
        return np.asarray(rows["embedding"].iloc[0], np.float32)[None]

    # ---- search ---------------------------------------------------------------------------------
    def search(self, *, audio: bytes | None = None, clip_id: str | None = None, embedding=None, top: int = 10,
               where: dict[str, list[str]] | None = None, name: str = "query") -> SearchResult:
        """Top ``top`` clips for exactly one of: an audio file's bytes, a clip id of the embeddings
        table, an embedding vector (d,)."""
        if sum(x is not None for x in (audio, clip_id, embedding)) != 1:
            raise AudiohashError("give exactly one of: an audio file, a clip_id, an embedding")
        snapshot = self.snapshot  # one version for the whole request
        timing = {}
        started = time.perf_counter()
        if audio is not None:
            x = self.embed_audio(audio, name)
        elif clip_id is not None:
            x = embedding_of(snapshot.lineage, clip_id)
        else:
            x = np.asarray(embedding, np.float32).reshape(1, -1)
            dim = snapshot.bundle.meta.get("embedding_dim")
            if dim and x.shape[1] != dim:
                raise AudiohashError(f"the embedding has {x.shape[1]} dimensions; model "
                                     f"{snapshot.bundle.model_name} takes {dim}")
            if not np.isfinite(x).all():
                raise AudiohashError("the embedding holds NaN or infinite values")
        timing["extract"] = (time.perf_counter() - started) * 1e3
        t = time.perf_counter()
        query_side = snapshot.bundle.quantizer.query_side(x)
        timing["model"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        D, rows, scanned = snapshot.scan(query_side, top, where)
        hits = snapshot.hits(D, rows)
        timing["scan"] = (time.perf_counter() - t) * 1e3
        return SearchResult(hits, snapshot.version, scanned, timing)

    def refresh(self) -> bool:
        """Load the code table's newest version if it is newer than the one served and swap it in;
        True if swapped. A version another model wrote is refused (logged), the old one kept."""
        with self._refresh_lock:
            current = self.snapshot
            latest, _ = in_process.code_table_lineage(self.cfg.lake.table("codes"))
            if latest == current.version:
                return False
            try:
                snapshot = load_snapshot(current.bundle, self.cfg.lake.table("codes"), self.cfg.query.nprobe, latest)
            except AudiohashError as exc:
                log.warning("still serving code table version %d: %s", current.version, exc)
                return False
            self.snapshot = snapshot
            log.info("now serving code table version %d (%d codes)", snapshot.version, len(snapshot))
            return True

    def info(self) -> dict:
        s = self.snapshot
        values = {c: sorted(v for v in pc.unique(s.metadata[c]).to_pylist() if v is not None)
                  for c in ("label", "source", "split") if c in s.metadata}
        meta = s.bundle.meta
        return {"model_name": s.bundle.model_name, "model_version": s.bundle.model_version, "method": s.bundle.method,
                "bits": s.bundle.quantizer.n_bits, "codes_version": s.version, "n_codes": len(s), "nprobe": s.nprobe,
                "extractor": meta.get("extractor"), "embedding_dim": meta.get("embedding_dim"),
                "accepts_audio": meta.get("extractor") != EXTERNAL_EXTRACTOR, "filters": values}

    def clips(self, where: dict[str, list[str]] | None = None, limit: int = 50) -> list[dict]:
        """Indexed clips (clip_id order) matching ``where``, to pick a query from."""
        s = self.snapshot
        rows = s.rows_where(where or {})[:limit]
        return [{k: v for k, v in h.to_dict().items() if k != "distance"}
                for h in s.hits(np.zeros(len(rows), np.float32), rows)]


def parse_where(items: list[str]) -> dict[str, list[str]]:
    """['label=dog', 'label=cat', 'source=fluidr3'] -> {'label': ['dog', 'cat'], 'source': ['fluidr3']}:
    a clip matches when each named column holds one of its values."""
    where: dict[str, list[str]] = {}
    for item in items:
        column, sep, value = item.partition("=")
        if not sep or not column:
            raise AudiohashError(f"--where {item!r}: expected COLUMN=VALUE, e.g. label=Piano")
        where.setdefault(column.strip(), []).append(value)
    return where


def main(argv: list[str] | None = None) -> None:
    from pathlib import Path

    from audiohash.cli import job_parser, run_job

    parser = job_parser(__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[-1])
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--audio", "--file", dest="audio", help="an audio file to search with")
    query.add_argument("--clip-id", help="a clip id of the embeddings table to search with")
    query.add_argument("--embedding", help="an embedding: a JSON list of numbers, or a .npy file")
    parser.add_argument("--top", type=int, default=0, help="results (default serve.top)")
    parser.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                        help="keep clips whose COLUMN (label, source, split, path) is VALUE; repeatable")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    # `python -m audiohash.search FILE.wav`: a first positional that names a file is the audio.
    argv = list(argv if argv is not None else __import__("sys").argv[1:])
    if argv and not argv[0].startswith("-") and "=" not in argv[0]:
        argv = ["--audio", *argv]

    def run(cfg, args) -> None:
        engine = SearchEngine.open(cfg)
        top = args.top or cfg.serve.top
        where = parse_where(args.where)
        if args.audio:
            path = Path(args.audio)
            if not path.is_file():
                raise AudiohashError(f"{path}: no such file")
            result = engine.search(audio=path.read_bytes(), name=str(path), top=top, where=where)
        elif args.clip_id:
            result = engine.search(clip_id=args.clip_id, top=top, where=where)
        else:
            text = args.embedding
            vector = np.load(text) if text.endswith(".npy") else np.asarray(json.loads(text), np.float32)
            result = engine.search(embedding=vector, top=top, where=where)
        if args.json:
            print(json.dumps(result.to_dict(), indent=1))
            return
        s = engine.snapshot
        print(f"{s.bundle.model_name} v{s.bundle.model_version} over {result.scanned} codes of code table "
              f"version {result.codes_version}:")
        for rank, h in enumerate(result.hits, 1):
            print(f"{rank:3d}  {h.distance:10.4f}  {h.clip_id}  {h.label or '-'}  {h.source or '-'}  {h.path or ''}")

    run_job(run, parser, argv)


if __name__ == "__main__":
    main()
