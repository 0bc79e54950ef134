"""The reader of the extract stage's plan: the input files (a manifest, or a folder tree of class
sub-folders) with their sizes, found without reading a byte of them, and what the embeddings
table already holds (``spark.extract``)."""
from __future__ import annotations

import os

import pandas as pd
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from audiohash.errors import AudiohashError
from audiohash.extraction import AUDIO_SUFFIXES, base_clip_ids, folder_inputs, hadoop_path, manifest_inputs
from audiohash.spark.tables import session_conf, table_exists

MAX_STATUS_LOOKUPS = 10_000  # manifest files Spark's listing missed, looked up one by one


def is_local(path: str) -> bool:
    return path.startswith("file:")


def listing_conf(spark: SparkSession) -> dict[str, str]:
    # Spark lists more than 32 root paths with a job of one task per path (up to 10,000):
    # thousands of tiny tasks for a list of files. Two tasks per core list them as fast.
    return {"spark.sql.sources.parallelPartitionDiscovery.parallelism": str(2 * spark.sparkContext.defaultParallelism)}


def suffix_glob(suffixes) -> str | None:
    """A case-insensitive Hadoop glob on file names with these suffixes (``*.{[wW][aA][vV],...}``);
    None when some suffix is empty (list every file)."""
    suffixes = sorted({s.lower() for s in suffixes})
    if not suffixes or any(not s.startswith(".") or len(s) < 2 for s in suffixes):
        return None
    classes = ["".join(f"[{c}{c.upper()}]" if c.isalpha() else c for c in s[1:]) for s in suffixes]
    return "*.{" + ",".join(classes) + "}"


def _exists(spark: SparkSession, path: str) -> bool:
    if is_local(path):
        return os.path.exists(path[len("file:"):])
    return _file_info(path) is not None


def _file_info(path: str):
    """pyarrow's FileInfo of a path on other storage (s3://, gs://, hdfs://, ...), None where it does
    not exist or pyarrow has no filesystem for it (Spark's reader then reports what it finds)."""
    from pyarrow import fs

    try:
        filesystem, inner = fs.FileSystem.from_uri(path)
        info = filesystem.get_file_info(inner)
    except (OSError, ValueError, pa.ArrowException):
        return None
    return None if info.type == fs.FileType.NotFound else info


def _local_sizes(paths) -> pd.DataFrame:
    """path, length of the given local files that exist (one stat each, on the driver)."""
    rows = []
    for p in paths:
        try:
            st = os.stat(p[len("file:"):])
        except OSError:
            continue
        if not os.path.isdir(p[len("file:"):]):
            rows.append((p, st.st_size))
    return pd.DataFrame(rows, columns=["path", "length"]).astype({"length": "int64"})


def _local_tree(root: str) -> list[str]:
    """Files under a local folder, skipping names Spark's listing hides (``.*``, ``_*``)."""
    out = []
    for folder, dirs, names in os.walk(root[len("file:"):]):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        out += ["file:" + os.path.join(folder, n) for n in sorted(names) if not n.startswith((".", "_"))]
    return out


def list_with_spark(spark: SparkSession, folders: list[str], glob: str | None) -> tuple[DataFrame | None, pd.DataFrame]:
    """List the files under ``folders`` (recursively, names matching ``glob``) through Spark's
    binaryFile source, reading no bytes. Returns the relation (reused to read the bytes when
    every listed file is to be embedded, so nothing is listed twice) and path, length."""
    folders = sorted(set(folders))
    folders = [f for f in folders if not any(f.startswith(g.rstrip("/") + "/") for g in folders)]  # no nesting
    folders = [f for f in folders if _exists(spark, f)]  # a missing folder's files become 'missing'
    if not folders:
        return None, pd.DataFrame({"path": pd.Series(dtype=object), "length": pd.Series(dtype="int64")})
    reader = spark.read.format("binaryFile").option("recursiveFileLookup", "true")
    if glob:
        reader = reader.option("pathGlobFilter", glob)
    with session_conf(spark, listing_conf(spark)):
        relation = reader.load(folders)
        listed = relation.select("path", "length").toPandas()
    return relation, listed


def read_inputs(spark: SparkSession, source: str, spark_io: bool) -> tuple[pd.DataFrame, DataFrame | None, pd.DataFrame]:
    """The input files of a manifest or a folder tree and their sizes: (inputs, binaryFile
    relation of the listing or None, listed path/length).

    spark_io: list (and later read) local files through Spark too, as any other filesystem.
    """
    location = hadoop_path(source)
    if not _exists(spark, location):
        raise AudiohashError(f"extract input {source!r} does not exist (give a manifest .csv/.parquet or a folder)")
    suffix = os.path.splitext(location)[1].lower()
    is_folder = os.path.isdir(location[len("file:"):]) if is_local(location) else not suffix
    if is_folder:
        if is_local(location) and not spark_io:
            inputs = folder_inputs(_local_tree(location), location)
            return inputs, None, _local_sizes(inputs["path"])
        relation, listed = list_with_spark(spark, [location], suffix_glob(AUDIO_SUFFIXES))
        return folder_inputs(listed["path"], location), relation, listed
    if suffix not in (".csv", ".parquet", ".pq"):
        raise AudiohashError(f"extract input {source!r}: expected a .csv or .parquet manifest or a folder")
    inputs = manifest_inputs(_read_manifest_table(spark, location, suffix), location)
    local = inputs["path"].map(is_local)
    if local.all() and not spark_io:
        return inputs, None, _local_sizes(inputs["path"])
    folders = sorted({p.rsplit("/", 1)[0] for p in inputs["path"]})
    relation, listed = list_with_spark(spark, folders, suffix_glob({os.path.splitext(p)[1] for p in inputs["path"]}))
    # Spark's file listing leaves out zero-byte and hidden (``.*``, ``_*``) files: look those up
    # one by one, so they are rejected as 'empty' or read, not misreported as 'missing'.
    unlisted = inputs.loc[~inputs["path"].isin(set(listed["path"])), "path"].tolist()
    found = [(p, n) for p in unlisted[:MAX_STATUS_LOOKUPS] if (n := _file_length(spark, p)) is not None]
    if found:
        listed = pd.concat([listed, pd.DataFrame(found, columns=["path", "length"])], ignore_index=True)
    return inputs, relation, listed


def _file_length(spark: SparkSession, path: str) -> int | None:
    """Size of one file on other storage; None if it does not exist, is a folder, or pyarrow has no
    filesystem for it."""
    from pyarrow import fs

    info = _file_info(path)
    return None if info is None or info.type != fs.FileType.File else int(info.size)


def _read_manifest_table(spark: SparkSession | None, location: str, suffix: str) -> pd.DataFrame:
    """A local manifest through pandas (no Spark job); a remote one through Spark's readers."""
    try:
        if is_local(location):
            local = location[len("file:"):]
            if suffix == ".csv":
                return pd.read_csv(local, dtype=str, keep_default_na=False)
            return pd.read_parquet(local)
        if suffix == ".csv":
            return spark.read.option("header", "true").csv(location).toPandas()
        return spark.read.parquet(location).toPandas()
    except (OSError, ValueError) as exc:
        raise AudiohashError(f"manifest {location}: cannot read it: {exc}") from exc


def read_manifest(manifest: str) -> pd.DataFrame:
    """A local manifest file -> input files (``extraction.INPUT_COLUMNS``)."""
    location = hadoop_path(manifest)
    suffix = os.path.splitext(location)[1].lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise AudiohashError(f"manifest {manifest!r}: expected a .csv or .parquet file")
    return manifest_inputs(_read_manifest_table(None, location, suffix), location)


def embedded_files(spark: SparkSession, table: str, extractor_version: str) -> pd.DataFrame:
    """path, clip_id (the file's, not a window's) of the files ``table`` holds for this
    extractor version; empty when there is no table or it holds another extractor's vectors."""
    if not table_exists(spark, table):
        return pd.DataFrame({"path": pd.Series(dtype=object), "clip_id": pd.Series(dtype=object)})
    rows = (spark.read.format("delta").load(table)
            .filter(F.col("extractor_version") == extractor_version).select("path", "clip_id").toPandas())
    ids = base_clip_ids(rows["clip_id"], rows["path"])
    return pd.DataFrame({"path": ids.index.to_numpy(dtype=object), "clip_id": ids.to_numpy(dtype=object)})


