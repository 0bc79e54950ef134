"""Encode: load a registered model bundle from MLflow (model.version: a number, 'latest' or an
alias), encode the embeddings in the executors and bring the sharded Delta code table up to date
in one atomic commit. Incremental by default: only new or changed clips are encoded, deleted
ones removed, nothing written when nothing changed; a new model version re-encodes everything.

    spark-submit jobs/encode.py --conf-file conf/local.yaml model.version=production
    spark-submit jobs/encode.py --conf-file conf/local.yaml encode.mode=full encode.optimize=true
    spark-submit jobs/encode.py --conf-file conf/local.yaml encode.rollback_to=7   # restore version 7
"""
from audiohash.cli import job_parser, run_job


def main(cfg, args):
    from audiohash.spark import runs

    return runs.encode(cfg)


if __name__ == "__main__":
    run_job(main, job_parser(__doc__))
