"""Extract: audio files (a manifest or a folder of class sub-folders) -> embeddings Delta table.

Decodes (soundfile), resamples to 16 kHz mono and embeds (extract.extractor, default log-mel
statistics) in the executors; files that cannot be embedded go to the rejects table with the reason.

    spark-submit jobs/extract.py --conf-file conf/local.yaml extract.input=lake/dataset/manifest.csv
"""
from audiohash.cli import job_parser, run_job


def main(cfg, args):
    from audiohash.spark.extract import extract_embeddings
    from audiohash.spark.session import get_spark

    spark = get_spark(cfg.spark)
    summary = extract_embeddings(
        spark, cfg.extract_input, cfg.lake.table("embeddings"), cfg.lake.table("rejects"),
        cfg.extract.extractor, cfg.extract.extractor_params(), cfg.extract.max_windows, cfg.extract.batch_size,
    )
    print(summary.line())


if __name__ == "__main__":
    run_job(main, job_parser(__doc__))
