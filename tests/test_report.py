"""jobs/report.py through the real jobs on the small dataset (two methods, two code lengths), then
the notebook that shows its MLflow runs, executed headless so it cannot rot."""
import json
import os

import mlflow
import pytest
from conftest import REPO, make_config, run_job_main

pytestmark = [pytest.mark.spark, pytest.mark.slow]


@pytest.fixture(scope="module")
def report(spark, small_manifest, tmp_path_factory):
    lake = tmp_path_factory.mktemp("report-lake")
    out = tmp_path_factory.mktemp("reports")
    cfg = make_config(lake, f"extract.input={small_manifest}",
                      "train.hyper.dqn={steps: 120, warmup_steps: 40, refit_every: 40}")
    run_job_main("report", cfg, setting="default", dataset="gm", methods="pq,dqn", bits="8,16", label_sweep=False,
                 banks="fluidr3,timgm6mb", out=str(out))
    return cfg, out / "default"


def test_report_writes_the_table_plots_and_one_mlflow_run_per_method(report):
    cfg, folder = report
    results = json.loads((folder / "results.json").read_text())
    rows = {(r["method"], r["bits"]): r for r in results["results"]}
    assert sorted(rows) == [("dqn", 8), ("dqn", 16), ("pq", 8), ("pq", 16)]
    assert all(0 < r["map_all"] <= 1 for r in rows.values())
    table = (folder / "results.md").read_text()
    assert "| method | 8 bits | 16 bits |" in table
    assert f"| pq | {100 * rows['pq', 8]['map_all']:.1f} | {100 * rows['pq', 16]['map_all']:.1f} |" in table
    for png in ("map_vs_bits.png", "map_at_r.png", "precision_recall.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The numbers are the query job's own MLflow metrics; one parent run, a child run per method.
    mlflow.set_tracking_uri(cfg.tracking_uri)
    query_run = mlflow.get_run(rows["pq", 16]["query_run_id"])
    assert query_run.data.metrics["map_all"] == rows["pq", 16]["map_all"]
    runs = mlflow.search_runs(experiment_names=[cfg.mlflow.experiment])
    parent = runs[runs["tags.audiohash.job"] == "report"]
    assert len(parent) == 1
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"].iloc[0]]
    assert sorted(children["tags.mlflow.runName"]) == ["dqn", "pq"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent["run_id"].iloc[0], "report")}
    assert {"report/results.md", "report/map_vs_bits.png", "report/map_at_r.png"} <= artifacts


def test_notebook_shows_the_latest_report(report, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    cfg, _ = report
    notebook = nbformat.read(REPO / "notebooks" / "report.ipynb", as_version=4)
    env = {"AUDIOHASH_TRACKING_URI": cfg.tracking_uri, "AUDIOHASH_EXPERIMENT": cfg.mlflow.experiment}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(notebook, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "| method | 8 bits | 16 bits |" in markdown and "| dqn |" in markdown
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3


def test_unseen_setting_hides_a_share_of_the_classes_and_scores_them_apart(report, spark):
    """--setting unseen through the jobs: the train job hides the drawn classes' labels, the query
    job scores their queries apart (map_all_unseen / map_all_seen), the report shows both."""
    import pandas as pd

    from audiohash.tracking import load_registered_bundle
    from audiohash.training import draw_unseen_classes

    cfg, folder = report
    out = folder.parent
    cfg.train.hyper["dqn_semi"] = {"steps": 120, "warmup_steps": 40, "refit_every": 40}
    run_job_main("report", cfg, setting="unseen", dataset="gm", methods="pq,dqn_semi", bits="16", label_sweep=False,
                 banks="fluidr3,timgm6mb", unseen_share=0.25, out=str(out))
    results = json.loads((out / "unseen0" / "results.json").read_text())
    rows = {r["method"]: r for r in results["results"]}
    assert sorted(rows) == ["dqn_semi", "pq"]
    manifest = pd.read_csv(cfg.extract.input)
    unseen = draw_unseen_classes(manifest.loc[manifest["split"] == "db", "label"], 0.25, 0)
    assert len(unseen) == round(0.25 * manifest["label"].nunique())
    mlflow.set_tracking_uri(cfg.tracking_uri)
    for method, row in rows.items():
        assert 0 < row["map_all_unseen"] <= 1 and 0 < row["map_all_seen"] <= 1
        query = mlflow.get_run(row["query_run_id"])
        queries = manifest[manifest["split"] == "query"]
        assert query.data.metrics["n_queries_unseen"] == queries["label"].isin(unseen).sum()
        assert query.data.metrics["map_all_unseen"] == row["map_all_unseen"]
    # The model never saw the unseen classes' labels: its class list lacks them.
    cfg.train.method, cfg.train.bits = "dqn_semi", 16
    bundle = load_registered_bundle(cfg, "latest")
    assert bundle.meta["unlabeled_classes"] == unseen
    assert sorted(bundle.meta["classes"]) == sorted(set(manifest["label"]) - set(unseen))
    table = (out / "unseen0" / "results.md").read_text()
    assert "no label in training" in table and f"| dqn_semi | {100 * rows['dqn_semi']['map_all_unseen']:.1f} |" in table
