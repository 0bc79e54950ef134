"""Table schemas, as Spark DDL strings (used by the Spark layer) and the column names the pure
workers produce. Kept free of pyspark so the workers and their tests do not need Spark."""

# Files to embed, as the Spark layer hands them to ``extraction.embed_files``.
INPUT_FILE_COLUMNS = ["clip_id", "path", "label", "split", "source", "content"]

EMBEDDINGS_DDL = (
    "clip_id string, path string, label string, split string, source string, offset_s double, "
    "embedding array<float>, extractor string, extractor_version string, sample_rate int, "
    "extracted_at timestamp"
)
# What the extract worker emits: embedding rows and reject rows in one stream, told apart by
# ``reject_reason`` (null for embedded rows); the Spark layer writes each to its table.
EXTRACT_OUTPUT_DDL = EMBEDDINGS_DDL + ", reject_reason string, reject_message string"

REJECTS_DDL = (
    "path string, clip_id string, stage string, reason string, message string, "
    "extractor_version string, run_at timestamp"
)

CODES_DDL = (
    "clip_id string, shard int, code binary, label string, model_name string, model_version int, "
    "embedding_version long, encoded_at timestamp"
)

# One row per (partition, query batch) of the scan: arrays, never a row per candidate.
SCAN_OUTPUT_DDL = "n_rows long, distances binary, local_ids binary, clip_ids array<string>"

RESULTS_DDL = (
    "query_id string, rank int, clip_id string, distance float, run_id string, "
    "model_name string, model_version int"
)
