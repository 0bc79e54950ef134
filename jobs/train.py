"""Train: read the embeddings table on the driver, sample the labeled fraction, fit the
quantizer (train.method at train.bits), log everything to MLflow and register the model bundle.

    spark-submit jobs/train.py --conf-file conf/local.yaml --method pq --bits 64 --label-fraction 0.1
"""
from audiohash.cli import job_parser, run_job


def main(cfg, args):
    from audiohash.spark import runs

    for key, value in (("method", args.method), ("bits", args.bits), ("label_fraction", args.label_fraction)):
        if value is not None:
            setattr(cfg.train, key, value)
    return runs.train(cfg)


if __name__ == "__main__":
    parser = job_parser(__doc__)
    parser.add_argument("--method", help="shortcut for train.method (pq, opq, itq, sh, agh, dqn, ...)")
    parser.add_argument("--bits", type=int, help="shortcut for train.bits")
    parser.add_argument("--label-fraction", type=float, help="shortcut for train.label_fraction")
    run_job(main, parser)
