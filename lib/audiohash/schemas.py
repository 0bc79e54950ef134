"""Table schemas, as Spark DDL strings (used by the Spark layer) and the column names the pure
workers produce. Kept free of pyspark so the workers and their tests do not need Spark."""


def column_names(ddl: str) -> list[str]:
    """The column names of a DDL string of this module, in order."""
    return [column.split()[0] for column in ddl.split(", ")]


# Files to embed, as the Spark layer hands them to ``extraction.embed_files`` (``content``, the
# bytes, only when Spark's binaryFile source read them; local files are read by the worker).
INPUT_FILE_COLUMNS = ["clip_id", "path", "label", "split", "source", "content"]

EMBEDDINGS_DDL = (
    "clip_id string, path string, label string, split string, source string, offset_s double, "
    "embedding array<float>, extractor string, extractor_version string, sample_rate int, "
    "extracted_at timestamp"
)
# What the extract worker (``extraction.embed_files``) emits: one row per window of an embedded
# file (clip_id ``<clip_id>`` or ``<clip_id>#<offset>``, n_windows its file's window count) and one
# row per rejected file (``reject_reason`` set, embedding null); the Spark layer adds the
# extractor columns and writes each kind to its table.
EXTRACT_OUTPUT_DDL = (
    "clip_id string, path string, label string, split string, source string, offset_s double, "
    "embedding array<float>, n_windows int, reject_reason string, reject_message string"
)

REJECTS_DDL = (
    "path string, clip_id string, stage string, reason string, message string, "
    "extractor_version string, run_at timestamp"
)

CODES_DDL = (
    "clip_id string, shard int, code binary, label string, model_name string, model_version int, "
    "embedding_version long, encoded_at timestamp, source_hash long, encode_run_id string, list_id int"
)
# source_hash: ``encoding.fingerprint`` of the (embedding, label) the code was made from; incremental
# encode compares it with the embeddings table's rows to find changed ones. encode_run_id: the MLflow
# run of jobs/encode.py that wrote the row (lineage: that run names the model version and the
# Delta versions it read and wrote). list_id: the code's inverted-file list (``audiohash.ivf``), null
# where the model has no lists; with lists, shard is the list's range (``encoding.shard_of_lists``),
# so the codes of one list sit in one partition.

# What the encode worker returns per embedding row; the Spark layer adds the columns that are the
# same for every row of a run (model, versions, time, run id) as literals.
ENCODE_INPUT_COLUMNS = ["clip_id", "label", "embedding"]
ENCODED_DDL = "clip_id string, shard int, code binary, label string, source_hash long, list_id int"

# One row per (partition, query batch) of the scan: arrays, never a row per candidate.
# ``scanned_rows`` / ``scan_s``: the task's rows and seconds (``audiohash.spark.stats``).
SCAN_OUTPUT_DDL = ("n_rows long, distances binary, local_ids binary, clip_ids array<string>, "
                   "scanned_rows long, scan_s double, compared long")

RESULTS_DDL = (
    "query_id string, rank int, clip_id string, distance float, run_id string, "
    "model_name string, model_version int"
)


_ARROW_TYPES = {"string": "string", "int": "int32", "long": "int64", "double": "float64", "float": "float32",
                "binary": "binary", "boolean": "bool"}


def arrow_schema(ddl: str):
    """The pyarrow schema of a DDL string of this module, as Spark would write it to a Delta table
    (timestamps in UTC microseconds: Delta's ``timestamp``)."""
    import pyarrow as pa

    def arrow_type(name: str):
        if name == "timestamp":
            return pa.timestamp("us", tz="UTC")
        if name.startswith("array<") and name.endswith(">"):
            return pa.list_(arrow_type(name[len("array<"):-1]))
        return pa.type_for_alias(_ARROW_TYPES[name])

    return pa.schema([(column.split()[0], arrow_type(column.split()[1])) for column in ddl.split(", ")])
