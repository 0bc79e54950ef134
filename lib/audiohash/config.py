"""Typed configuration: YAML defaults plus ``section.key=value`` overrides, unknown keys rejected.

Every job reads one ``Config``: ``load_config(conf_file, overrides)``. A YAML file may set any
subset of keys; overrides are parsed as YAML scalars (``train.bits=32``, ``spark.master=local[2]``,
``dataset.banks=[fluidr3]``) and type-checked against the dataclass fields below.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from audiohash.errors import AudiohashError

DEFAULT_EXTRACTOR = "timbre"  # the extract job's and the benchmarks' (audiohash.features.EXTRACTORS)


@dataclass
class SparkSettings:
    master: str = ""  # "" = spark-submit's --master, or local[*] when run with plain python
    app_name: str = "audiohash"
    shuffle_partitions: int = 8
    driver_memory: str = "4g"  # only effective when the job starts the JVM itself (plain python)
    show_progress: bool = True
    arrow_batch_rows: int = 10000
    extra: dict[str, str] = field(default_factory=dict)  # any other spark.* setting


@dataclass
class LakeSettings:
    root: str = "lake"  # folder (or any Hadoop URI) holding the Delta tables

    def table(self, name: str) -> str:
        """Location of the Delta table ``name`` under the lake root."""
        return lake_path(self.root, name)


@dataclass
class MlflowSettings:
    tracking_uri: str = ""  # "" = sqlite database lake/mlflow.db, artifacts under lake/mlartifacts
    experiment: str = "audiohash"


@dataclass
class DatasetSettings:
    root: str = ""  # "" = <lake.root>/dataset
    size: str = "full"  # full | small
    seed: int = 0
    banks: list[str] = field(default_factory=lambda: ["fluidr3", "timgm6mb"])


@dataclass
class ExtractSettings:
    input: str = ""  # manifest (.csv/.parquet) or folder of class sub-folders; "" = the dataset manifest
    extractor: str = DEFAULT_EXTRACTOR
    model_path: str = ""  # TorchScript file for extractor=torchscript
    window_s: float = 0.0  # seconds per window; 0 = the extractor's own (2 s; aisfx 2.299 s)
    max_windows: int = 0  # windows kept per long file; 0 = all
    batch_size: int = 256  # files per Arrow batch handed to one executor worker call
    windows_per_call: int = 4  # windows per extractor call (logmel is fastest on a few at a time)
    # Required when extract.input holds embeddings computed elsewhere (a Parquet with an 'embedding'
    # column, or a folder of .npy + .parquet; audiohash.external): their model and version, e.g.
    # clap-2023; rows get extractor 'external' and extractor_version 'external-<this>'.
    external_version: str = ""

    def extractor_params(self) -> dict:
        params = {"window_s": self.window_s} if self.window_s > 0 else {}
        if self.extractor == "torchscript":
            params["path"] = self.model_path
        return params


@dataclass
class ModelSettings:
    name: str = ""  # registered model name; "" = audiohash-<train.method>-<train.bits>b
    version: str = "latest"  # a version number, "latest", or an alias such as "production"


@dataclass
class TrainSettings:
    method: str = "pq"
    bits: int = 64
    label_fraction: float = 0.1
    seed: int = 0
    # Per method, e.g. train.hyper.dqn.steps=800: {method: {name: value}}; a name the method does
    # not take stops the train job with a message naming it.
    hyper: dict[str, dict[str, typing.Any]] = field(default_factory=dict)
    splits: list[str] = field(default_factory=list)  # training rows; [] = encode.splits (the database)
    # Rows of these splits join the training rows with their labels hidden (e.g. [db] when training
    # on a labeled "train" split: the semi-supervised methods learn from the database itself).
    unlabeled_splits: list[str] = field(default_factory=list)
    # Classes whose labels training never sees (the unseen-class protocol of Sablayrolles et al.).
    unlabeled_classes: list[str] = field(default_factory=list)
    # Lists of the inverted file trained with the model (audiohash.ivf): 0 = none (every query scans
    # every code), -1 = about 4 * sqrt(training rows), or a number. PQ, OPQ and the DQN family only.
    ivf_lists: int = 0


@dataclass
class EncodeSettings:
    n_shards: int = 8
    splits: list[str] = field(default_factory=lambda: ["db"])  # [] = every row of the table
    batch_rows: int = 65536
    # incremental: encode only new/changed rows, delete removed ones (a full reindex when the model,
    # n_shards or splits changed); full: re-encode everything. Both commit once, atomically.
    mode: str = "incremental"
    rollback_to: int = -1  # >= 0: restore the code table to this Delta version and stop (no encode)
    optimize: bool = False  # compact the code table's small files after writing (OPTIMIZE)
    vacuum_hours: int = 0  # > 0: VACUUM files unreferenced for this long (Delta refuses < 168)


@dataclass
class QuerySettings:
    split: str = "query"
    top_r: int = 0  # 0 = the whole database (mAP@all)
    evaluate: bool = True
    query_batch: int = 1000  # queries per scan; fewer when memory_budget_mb asks
    memory_budget_mb: int = 1024  # driver memory for one batch's candidates and tables
    results_r: int = 100  # ranks per query written to the results table
    float_reference: bool = True  # recall@R against exact float search (collects the database)
    nprobe: int = 16  # lists probed per query where the model has an inverted file; 0 = every code
    # Memory per Python worker for the listed codes a probed scan keeps for the next batch or search
    # (ranking.cached_list_codes): about code size + 8 bytes + the clip id per code.
    lists_cache_mb: int = 1024


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"  # 0.0.0.0 to answer other machines (no authentication: a trusted network only)
    port: int = 8765
    top: int = 10  # results per search unless the request asks for another number
    refresh_s: float = 10.0  # seconds between checks for a newer code table version; 0 = never


@dataclass
class Config:
    spark: SparkSettings = field(default_factory=SparkSettings)
    lake: LakeSettings = field(default_factory=LakeSettings)
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    extract: ExtractSettings = field(default_factory=ExtractSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    encode: EncodeSettings = field(default_factory=EncodeSettings)
    query: QuerySettings = field(default_factory=QuerySettings)
    serve: ServeSettings = field(default_factory=ServeSettings)

    # ---- derived locations (one place) --------------------------------------------------------
    @property
    def dataset_root(self) -> str:
        return self.dataset.root or lake_path(self.lake.root, "dataset")

    @property
    def extract_input(self) -> str:
        return self.extract.input or str(Path(self.dataset_root) / "manifest.csv")

    @property
    def model_name(self) -> str:
        return self.model.name or f"audiohash-{self.train.method}-{self.train.bits}b"

    @property
    def tracking_uri(self) -> str:
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        return "sqlite:///" + os.path.abspath(lake_path(self.lake.root, "mlflow.db"))

    @property
    def artifact_root(self) -> str | None:
        """Artifacts beside a local sqlite store; None (the server's default) for a tracking server."""
        uri = self.tracking_uri
        if not uri.startswith("sqlite:///"):
            return None
        return Path(uri[len("sqlite:///"):]).parent.joinpath("mlartifacts").as_uri()


def lake_path(root: str, name: str) -> str:
    """Join a lake root (local folder or URI such as s3a://bucket/lake) and a table name."""
    return root.rstrip("/") + "/" + name


def _coerce(value: typing.Any, tp: typing.Any, key: str) -> typing.Any:
    """Check ``value`` against the annotated type ``tp``; ints become floats where a float is due."""
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise AudiohashError(f"config key {key!r}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, key) for v in value]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise AudiohashError(f"config key {key!r}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # model.version=3 is a version string
    if tp is bool and not isinstance(value, bool):
        raise AudiohashError(f"config key {key!r}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise AudiohashError(f"config key {key!r}: expected an integer, got {value!r}")
    if not isinstance(value, tp):
        raise AudiohashError(f"config key {key!r}: expected {tp.__name__}, got {value!r}")
    return value


def _apply(section: typing.Any, values: dict, prefix: str, source: str) -> None:
    hints = typing.get_type_hints(type(section))
    names = {f.name for f in dataclasses.fields(section)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise AudiohashError(
                f"{source}: unknown config key {dotted!r}; known keys here: {sorted(names)}"
            )
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise AudiohashError(f"{source}: config key {dotted!r} is a section; give a mapping")
            _apply(current, value, dotted + ".", source)
        elif typing.get_origin(hints[key]) is dict:
            # dict-valued keys (spark.extra, train.hyper) merge rather than replace
            merged = dict(current)
            merged.update(_coerce(value, hints[key], dotted))
            setattr(section, key, merged)
        else:
            setattr(section, key, _coerce(value, hints[key], dotted))


def parse_override(text: str) -> dict:
    """``a.b.c=value`` -> {"a": {"b": {"c": value}}}, value parsed as a YAML scalar/list."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise AudiohashError(f"override {text!r}: expected key=value, e.g. train.bits=32")
    value = yaml.safe_load(raw) if raw.strip() else ""
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(conf_file: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- overrides, in that order. Raises AudiohashError naming a bad key."""
    cfg = Config()
    if conf_file:
        path = Path(conf_file)
        if not path.is_file():
            raise AudiohashError(f"config file {str(path)!r} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise AudiohashError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise AudiohashError(f"config file {str(path)!r}: expected a mapping at the top level")
        _apply(cfg, values, "", str(path))
    for text in overrides:
        _apply(cfg, parse_override(text), "", f"override {text!r}")
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    checks = [
        (cfg.dataset.size in ("full", "small"), "dataset.size", "full or small"),
        (0.0 < cfg.train.label_fraction <= 1.0, "train.label_fraction", "in (0, 1]"),
        (cfg.train.bits > 0 and cfg.train.bits % 8 == 0, "train.bits", "a positive multiple of 8"),
        (cfg.encode.n_shards >= 1, "encode.n_shards", ">= 1"),
        (cfg.query.top_r >= 0, "query.top_r", ">= 0 (0 = whole database)"),
        (cfg.query.query_batch >= 1, "query.query_batch", ">= 1"),
        (cfg.extract.window_s >= 0, "extract.window_s", ">= 0 (0 = the extractor's own window)"),
        (cfg.extract.max_windows >= 0, "extract.max_windows", ">= 0 (0 = all windows)"),
        (cfg.extract.batch_size >= 1, "extract.batch_size", ">= 1"),
        (cfg.extract.windows_per_call >= 1, "extract.windows_per_call", ">= 1"),
    ]
    for ok, key, what in checks:
        if not ok:
            raise AudiohashError(f"config key {key!r} must be {what}")


def config_to_dict(cfg: Config) -> dict:
    """The resolved config as plain data (logged with every run)."""
    return dataclasses.asdict(cfg)
