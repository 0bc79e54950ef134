"""The four jobs on a real Spark standalone cluster (a master and two 1-core workers on loopback:
separate JVMs and Pythons for driver and executors), the project code shipped as a zip through
``--py-files``, results equal to a ``local[2]`` run's; and the encode and query stages surviving
the loss of a worker in the middle of their scan.

Lake and MLflow store live in local temp folders: every process shares this machine. A real
cluster needs shared storage for both (README, "Running on a cluster").
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import REPO, make_config, run_job_main
from spark_cluster import (EVENT_LOG_CONF, Daemon, StandaloneCluster, Submission, cluster_env, descendants,
                           lost_tasks, read_event_log, stages_with_operator,
                           standalone_cluster)  # noqa: F401  (the fixture)

JOBS = ("extract", "train", "encode", "query")
SCAN_OPERATOR = "MapInArrow"  # the Python scan of the encode and query stages, in the physical plan
# For the worker-loss runs, where the scan reads through Spark's reader: one task per data file
# (Spark packs a small table's few files into one partition otherwise), so both executors scan.
SPLIT_SCAN = {"spark.sql.files.openCostInBytes": str(1 << 30), "spark.sql.files.maxPartitionBytes": str(1 << 30)}
JOB_TIMEOUT_S = 1200  # generous: the machine is shared, and JVMs start slowly under load


def job_overrides(lake: Path, manifest: Path) -> list[str]:
    """The same settings as conftest.make_config, minus spark.master (spark-submit's --master)."""
    return [f"lake.root={lake}", f"extract.input={manifest}", "spark.show_progress=false", "train.bits=32",
            "query.results_r=20"]


def submit(cluster: StandaloneCluster, job: str, overrides: list[str], code_zip: Path, log: Path,
           conf: dict[str, str] | None = None, env: dict[str, str] | None = None) -> Submission:
    return cluster.submit(REPO / "jobs" / f"{job}.py", ["--conf-file", str(REPO / "conf" / "small.yaml"), *overrides],
                          [code_zip], log, conf, env=env)


def finish(job: Submission, name: str) -> str:
    """Wait for a spark-submit; fail with its last lines unless it exited 0. Returns its output."""
    try:
        rc = job.wait(JOB_TIMEOUT_S)
    finally:
        job.stop()  # only acts on a timeout (or an interrupt): no driver left behind
    output = job.output()
    assert rc == 0, f"{name} on the cluster exited {rc}; last lines:\n" + "\n".join(output.splitlines()[-40:])
    return output


def run_id_of(output: str) -> str:
    return re.findall(r"\(MLflow run ([0-9a-f]{32})\)", output)[-1]


@pytest.fixture(scope="module")
def code_zip(tmp_path_factory) -> Path:
    """The project code as spark-submit ships it (scripts/package.sh), and proof that nothing else
    can provide it: without PYTHONPATH the venv's Python cannot import audiohash."""
    out = tmp_path_factory.mktemp("dist") / "audiohash.zip"
    subprocess.run([str(REPO / "scripts" / "package.sh"), str(out)], check=True, env=cluster_env())
    bare = subprocess.run([sys.executable, "-c", "import audiohash"], env=cluster_env(), cwd=out.parent,
                          capture_output=True)
    assert bare.returncode != 0, ("audiohash imports without PYTHONPATH (installed into the venv?): the "
                                  "cluster tests would not prove that the code is shipped")
    return out


@dataclass
class Pipeline:
    lake: Path
    cfg: object
    seconds: dict
    outputs: dict
    log_dir: Path | None = None  # the jobs' log files (conf/spark/spark-env.sh names them)


@pytest.fixture(scope="module")
def cluster_pipeline(standalone_cluster, code_zip, small_manifest, tmp_path_factory) -> Pipeline:
    """extract -> train -> encode -> query, each a spark-submit against the standalone cluster."""
    lake = tmp_path_factory.mktemp("cluster-lake")
    log_dir = tmp_path_factory.mktemp("cluster-logs")
    seconds, outputs = {}, {}
    for job in JOBS:
        submission = submit(standalone_cluster, job, job_overrides(lake, small_manifest), code_zip,
                            lake.parent / f"{lake.name}-{job}.log", env={"AUDIOHASH_LOG_DIR": str(log_dir)})
        outputs[job] = finish(submission, job)
        seconds[job] = submission.seconds
    print(f"\ncluster (2 workers x 1 core) wall time per job, s: {_shown(seconds)}")
    return Pipeline(lake, make_config(lake, f"extract.input={small_manifest}", "train.bits=32"), seconds, outputs,
                    log_dir)


@pytest.fixture(scope="module")
def local_pipeline(spark, small_manifest, tmp_path_factory) -> Pipeline:
    """The reference: the same jobs on the test process's local[2] session."""
    lake = tmp_path_factory.mktemp("local-lake")
    cfg = make_config(lake, f"extract.input={small_manifest}", "train.bits=32", "query.results_r=20")
    seconds = {}
    for job in JOBS:
        started = time.monotonic()
        extra = {"method": None, "bits": None, "label_fraction": None} if job == "train" else {}
        run_job_main(job, cfg, **extra)
        seconds[job] = time.monotonic() - started
    print(f"\nlocal[2] in-process wall time per job, s: {_shown(seconds)}")
    return Pipeline(lake, cfg, seconds, {})


def _shown(seconds: dict) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + f"; total {sum(seconds.values()):.0f}"


def table(spark, cfg, name: str, version: int | None = None):
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return reader.load(cfg.lake.table(name)).toPandas()


def query_run(cfg, run_id: str | None = None):
    from audiohash.tracking import use_store

    runs = mlflow.search_runs([use_store(cfg)])
    runs = runs[runs["tags.audiohash.job"] == "query"]
    return runs[runs["run_id"] == run_id].iloc[0] if run_id else runs.sort_values("start_time").iloc[0]


# ---- what the executors run -------------------------------------------------------------------------
EXECUTOR_PROBE = """
import json, sys
from pyspark.sql import SparkSession

spark = SparkSession.builder.getOrCreate()
task_cpus = int(spark.conf.get("spark.task.cpus", "1"))  # what the stages read


def probe(_):
    import faiss, torch
    import audiohash
    from audiohash.spark.tables import set_worker_threads

    set_worker_threads(task_cpus)
    yield {"audiohash": audiohash.__file__, "python": sys.executable, "sys_path": sys.path,
           "torch": torch.get_num_threads(), "faiss": faiss.omp_get_max_threads()}


import audiohash
print("DRIVER " + json.dumps({"audiohash": audiohash.__file__, "task_cpus": task_cpus}))
print("EXECUTORS " + json.dumps(spark.sparkContext.parallelize(range(4), 4).mapPartitions(probe).collect()))
"""


@pytest.mark.cluster
@pytest.mark.slow
def test_executors_import_the_shipped_zip_and_use_task_cpus_threads(standalone_cluster, code_zip, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(EXECUTOR_PROBE)
    output = finish(standalone_cluster.submit(script, [], [code_zip], tmp_path / "probe.log"), "probe")
    driver = json.loads(re.search(r"^DRIVER (.*)$", output, re.M).group(1))
    executors = json.loads(re.search(r"^EXECUTORS (.*)$", output, re.M).group(1))
    lib = str(REPO / "lib")
    # The driver imports the zip spark-submit put on its path; each executor the copy it fetched.
    assert f"{code_zip.name}/audiohash/__init__.py" in driver["audiohash"]
    for seen in executors:
        assert f"{code_zip.name}/audiohash/__init__.py" in seen["audiohash"] and lib not in seen["sys_path"]
        assert seen["python"] == sys.executable  # the venv's Python, from spark.pyspark.python
        # set_worker_threads gives torch and faiss spark.task.cpus threads (1 on these 1-core workers).
        assert seen["torch"] == seen["faiss"] == driver["task_cpus"] == 1


# ---- the cluster run equals the local run ----------------------------------------------------------
@pytest.mark.cluster
@pytest.mark.slow
def test_four_jobs_on_the_cluster_equal_the_local_run(spark, cluster_pipeline, local_pipeline):
    on_cluster, local = cluster_pipeline.cfg, local_pipeline.cfg
    emb_c = table(spark, on_cluster, "embeddings").sort_values("clip_id").reset_index(drop=True)
    emb_l = table(spark, local, "embeddings").sort_values("clip_id").reset_index(drop=True)
    assert len(emb_c) == 336 and list(emb_c["clip_id"]) == list(emb_l["clip_id"])
    assert (emb_c[["label", "split", "path"]] == emb_l[["label", "split", "path"]]).all().all()
    np.testing.assert_array_equal(np.stack(emb_c["embedding"]), np.stack(emb_l["embedding"]))

    key = ["clip_id", "shard", "code", "label", "model_name", "model_version"]
    codes_c = table(spark, on_cluster, "codes")[key].sort_values("clip_id").reset_index(drop=True)
    codes_l = table(spark, local, "codes")[key].sort_values("clip_id").reset_index(drop=True)
    assert codes_c["clip_id"].is_unique and len(codes_c) == (emb_c["split"] == "db").sum()
    assert codes_c.equals(codes_l)

    cols = ["query_id", "rank", "clip_id", "distance"]
    res_c = table(spark, on_cluster, "results")[cols].sort_values(["query_id", "rank"]).reset_index(drop=True)
    res_l = table(spark, local, "results")[cols].sort_values(["query_id", "rank"]).reset_index(drop=True)
    assert len(res_c) == (emb_c["split"] == "query").sum() * 20
    assert res_c.equals(res_l)

    run_c, run_l = query_run(on_cluster), query_run(local)
    quality = [c for c in run_l.index if re.match(r"metrics\.(map|precision|recall)_", c)]
    assert "metrics.map_all" in quality
    assert run_c[quality].to_dict() == run_l[quality].to_dict()


@pytest.mark.cluster
@pytest.mark.slow
def test_the_jobs_console_is_quiet_and_their_log_files_hold_the_rest(cluster_pipeline):
    """The four spark-submits (through scripts/submit.sh) printed their summaries, but no INFO line
    and nothing of Ivy's resolution report; each run's log file holds Ivy's report, Spark's INFO
    and the job's own INFO (two processes, one file)."""
    for job, output in cluster_pipeline.outputs.items():
        assert re.search(rf"^{job}\b", output, re.M), output  # its summary line
        assert not [line for line in output.splitlines() if re.search(r"\bINFO\b|^::|^Ivy |^\tfound ", line)], output
        [log] = cluster_pipeline.log_dir.glob(f"{job}-*.log")
        text = log.read_text()
        assert ":: resolving dependencies ::" in text and "already retrieved" in text  # Ivy
        assert "INFO org.apache.spark.SparkContext: Running Spark version" in text  # Spark's JVM
        assert re.search(r"INFO audiohash\.spark: spark \S+, master spark://", text)  # the job's Python


@pytest.mark.cluster
@pytest.mark.slow
def test_executor_stats_of_the_query_scan_reach_the_summary_and_mlflow(spark, cluster_pipeline):
    cfg = cluster_pipeline.cfg
    run = query_run(cfg, run_id_of(cluster_pipeline.outputs["query"]))
    records = mlflow.artifacts.load_dict(f"runs:/{run['run_id']}/scan_partitions.json")["partitions"]
    n_codes = len(table(spark, cfg, "codes"))
    # One query batch: every code row was scanned once, by some executor task.
    assert {r["job"] for r in records} == {"scan batch 1/1"}
    assert sum(r["rows"] for r in records) == n_codes == run["metrics.scan_rows"]
    assert run["metrics.scan_tasks"] == len(records) and all(r["seconds"] > 0 for r in records)
    assert run["metrics.scan_task_s_max"] == pytest.approx(max(r["seconds"] for r in records))
    assert f"scan_rows={n_codes}" in cluster_pipeline.outputs["query"]  # the job's printed summary


# ---- losing a worker in the middle of a scan ---------------------------------------------------
@dataclass
class Kill:
    task_attempt_id: int  # the scan task paused at the fault point, then killed with its worker
    worker: Daemon
    pids: list[int]


def kill_a_worker_while_scanning(cluster: StandaloneCluster, job: Submission, pause_dir: Path,
                                 timeout: float = JOB_TIMEOUT_S) -> Kill:
    """The first task of the stage's Python scan stops at fault point ``scan.task``
    (``audiohash.faults``: it writes ``pause_dir/paused``, its pid and task attempt id, and waits
    for a release that never comes): kill the worker whose process tree holds that pid, with its
    executor. The task is certainly mid-scan when it dies: no race with its end."""
    deadline = time.monotonic() + timeout
    marker = pause_dir / "paused"
    while True:
        if job.process.poll() is not None:
            pytest.fail(f"the job ended (exit {job.process.returncode}) before a scan task paused; "
                        f"last lines:\n" + "\n".join(job.output().splitlines()[-20:]))
        if time.monotonic() > deadline:
            pytest.fail(f"no {SCAN_OPERATOR} task reached fault point scan.task within {timeout:.0f} s")
        try:
            where = json.loads(marker.read_text())
            break
        except (FileNotFoundError, json.JSONDecodeError):  # not there yet, or being written
            time.sleep(0.2)
    worker = next(w for w in cluster.live_workers() if where["pid"] in descendants(w.pid))
    return Kill(where["task_attempt_id"], worker, cluster.kill_worker(worker))


def check_the_scan_lost_tasks_and_recovered(cluster: StandaloneCluster, events_dir: Path, kill: Kill) -> None:
    """From the app's event log: the paused scan task died with its executor mid-job, the
    executor was removed, each lost partition succeeded later elsewhere, every job succeeded."""
    events = read_event_log(events_dir)
    scan_stages = stages_with_operator(events, SCAN_OPERATOR)
    lost = lost_tasks(events, scan_stages)
    paused = [e for e in lost if e["Task Info"]["Task ID"] == kill.task_attempt_id]
    assert paused, f"the paused {SCAN_OPERATOR} task {kill.task_attempt_id} is not among the lost ones: {lost}"
    executor_id = paused[0]["Task Info"]["Executor ID"]
    assert {e["Task Info"]["Executor ID"] for e in lost} == {executor_id}
    assert any(e["Event"] == "SparkListenerExecutorRemoved" and e["Executor ID"] == executor_id for e in events)
    done = {(e["Stage ID"], e["Task Info"]["Index"]) for e in events if e["Event"] == "SparkListenerTaskEnd"
            and e["Task End Reason"]["Reason"] == "Success" and e["Task Info"]["Executor ID"] != executor_id}
    assert {(e["Stage ID"], e["Task Info"]["Index"]) for e in lost} <= done
    results = [e["Job Result"]["Result"] for e in events if e["Event"] == "SparkListenerJobEnd"]
    assert results and set(results) == {"JobSucceeded"}
    # The master saw the worker go.
    deadline = time.monotonic() + 120
    while kill.worker.worker_id in cluster.alive_worker_ids() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert kill.worker.worker_id not in cluster.alive_worker_ids()


def run_losing_a_worker(cluster: StandaloneCluster, job: str, overrides: list[str], code_zip: Path,
                        folder: Path) -> str:
    cluster.ensure_workers(2)  # a previous test may have killed one
    events_dir, pause_dir = folder / "events", folder / "pause"
    events_dir.mkdir()
    pause_dir.mkdir()
    submission = submit(cluster, job, overrides, code_zip, folder / f"{job}.log",
                        {**EVENT_LOG_CONF, "spark.eventLog.dir": events_dir.as_uri(), **SPLIT_SCAN,
                         "spark.executorEnv.AUDIOHASH_FAULT": f"scan.task:pause:{pause_dir}"})
    try:
        kill = kill_a_worker_while_scanning(cluster, submission, pause_dir)
    except BaseException:
        submission.stop()
        raise
    output = finish(submission, job)
    check_the_scan_lost_tasks_and_recovered(cluster, events_dir, kill)
    return output


@pytest.mark.cluster
@pytest.mark.slow
def test_encode_survives_losing_a_worker_mid_scan(spark, standalone_cluster, cluster_pipeline, code_zip,
                                                  small_manifest, tmp_path):
    cfg = cluster_pipeline.cfg
    before = table(spark, cfg, "codes")
    output = run_losing_a_worker(standalone_cluster, "encode",
                                 [*job_overrides(cfg.lake.root, small_manifest), "encode.mode=full"], code_zip,
                                 tmp_path)
    assert f"{len(before)} clips encoded" in output
    after = table(spark, cfg, "codes")
    assert after["clip_id"].is_unique and len(after) == len(before)  # exactly one code per clip
    key = ["clip_id", "shard", "code", "label"]
    assert (after[key].sort_values("clip_id").reset_index(drop=True)
            .equals(before[key].sort_values("clip_id").reset_index(drop=True)))
    assert set(after["encode_run_id"]) == {run_id_of(output)}  # every row from the disturbed run


@pytest.mark.cluster
@pytest.mark.slow
def test_query_survives_losing_a_worker_mid_scan(spark, standalone_cluster, cluster_pipeline, code_zip,
                                                 small_manifest, tmp_path):
    cfg = cluster_pipeline.cfg
    undisturbed = run_id_of(cluster_pipeline.outputs["query"])
    # The same query batches as the undisturbed run: another batch size may change the distances'
    # last bits (the lookup tables are computed per batch).
    output = run_losing_a_worker(standalone_cluster, "query",
                                 [*job_overrides(cfg.lake.root, small_manifest), "query.evaluate=false"], code_zip,
                                 tmp_path)
    disturbed = run_id_of(output)
    results = table(spark, cfg, "results")
    cols = ["query_id", "rank", "clip_id", "distance"]
    ours = results[results["run_id"] == disturbed][cols].sort_values(["query_id", "rank"]).reset_index(drop=True)
    reference = results[results["run_id"] == undisturbed][cols].sort_values(["query_id", "rank"]).reset_index(drop=True)
    assert len(ours) > 0 and ours.equals(reference)  # the same top-R, rank by rank
    # Stats come from successful task attempts only: the lost task's rows are not counted twice.
    run = query_run(cfg, disturbed)
    records = mlflow.artifacts.load_dict(f"runs:/{disturbed}/scan_partitions.json")["partitions"]
    assert run["metrics.scan_rows"] == sum(r["rows"] for r in records) == len(table(spark, cfg, "codes"))
    assert run["metrics.scan_tasks"] == len(records) == len({r["partition"] for r in records})


# ---- the accumulator collector, for stages that write instead of collecting --------------------
@pytest.mark.spark
def test_partition_stats_accumulator_counts_each_partition_once(spark):
    import pyarrow as pa

    from audiohash.spark.stats import PartitionStatsAccumulator, summarize

    acc = PartitionStatsAccumulator(spark.sparkContext, "write")

    def count_rows(batches):
        started = time.perf_counter()
        rows = 0
        for batch in batches:
            rows += batch.num_rows
            yield pa.RecordBatch.from_arrays([batch.column("id")], names=["id"])
        acc.add(rows, time.perf_counter() - started)

    frame = spark.range(1000, numPartitions=4).mapInArrow(count_rows, "id long")
    frame.write.format("noop").mode("overwrite").save()
    frame.write.format("noop").mode("overwrite").save()  # a second pass over the same partitions
    stats = acc.stats()
    assert [s.partition for s in stats] == [0, 1, 2, 3]
    assert sum(s.rows for s in stats) == 1000 and all(s.seconds >= 0 for s in stats)
    assert summarize(stats, "write")["write_rows"] == 1000
