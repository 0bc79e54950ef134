"""Retrieval quality of every method on the real benchmark, against two references without codes.

    python benchmarks/quality.py --out FILE.json [--dataset NAME] [--extractor NAME] [--bits 32] [--no-sweep]

Builds (or reuses, under benchmarks/.cache) a dataset (``--dataset``, any name of
``python -m audiohash.dataset --list``; default the GM renders, ``--small`` = gm-small), embeds it
with an extractor (``--extractor``, default timbre) through the extract job's own worker (one row
per window, as the job writes them), and then, in one process and with the train job's own code
(``training.train_bundle``: the same stratified label sample, the same seeds, the database rows
sorted by clip_id as the job reads them):
- for each method in {sh, itq, agh, pq, opq, dqn, dqn_cls, dqn_semi} and bits in {8, 16, 24, 32, 64}, trains
  on the database split with labeled fraction 0.1 (supervised methods see only those labels),
  encodes the database and ranks every database clip for each held-out query (the quantizer's own
  faiss scan, as the query job's executors run it): mAP@all, mAP@100, precision@100;
  ``map_all_float`` ranks by the same network's unquantized outputs (supervised methods);
  ``map_all_faiss`` is faiss's own index (IndexPQ, OPQ+PQ, ITQ+LSH) trained on the same data (pq,
  opq, itq): the check that our glue around faiss loses nothing;
- the references: ``euclid`` (exact L2 on the standardized embeddings) and ``mlp_probs`` (an MLP
  classifier with the same hidden size, trained on the same labels, early-stopped on a held-out
  fifth of them, ranking the database by its class-probability vectors; its query accuracy too);
- the label-fraction sweep {0.01 .. 1.0} for the supervised methods at 32 bits.
``--setting`` (issue 22): ``default`` as above; ``hard`` (GM): labels from one bank's database
clips, the other bank's database clips indexed (and in training, unlabeled), queries from the
first bank; ``unseen``: a seeded ``--unseen-share`` of the classes (``--seed``) has no label in
training, every database row stays indexed; rows carry ``map_all_unseen`` / ``map_all_seen`` (the
query job's split by class) and, for supervised methods, ``map_all_seen_default``: the same
method trained with every class's labels, on the same seen-class queries.
``--validation`` (for choosing hyper-parameters, never with the benchmark's queries): the query
split is dropped and a seeded 15% of each (class, source) group's database clips
(``--validation-seed``) become the queries, the rest the database; every setting works on that
carve as on the real split. ``--hyper '{"dqn_semi": {"noise": 0.3}}'`` overrides a method's
hyper-parameters (recorded in the JSON's dataset.hyper).
Writes {"dataset", "results": [...], "label_sweep": [...], "checks": {...}} and prints the table in
the paper's layout plus the checks (gain over PQ at 32 bits; per query group in ``unseen``).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from real_data import machine, real_embeddings

from audiohash.config import DEFAULT_EXTRACTOR
from audiohash.errors import AudiohashError
from audiohash.evaluation import class_group_metrics, exact_float_topk, retrieval_metrics
from audiohash.quantizers import AdcQuantizer
from audiohash.report import BITS, LABEL_FRACTIONS, METHODS, SUPERVISED, paper_table
from audiohash.training import draw_unseen_classes, hide_labels, sample_labeled, seed_everything, train_bundle

log = logging.getLogger("benchmarks.quality")
LABEL_FRACTION = 0.1
SWEEP_BITS = 32
MLP_HIDDEN = 512  # the DQN network's hidden size


def scores(yq: np.ndarray, ydb: np.ndarray, ranked: np.ndarray) -> dict:
    """mAP@all, mAP@100 and precision@100 of full rankings ranked (nq, n_db) into ydb, by the
    query job's own metric code."""
    top = retrieval_metrics(yq, ydb, ranked[:, :100])
    return {"map_all": retrieval_metrics(yq, ydb, ranked)["map_all"], "map_100": top["map_at_100"],
            "p_100": top["precision_at_100"]}


def faiss_own_ranking(method: str, bits: int, xs_db: np.ndarray, xs_q: np.ndarray, seed: int) -> np.ndarray | None:
    """faiss's own index for pq/opq/itq, trained on the same standardized inputs with the same
    k-means/rotation seeds as ours (so any gap is our glue, not the seed); None for other methods."""
    d, M = xs_db.shape[1], bits // 8
    d_out = -(-d // M) * M
    if method == "pq":
        xs_db, xs_q = (np.hstack([a, np.zeros((len(a), d_out - d), np.float32)]) for a in (xs_db, xs_q))
        index = faiss.IndexPQ(d_out, M, 8)
        index.pq.cp.seed = seed
    elif method == "opq":
        index = faiss.index_factory(d, f"OPQ{M}_{d_out},PQ{M}")
        opq = faiss.downcast_VectorTransform(index.chain.at(0))
        inner = faiss.ProductQuantizer(d_out, M, 8)
        inner.cp.seed = seed
        opq.pq = inner  # `inner` outlives the training below
        faiss.downcast_index(index.index).pq.cp.seed = seed
    elif method == "itq":
        index = faiss.index_factory(d, f"ITQ{bits},LSH")
        faiss.downcast_VectorTransform(index.chain.at(0)).itq.seed = seed
    else:
        return None
    index.train(np.ascontiguousarray(xs_db))
    index.add(np.ascontiguousarray(xs_db))
    return index.search(np.ascontiguousarray(xs_q), len(xs_db))[1]


def mlp_probs(xs_train: np.ndarray, label_ids: np.ndarray, xs_db: np.ndarray, xs_q: np.ndarray, yq_ids: np.ndarray,
              seed: int):
    """The unquantized supervised reference: class-probability vectors of an MLP classifier.

    Same hidden size and dropout as the DQN network, Adam, trained on the labeled rows with a
    stratified fifth of them held out for early stopping (best held-out accuracy, patience 30 epochs).
    Returns (probabilities of the training rows, of the database (n, C), of the queries (nq, C), query
    accuracy, epochs).
    """
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    labeled = np.flatnonzero(label_ids >= 0)
    held = np.zeros(len(labeled), bool)
    for c in np.unique(label_ids[labeled]):
        rows = np.flatnonzero(label_ids[labeled] == c)
        if len(rows) >= 2:
            held[rng.choice(rows, max(1, len(rows) // 5), replace=False)] = True
    fit_rows, held_rows = labeled[~held], labeled[held]
    n_classes = int(label_ids.max()) + 1
    net = torch.nn.Sequential(torch.nn.Linear(xs_train.shape[1], MLP_HIDDEN), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                              torch.nn.Linear(MLP_HIDDEN, n_classes))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    x_fit, y_fit = torch.from_numpy(xs_train[fit_rows]), torch.from_numpy(label_ids[fit_rows])
    x_held, y_held = torch.from_numpy(xs_train[held_rows]), torch.from_numpy(label_ids[held_rows])
    best, best_state, best_epoch, epoch = -1.0, None, 0, 0
    while epoch - best_epoch < 30 and epoch < 1000:
        net.train()
        for batch in torch.randperm(len(x_fit)).split(128):
            loss = F.cross_entropy(net(x_fit[batch]), y_fit[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            # No class with 2+ labels (a tiny set): nothing held out, so the first epochs' state is kept.
            accuracy = float((net(x_held).argmax(1) == y_held).float().mean()) if len(y_held) else 0.0
        if accuracy > best:
            best, best_epoch = accuracy, epoch
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        epoch += 1
    net.load_state_dict(best_state)
    net.eval()
    with torch.no_grad():
        p_train, p_db, p_q = (torch.softmax(net(torch.from_numpy(a)), 1).numpy() for a in (xs_train, xs_db, xs_q))
    return p_train, p_db, p_q, float((p_q.argmax(1) == yq_ids).mean()), epoch


def run_method(method, bits, fraction, sets, seed, hyper) -> dict:
    """Train on sets.x_train (labels sets.y_train, None = unlabeled), encode sets.x_db, rank it
    for every query; scores, plus per query group (unseen / seen classes) where the setting has them."""
    bundle, train_metrics = train_bundle(method, bits, sets.x_train, sets.y_train, fraction, seed, hyper,
                                         f"quality-{method}-{bits}b", {})
    q = bundle.quantizer
    x_db, y_db, x_q, y_q = sets.x_db, sets.y_db, sets.x_q, sets.y_q
    codes = q.encode(x_db)
    ranked = q.scan(codes, q.query_side(x_q), len(x_db))[1]
    row = {"method": method, "bits": bits, "label_fraction": fraction, "supervised": q.supervised,
           **scores(y_q, y_db, ranked), **sets.group_scores(ranked), "train_s": round(train_metrics["train_s"], 2)}
    if q.supervised and isinstance(q, AdcQuantizer):
        row["map_all_float"] = scores(y_q, y_db, exact_float_topk(q.transform(x_q), q.transform(x_db), len(x_db)))["map_all"]
    if sets.unseen and q.supervised:  # the same method with every class's labels: its seen-class baseline
        labeled, _ = train_bundle(method, bits, sets.x_train, sets.y_db, fraction, seed, hyper, f"quality-{method}", {})
        dq = labeled.quantizer
        row["map_all_seen_default"] = sets.group_scores(dq.scan(dq.encode(x_db), dq.query_side(x_q), len(x_db))[1])[
            "map_all_seen"]
    if sets.x_train is x_db:  # faiss's own index trains on what it indexes
        faiss_ranked = faiss_own_ranking(method, bits, q._standardize(x_db), q._standardize(x_q), seed)
        if faiss_ranked is not None:
            row["map_all_faiss"] = scores(y_q, y_db, faiss_ranked)["map_all"]
    return row


@dataclass
class Sets:
    """The rows of one setting: training (labels None where nobody labeled), database, queries;
    ``unseen``: the classes with no label in training (the unseen setting), else empty."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_db: np.ndarray
    y_db: np.ndarray
    x_q: np.ndarray
    y_q: np.ndarray
    unseen: list

    def group_scores(self, ranked: np.ndarray) -> dict:
        """mAP@all over the unseen-class and the seen-class queries separately (unseen setting),
        as the query job scores them."""
        if not self.unseen:
            return {}
        seen = sorted(set(self.y_db) - set(self.unseen))
        out = class_group_metrics(self.y_q, self.y_db, ranked, seen)
        return {k: out[k] for k in ("map_all_unseen", "map_all_seen")}


def setting_sets(data, setting: str, seed: int, unseen_share: float, banks: list[str]) -> Sets:
    """default: train on the database split, index it, query with the query split. hard (GM
    only): labels come from banks[0]'s database clips only; banks[1]'s database clips are indexed
    and join training unlabeled (every method trains on what it indexes); queries are banks[0]'s
    (as jobs/report.py --setting hard). unseen: as default, but a seeded ``unseen_share`` of the
    classes keeps no label in training; every database row stays in the index (Sablayrolles et al.,
    ICASSP 2017)."""
    def rows(split, source=None):
        keep = (data.splits == split) & (True if source is None else data.sources == source)
        ids, labels, x = data.clip_ids[keep], data.labels[keep], data.x[keep]
        order = np.argsort(ids.astype(str), kind="stable")  # the job reads rows sorted by clip_id
        return labels[order], x[order]

    if setting == "hard":
        if not set(banks) <= set(data.sources):
            raise SystemExit(f"--setting hard: banks {banks} are not sources of dataset {data.dataset} "
                             f"({sorted(set(data.sources))})")
        (y_train, x_train), (y_db, x_db), (y_q, x_q) = rows("db", banks[0]), rows("db", banks[1]), rows("query", banks[0])
        y_train = np.concatenate([y_train, np.full(len(y_db), None, object)])
        return Sets(np.vstack([x_train, x_db]), y_train, x_db, y_db, x_q, y_q, [])
    y_db, x_db = rows("db")
    y_q, x_q = rows("query")
    unseen = []
    if setting == "unseen":
        unseen = draw_unseen_classes(y_db, unseen_share, seed)
        return Sets(x_db, hide_labels(y_db, unseen), x_db, y_db, x_q, y_q, unseen)
    return Sets(x_db, y_db, x_db, y_db, x_q, y_q, [])


def validation_carve(data, share: float, seed: int):
    """data with the query split dropped and a seeded ``share`` of each (class, source) group's
    database clips relabeled as queries (whole clips: every window of a clip goes the same way)."""
    db = data.splits == "db"
    clip_ids, labels, sources = data.clip_ids[db], data.labels[db], data.sources[db]
    rng = np.random.default_rng(seed)
    carved = set()
    groups: dict = {}
    for clip, label, source in sorted(set(zip(clip_ids.tolist(), labels.tolist(), sources.tolist()))):
        groups.setdefault((label, source), []).append(clip)
    for key in sorted(groups):
        clips = groups[key]
        n = int(round(share * len(clips)))
        if 0 < n < len(clips):
            carved.update(rng.choice(clips, n, replace=False).tolist())
    splits = np.where(np.isin(clip_ids, list(carved)), "query", "db").astype(object)
    return replace(data, clip_ids=clip_ids, labels=labels, splits=splits, sources=sources, x=data.x[db])


def gain(m: float, pq: float) -> float:
    """Share of PQ's shortfall from a perfect ranking that method m closes."""
    return (m - pq) / (1 - pq)


def checks(results: list[dict]) -> dict:
    """The done-when figures at 32 bits, label fraction 0.1: gain over PQ per supervised method,
    and in the unseen setting mAP@all on unseen-class and seen-class queries."""
    at = {r["method"]: r for r in results if r["bits"] in (SWEEP_BITS, None)}
    if "pq" not in at:
        return {}
    pq = at["pq"]["map_all"]
    out = {"bits": SWEEP_BITS, "pq_map_all": pq}
    for m in SUPERVISED:
        if m in at:
            out[f"gain_{m}"] = round(gain(at[m]["map_all"], pq), 4)
            out[f"float_minus_quantized_{m}"] = round(at[m]["map_all_float"] - at[m]["map_all"], 4)
    supervised = [m for m in SUPERVISED if m in at]
    if supervised:
        best = max(supervised, key=lambda m: at[m]["map_all"])
        out.update(best_supervised=best, gain_best=round(gain(at[best]["map_all"], pq), 4))
        if "mlp_probs" in at:
            out["best_minus_mlp_probs"] = round(at[best]["map_all"] - at["mlp_probs"]["map_all"], 4)
    groups = {m: {k: r[k] for k in ("map_all_unseen", "map_all_seen")} for m, r in at.items() if "map_all_unseen" in r}
    if groups:  # the unseen setting: how each method serves classes nobody labeled, and the others
        out["by_query_group"] = groups
        out["unseen_minus_pq_points"] = {m: round(100 * (groups[m]["map_all_unseen"] - groups["pq"]["map_all_unseen"]), 2)
                                         for m in groups if m != "pq"}
        # seen-class queries: mAP with a quarter of the classes unlabeled over mAP with every label
        out["seen_retention"] = {m: round(r["map_all_seen"] / r["map_all_seen_default"], 4)
                                 for m, r in at.items() if r.get("map_all_seen_default")}
    out["faiss_gap_points"] = {f"{r['method']}@{r['bits']}": round(100 * (r["map_all"] - r["map_all_faiss"]), 2)
                               for r in results if "map_all_faiss" in r}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON results file")
    ap.add_argument("--dataset", default="gm", help="a dataset of `python -m audiohash.dataset --list` (default: gm)")
    ap.add_argument("--extractor", default=DEFAULT_EXTRACTOR, help=f"embedding extractor (default: {DEFAULT_EXTRACTOR})")
    ap.add_argument("--small", action="store_true", help="= --dataset gm-small (14 classes, 336 clips): a smoke run")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    ap.add_argument("--bits", default=",".join(map(str, BITS)), help="comma-separated (default: 8,16,24,32,64)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the label-fraction sweep")
    ap.add_argument("--seed", type=int, default=0, help="training and class-split seed (the dataset seed stays 0)")
    ap.add_argument("--setting", choices=("default", "hard", "unseen"), default="default",
                    help="default; hard: train on one bank, index the other (gm); unseen: a share of the classes unlabeled")
    ap.add_argument("--unseen-share", type=float, default=0.25, help="unseen setting: share of classes without labels")
    ap.add_argument("--banks", default="fluidr3,timgm6mb", help="hard setting: TRAIN_BANK,INDEXED_BANK")
    ap.add_argument("--validation", action="store_true",
                    help="query with a carve of the database split, not the query split (for choosing settings)")
    ap.add_argument("--validation-seed", type=int, default=10, help="seed of the validation carve (default: 10)")
    ap.add_argument("--hyper", default="{}", help='JSON {method: {name: value}} hyper-parameter overrides')
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    name = "gm-small" if args.small else args.dataset
    data = real_embeddings(name, args.extractor)
    if args.validation:
        data = validation_carve(data, 0.15, args.validation_seed)
    hyper = {}
    if name == "gm-small":  # 336 clips: 10% labels is 2 clips per class; fewer steps keep the smoke run short
        hyper = {m: {"steps": 400, "warmup_steps": 100} for m in SUPERVISED}
    for method, values in json.loads(args.hyper).items():
        hyper[method] = {**hyper.get(method, {}), **values}

    sets = setting_sets(data, args.setting, args.seed, args.unseen_share, args.banks.split(","))
    x_db, y_db, x_q, y_q = sets.x_db, sets.y_db, sets.x_q, sets.y_q
    dataset = {"name": name, "extractor": args.extractor, "setting": args.setting, "seed": 0,
               "split_seed": args.seed, "n_train": len(sets.x_train), "n_db": len(x_db), "n_query": len(x_q),
               "n_classes": len(set(y_db)), "embedding": f"{data.extractor_version} ({x_db.shape[1]}-d)",
               "size": "small" if name == "gm-small" else "full",
               "banks": sorted(set(data.sources)), "rejected_files": data.rejected,  # banks: the recording chains
               "validation_seed": args.validation_seed if args.validation else None, "hyper": hyper}
    if sets.unseen:
        dataset.update(unseen_classes=sets.unseen, n_query_unseen=int(np.isin(y_q, sets.unseen).sum()))
    log.info("dataset: %s", dataset)
    methods = [m for m in args.methods.split(",") if m]
    bits_list = [int(b) for b in args.bits.split(",") if b]
    results, sweep = [], []

    # References without codes.
    mean, std = x_db.mean(0), np.maximum(x_db.std(0), 1e-6)
    xs_db, xs_q = ((x_db - mean) / std).astype(np.float32), ((x_q - mean) / std).astype(np.float32)
    ranked = exact_float_topk(xs_q, xs_db, len(xs_db))
    results.append({"method": "euclid", "bits": None, "label_fraction": None, "supervised": False,
                    **scores(y_q, y_db, ranked), **sets.group_scores(ranked), "train_s": 0.0})
    label_ids, classes = sample_labeled(sets.y_train, LABEL_FRACTION, args.seed)
    class_of = {c: i for i, c in enumerate(classes)}
    started = time.perf_counter()
    xs_train = ((sets.x_train - mean) / std).astype(np.float32)
    p_train, p_db, p_q, accuracy, epochs = mlp_probs(xs_train, label_ids, xs_db, xs_q,
                                                     np.array([class_of.get(c, -1) for c in y_q]), args.seed)
    ranked = exact_float_topk(p_q, p_db, len(p_db))
    results.append({"method": "mlp_probs", "bits": None, "label_fraction": LABEL_FRACTION, "supervised": True,
                    **scores(y_q, y_db, ranked), **sets.group_scores(ranked),
                    "train_s": round(time.perf_counter() - started, 2),
                    "query_accuracy": round(accuracy, 4), "epochs": epochs})
    for row in results:
        log.info("%s: mAP@all %.4f", row["method"], row["map_all"])

    refused = []
    for method in methods:
        for bits in bits_list:
            try:
                row = run_method(method, bits, LABEL_FRACTION, sets, args.seed, hyper)
            except AudiohashError as e:  # e.g. too few rows for a method's codebooks on a small dataset
                log.warning("%s %d bits: not run: %s", method, bits, e)
                refused.append({"method": method, "bits": bits, "reason": str(e)})
                continue
            results.append(row)
            log.info("%s %d bits: mAP@all %.4f (float %s, faiss %s) in %.1f s", method, bits, row["map_all"],
                     row.get("map_all_float"), row.get("map_all_faiss"), row["train_s"])
    if not args.no_sweep:
        for method in [m for m in methods if m in SUPERVISED]:
            for fraction in LABEL_FRACTIONS:
                row = run_method(method, SWEEP_BITS, fraction, sets, args.seed, hyper)
                sweep.append(row)
                log.info("sweep %s fraction %.2f: mAP@all %.4f", method, fraction, row["map_all"])

    report = {"benchmark": "quality", "dataset": dataset, "results": results, "not_run": refused, "label_sweep": sweep,
              "checks": checks(results), "machine": machine(),
              "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    coded = [r for r in results if r["bits"] is not None]
    print(f"\nmAP@all (%) over the whole database, dataset {name}, extractor {args.extractor}, "
          f"label fraction {LABEL_FRACTION}:\n")
    print(paper_table(coded) if coded else "(no method ran: see not_run in the JSON)")
    for r in results[:2]:
        extra = f", query accuracy {r['query_accuracy']:.3f}" if "query_accuracy" in r else ""
        print(f"{r['method']}: mAP@all {100 * r['map_all']:.1f}{extra}")
    if sweep:
        print(f"\nmAP@all (%) vs labeled fraction at {SWEEP_BITS} bits:\n")
        print(paper_table([{**r, "bits": r["label_fraction"]} for r in sweep]).replace(" bits |", " |"))
    print("\nchecks:", json.dumps(report["checks"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
