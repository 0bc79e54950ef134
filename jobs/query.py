"""Query: rank the code table for every query clip (query.split of the embeddings table) with
the registered model's asymmetric distance (or Hamming for binary codes), keep the global top-R,
append the results table and, with query.evaluate, log mAP@R, precision@R and recall@R (against
exact float search) to MLflow. query.top_r=0 ranks the whole database: mAP@all, plus the mAP@R
and precision-recall curves as artifacts.

    spark-submit jobs/query.py --conf-file conf/local.yaml query.top_r=100
"""
from audiohash.cli import job_parser, run_job


def main(cfg, args):
    from audiohash.spark import runs

    return runs.query(cfg)


if __name__ == "__main__":
    run_job(main, job_parser(__doc__))
