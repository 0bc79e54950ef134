"""Report: the full comparison through the real jobs. Extract once, then for every method and
bit width train, encode and query (whole-database ranking) on Spark; everything in one MLflow
parent run with a child run per method; writes reports/<setting>/ (Markdown table in the paper's
layout, JSON, PNG plots) and logs the same as the parent run's artifacts.

    spark-submit jobs/report.py --conf-file conf/local.yaml --setting default
    spark-submit jobs/report.py --conf-file conf/local.yaml --setting hard --bits 32
    spark-submit jobs/report.py --conf-file conf/local.yaml --dataset drums extract.extractor=aisfx --bits 32

--dataset NAME (any of `python -m audiohash.dataset --list`; default gm, the rendered dataset of
extract.input) builds that dataset under <lake>/datasets/NAME and runs the comparison in its own
lake folder <lake>/report-<tag> (tag: dataset, extractor when not the default, setting), so its
embeddings table never mixes with another dataset's; the report lands in reports/<tag>/.
"""
from audiohash.cli import job_parser, run_job


def main(cfg, args):
    import copy
    from pathlib import Path

    import mlflow
    import pandas as pd

    from audiohash import report
    from audiohash.config import DEFAULT_EXTRACTOR
    from audiohash.dataset import build_dataset
    from audiohash.errors import AudiohashError
    from audiohash.spark import runs
    from audiohash.spark.session import get_spark
    from audiohash.tracking import job_run
    from audiohash.training import draw_unseen_classes

    get_spark(cfg.spark)
    def tag_of(setting):
        return "-".join([*([args.dataset] if args.dataset != "gm" else []),
                         *([cfg.extract.extractor] if cfg.extract.extractor != DEFAULT_EXTRACTOR else []), setting])

    tag = tag_of(f"unseen{cfg.train.seed}" if args.setting == "unseen" else args.setting)  # a folder per class split
    lake_tag = tag_of("hard" if args.setting == "hard" else "default")  # unseen: the same embeddings as default
    if args.dataset != "gm":
        if args.setting == "hard":
            raise AudiohashError(f"report: --setting hard is defined for the GM dataset's two banks; dataset "
                                 f"{args.dataset!r} already holds a recording chain out as its query split: use the "
                                 f"default setting")
        cfg.extract.input = str(build_dataset(args.dataset, Path(cfg.lake.table("datasets")) / args.dataset))
    # The input manifest is resolved before the lake moves (an empty extract.input means the
    # dataset under the main lake).
    cfg.extract.input = cfg.extract_input
    if lake_tag != "default":  # the GM default keeps the main lake (make demo's embeddings)
        cfg.mlflow.tracking_uri = cfg.tracking_uri  # keep the runs in the main store
        cfg.lake.root = cfg.lake.table(f"report-{lake_tag}")
        Path(cfg.lake.root).mkdir(parents=True, exist_ok=True)
    if args.setting == "hard":
        manifest = pd.read_csv(cfg.extract.input)
        base = Path(cfg.extract.input).resolve().parent
        manifest["path"] = [str(base / p) for p in manifest["path"]]
        derived = Path(cfg.lake.root) / "manifest.csv"
        report.hard_manifest(manifest, *args.banks.split(",")).to_csv(derived, index=False)
        # Labels from the train bank only; the indexed bank's clips join training unlabeled.
        cfg.extract.input, cfg.train.splits, cfg.train.unlabeled_splits = str(derived), ["train"], ["db"]
    if args.setting == "unseen":
        manifest = pd.read_csv(cfg.extract.input)
        database = manifest[manifest["split"].isin(cfg.encode.splits)] if cfg.encode.splits else manifest
        cfg.train.unlabeled_classes = draw_unseen_classes(database["label"].dropna(), args.unseen_share, cfg.train.seed)
        print(f"report: classes without labels in training (seed {cfg.train.seed}): {cfg.train.unlabeled_classes}")
    runs.extract(cfg)
    methods = args.methods.split(",") if args.methods else list(report.METHODS)
    bits = [int(b) for b in args.bits.split(",")] if args.bits else list(report.BITS)
    curve_bits = 32 if 32 in bits else bits[-1]
    rows, curves, sweep = [], {}, []

    def one_model(method, n_bits, fraction):
        run_cfg = copy.deepcopy(cfg)
        run_cfg.train.method, run_cfg.train.bits, run_cfg.train.label_fraction = method, n_bits, fraction
        run_cfg.model.name, run_cfg.model.version, run_cfg.query.top_r = "", "latest", 0
        train = mlflow.get_run(runs.train(run_cfg))
        runs.encode(run_cfg)
        query = mlflow.get_run(runs.query(run_cfg))
        metrics = query.data.metrics
        row = {"method": method, "bits": n_bits, "label_fraction": fraction, "supervised": method in report.SUPERVISED,
               "map_all": metrics["map_all"], "map_at_100": metrics.get("map_at_100"),
               "precision_at_100": metrics.get("precision_at_100"), "train_s": train.data.metrics["train_s"],
               "query_run_id": query.info.run_id,
               **{k: metrics[k] for k in ("map_all_unseen", "map_all_seen") if k in metrics}}
        return row, mlflow.artifacts.load_dict(f"{query.info.artifact_uri}/curves.json")

    with job_run(cfg, "report", run_name=f"report-{tag}") as parent:
        for method in methods:
            # In the parent's experiment (a nested run would otherwise land in MLflow's default one).
            with mlflow.start_run(run_name=method, nested=True, experiment_id=parent.info.experiment_id):
                mlflow.set_tag("audiohash.job", "report-method")
                for n_bits in bits:
                    try:
                        row, curve = one_model(method, n_bits, cfg.train.label_fraction)
                    except AudiohashError as e:  # a method this dataset is too small for: the others go on
                        print(f"report: {method} {n_bits} bits: not run: {e}")
                        continue
                    rows.append(row)
                    if n_bits == curve_bits:
                        curves[method] = curve
                    print(f"report: {method} {n_bits} bits: mAP@all {row['map_all']:.4f}")
                if args.label_sweep and method in report.SUPERVISED:
                    for fraction in report.LABEL_FRACTIONS:
                        sweep.append(one_model(method, curve_bits, fraction)[0])
        folder = report.write_report(Path(args.out) / tag, tag, rows, curves, sweep, curve_bits)
        mlflow.log_artifacts(str(folder), "report")
    print((folder / "results.md").read_text())
    print(f"report: wrote {folder} (MLflow parent run {parent.info.run_id})")


if __name__ == "__main__":
    parser = job_parser(__doc__)
    parser.add_argument("--setting", choices=("default", "hard", "unseen"), default="default",
                        help="hard: labels from one GM bank, index the other; unseen: a seeded share of the classes "
                             "(train.seed) has no label in training")
    parser.add_argument("--unseen-share", type=float, default=0.25, help="unseen setting: share of classes unlabeled")
    parser.add_argument("--dataset", default="gm", help="a dataset of `python -m audiohash.dataset --list` (default: gm)")
    parser.add_argument("--methods", default="", help="comma-separated (default: sh,itq,agh,pq,opq,dqn,dqn_cls,dqn_semi)")
    parser.add_argument("--bits", default="", help="comma-separated (default: 8,16,24,32,64)")
    parser.add_argument("--label-sweep", action="store_true", help="also sweep the labeled fraction at 32 bits")
    parser.add_argument("--banks", default="fluidr3,timgm6mb", help="hard setting: TRAIN_BANK,HELD_OUT_BANK")
    parser.add_argument("--out", default="reports")
    run_job(main, parser)
