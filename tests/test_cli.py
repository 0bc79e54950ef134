"""The jobs' quiet console without Spark: audiohash.cli's log file and levels, and scripts/submit.sh
moving Ivy's resolution report off the console (a stand-in spark-submit replays a real one)."""
from __future__ import annotations

import calendar
import logging
import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

from audiohash.cli import job_parser, log_file_for, run_job, setup_logging

# What spark-submit 4.2 printed to stderr with spark.jars.packages=io.delta:delta-spark_2.13:4.4.0
# (the resolution report cut short), around a Spark warning that must stay on the console.
IVY_REPORT = """\
WARNING: Using incubator modules: jdk.incubator.vector
:: loading settings :: url = jar:file:/venv/pyspark/jars/ivy-2.5.3.jar!/org/apache/ivy/core/settings/ivysettings.xml
Ivy Default Cache set to: /root/.ivy2.5.2/cache
The jars for the packages stored in: /root/.ivy2.5.2/jars
io.delta#delta-spark_2.13 added as a dependency
:: resolving dependencies :: org.apache.spark#spark-submit-parent-a4;1.0
\tconfs: [default]
\tfound io.delta#delta-spark_2.13;4.4.0 in central
:: resolution report :: resolve 2712ms :: artifacts dl 152ms
\t---------------------------------------------------------------------
\t|      default     |   37  |   0   |   0   |   4   ||   33  |   0   |
:: retrieving :: org.apache.spark#spark-submit-parent-a4
\tconfs: [default]
\t0 artifacts copied, 33 already retrieved (0kB/24ms)
26/12/07 13:37:32 WARN TaskSetManager: Lost task 0.0 in stage 1.0
\tat org.example.Trace(Trace.java:1)
"""
FAKE_SUBMIT = """#!/usr/bin/env bash
cat "$(dirname "$0")/stderr.txt" >&2
echo "job: args $*"
echo "log file $AUDIOHASH_LOG_FILE"
exit "${FAKE_STATUS:-0}"
"""


@pytest.fixture
def root_logging():
    """Leave the root logger and the environment as they were."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    env = {k: os.environ.get(k) for k in ("AUDIOHASH_LOG_FILE", "AUDIOHASH_CONSOLE_LEVEL")}
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:], root.level = handlers, level
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_log_file_names_the_job_and_utc_time_unless_spark_submit_named_it(tmp_path):
    when = calendar.timegm((2026, 12, 7, 13, 45, 0))
    in_dir = log_file_for("encode", {"AUDIOHASH_LOG_DIR": str(tmp_path)}, when)
    assert in_dir == tmp_path / "encode-20261207T134500Z.log"
    assert log_file_for("encode", {}, when) == Path("logs").absolute() / "encode-20261207T134500Z.log"
    named = str(tmp_path / "x.log")  # conf/spark/spark-env.sh's, which Spark's JVM already writes
    assert log_file_for("encode", {"AUDIOHASH_LOG_FILE": named, "AUDIOHASH_LOG_DIR": "/elsewhere"}, when) == Path(named)


@pytest.mark.parametrize("verbose", [False, True])
def test_info_goes_to_the_file_and_warnings_to_the_console(root_logging, tmp_path, monkeypatch, capsys, verbose):
    monkeypatch.delenv("AUDIOHASH_LOG_FILE", raising=False)
    monkeypatch.delenv("AUDIOHASH_CONSOLE_LEVEL", raising=False)
    monkeypatch.setenv("AUDIOHASH_LOG_DIR", str(tmp_path))
    path = setup_logging("train", verbose)
    log = logging.getLogger("audiohash.test")
    log.info("fitted the codebooks")
    log.warning("few labeled clips")
    logging.getLogger("py4j").info("py4j chatter")
    console = capsys.readouterr().err
    assert path.parent == tmp_path and path.name.startswith("train-")
    text = path.read_text()
    assert "INFO audiohash.test: fitted the codebooks" in text and "WARNING audiohash.test: few labeled clips" in text
    assert "py4j chatter" not in text
    assert "few labeled clips" in console and ("fitted the codebooks" in console) == verbose
    # A JVM started later by this process (get_spark under plain python) logs to the same file.
    assert os.environ["AUDIOHASH_LOG_FILE"] == str(path)
    assert os.environ.get("AUDIOHASH_CONSOLE_LEVEL") == ("INFO" if verbose else None)


def test_an_error_names_the_log_file_and_exits_2(root_logging, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("AUDIOHASH_LOG_FILE", raising=False)
    monkeypatch.setenv("AUDIOHASH_LOG_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as ended:
        run_job(lambda cfg, args: None, job_parser("doc"), ["--conf-file", str(tmp_path / "missing.yaml")])
    assert ended.value.code == 2
    err = capsys.readouterr().err
    [log] = tmp_path.glob("*.log")
    assert err.startswith("error: ") and f"(the full log: {log})" in err
    assert "exit 2: " in log.read_text()


def submit(tmp_path: Path, *args: str, status: int = 0) -> tuple[subprocess.CompletedProcess, Path]:
    spark_home = tmp_path / "spark"
    (spark_home / "bin").mkdir(parents=True, exist_ok=True)
    fake = spark_home / "bin" / "spark-submit"
    fake.write_text(FAKE_SUBMIT)
    fake.chmod(0o755)
    (spark_home / "bin" / "stderr.txt").write_text(IVY_REPORT)
    env = {k: v for k, v in os.environ.items() if k != "AUDIOHASH_LOG_FILE"}
    env.update(SPARK_HOME=str(spark_home), SPARK_CONF_DIR=str(REPO / "conf" / "spark"),
               AUDIOHASH_LOG_DIR=str(tmp_path / "logs"), FAKE_STATUS=str(status))
    done = subprocess.run([str(REPO / "scripts" / "submit.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=60)
    return done, tmp_path / "logs"


def test_submit_moves_ivys_report_into_the_log_file(tmp_path):
    done, logs = submit(tmp_path, "--master", "local[2]", "--py-files", "dep.py", "jobs/query.py", "query.top_r=5")
    assert done.returncode == 0
    [log] = logs.glob("query-*.log")  # named for the job (spark-env.sh), not for --py-files' dep.py
    assert done.stdout == f"job: args --master local[2] --py-files dep.py jobs/query.py query.top_r=5\nlog file {log}\n"
    assert done.stderr.splitlines() == ["26/12/07 13:37:32 WARN TaskSetManager: Lost task 0.0 in stage 1.0",
                                        "\tat org.example.Trace(Trace.java:1)"]
    assert log.read_text() == IVY_REPORT.split("26/12/07")[0]


def test_submit_with_verbose_shows_everything_and_names_the_log_on_failure(tmp_path):
    done, _ = submit(tmp_path, "jobs/train.py", "--verbose")
    assert done.stderr == IVY_REPORT
    done, logs = submit(tmp_path, "jobs/encode.py", status=1)
    [log] = logs.glob("encode-*.log")
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == f"submit: spark-submit exited 1; the full log: {log}"
    done, _ = submit(tmp_path, "jobs/encode.py", status=2)  # the job's own error already named it
    assert done.returncode == 2 and "submit:" not in done.stderr

