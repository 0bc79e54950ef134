"""A real Spark standalone cluster on loopback, for the tests that must prove the jobs run on
separate processes (``local[*]`` shares one JVM and one Python between driver and executors and
hides shipping mistakes).

One Master and N Worker JVMs are started from the pip-installed pyspark (``bin/spark-class``),
each with its own free ports and temp work dir; the tests wait until the workers registered (the
master's JSON at http://127.0.0.1:<webui>/json/), run the jobs through real ``spark-submit``
subprocesses and stop the daemons by their own process ids afterwards.

Nothing gets ``lib/`` through PYTHONPATH (scripts/bootstrap.sh exports it): ``cluster_env``
strips it from the daemons and from spark-submit, so the project code must be shipped (``--py-files
audiohash.zip``, built by scripts/package.sh) for any executor to import it.

    with StandaloneCluster(tmp_path) as cluster:      # or the session fixture ``standalone_cluster``
        cluster.start(n_workers=2)
        job = cluster.submit("jobs/encode.py", ["--conf-file", ...], py_files=[zip_path], log=tmp_path / "encode.log")
        assert job.wait() == 0
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pyspark
import pytest

SPARK_HOME = Path(pyspark.__file__).resolve().parent
REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300  # JVM start-up on a loaded 2-core machine takes tens of seconds


def free_port() -> int:
    """A TCP port free on loopback right now (the daemons bind it moments later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(**extra: str) -> dict[str, str]:
    """This process's environment minus PYTHONPATH and this process's own run log (a test that ran a
    job's main() in this process set AUDIOHASH_LOG_FILE: each submission names its own), pinned to
    loopback and the venv's Python."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "AUDIOHASH_LOG_FILE", "AUDIOHASH_CONSOLE_LEVEL")}
    env.update(SPARK_HOME=str(SPARK_HOME), SPARK_LOCAL_IP="127.0.0.1",
               PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    env.update(extra)
    return env


def get_json(url: str, timeout: float = 5.0):
    """GET a JSON document from a loopback web UI; None when it does not answer (yet)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.load(response)
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError, OSError):
        return None


def children_by_parent() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4; the command in (...) may hold spaces
        out.setdefault(ppid, []).append(int(entry.name))
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first-found order), from /proc."""
    tree, out, todo = children_by_parent(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Daemon:
    """A Master or Worker JVM we started (spark-class execs java, so the pid is the JVM's)."""

    name: str
    process: subprocess.Popen
    webui_port: int
    log: Path
    worker_id: str = ""  # the master's id for a worker, once registered

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Submission:
    """A running spark-submit: its process, log file and the driver UI port asked for."""

    process: subprocess.Popen
    log: Path
    ui_port: int
    started: float = field(default_factory=time.monotonic)
    seconds: float | None = None

    def wait(self, timeout: float | None = None) -> int:
        rc = self.process.wait(timeout)
        self.seconds = self.seconds or time.monotonic() - self.started
        return rc

    def stop(self) -> None:
        """Kill the spark-submit and its driver Python by their pids, if still running."""
        if self.process.poll() is None:
            for pid in [*reversed(descendants(self.process.pid)), self.process.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.process.wait(30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class StandaloneCluster:
    """Master + workers on 127.0.0.1; see the module docstring. Use as a context manager."""

    def __init__(self, root: Path, cores_per_worker: int = 1, worker_memory: str = "2g"):
        self.root = Path(root)
        self.cores_per_worker = cores_per_worker
        self.worker_memory = worker_memory
        self.master: Daemon | None = None
        self.workers: list[Daemon] = []
        self.master_port = 0
        self._spawned = 0  # workers started so far: names their logs and work dirs
        # The daemons read no project config: an empty conf dir, not conf/spark.
        (self.root / "conf").mkdir(parents=True, exist_ok=True)
        self.daemon_env = cluster_env(SPARK_CONF_DIR=str(self.root / "conf"), SPARK_DAEMON_MEMORY="512m",
                                      SPARK_LOCAL_DIRS=str(self.root / "local"),
                                      # a taken port fails fast (we pick another) instead of moving on
                                      SPARK_DAEMON_JAVA_OPTS="-Dspark.port.maxRetries=0",
                                      # no REST submission server: it wants the fixed port 6066,
                                      # which another cluster on this machine may hold
                                      SPARK_MASTER_OPTS="-Dspark.master.rest.enabled=false")

    # ---- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "StandaloneCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def master_url(self) -> str:
        return f"spark://127.0.0.1:{self.master_port}"

    @property
    def master_webui(self) -> str:
        return f"http://127.0.0.1:{self.master.webui_port}"

    def _spawn(self, name: str, args: list[str]) -> Daemon:
        log = self.root / f"{name}.log"
        webui_port = int(args[args.index("--webui-port") + 1])
        with open(log, "ab") as out:  # the child keeps its own descriptor
            process = subprocess.Popen([str(SPARK_HOME / "bin" / "spark-class"), *args], env=self.daemon_env,
                                       cwd=self.root, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return Daemon(name, process, webui_port, log)

    def start(self, n_workers: int = 2, timeout: float = START_TIMEOUT_S) -> "StandaloneCluster":
        """Start the master, then ``n_workers`` workers, and wait until all registered."""
        for attempt in range(3):  # a free port can be taken between picking and binding it
            self.master_port = free_port()
            master = self._spawn(f"master-{attempt}", [
                "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(self.master_port),
                "--webui-port", str(free_port())])
            self.master = master
            if self._wait(self._master_alive, master, timeout):
                break
            self._terminate([master])
        else:
            raise RuntimeError(f"Spark master did not start; its log:\n{self.master.log_tail()}")
        for _ in range(n_workers):
            self.add_worker(timeout=timeout, wait=False)
        self.wait_for_workers(n_workers, timeout)
        return self

    def _master_alive(self) -> bool:
        """Our master (its URL, not another one that got the web UI port first) is up."""
        state = get_json(f"{self.master_webui}/json/") or {}
        return state.get("url") == self.master_url and state.get("status") == "ALIVE"

    def add_worker(self, timeout: float = START_TIMEOUT_S, wait: bool = True) -> Daemon:
        """Start one more worker (its own work dir and web UI port); wait until it registered."""
        index, self._spawned = self._spawned, self._spawned + 1
        work_dir = self.root / f"worker-{index}"
        work_dir.mkdir()
        worker = self._spawn(f"worker-{index}", [
            "org.apache.spark.deploy.worker.Worker", self.master_url, "--host", "127.0.0.1",
            "--cores", str(self.cores_per_worker), "--memory", self.worker_memory,
            "--webui-port", str(free_port()), "--work-dir", str(work_dir)])
        self.workers.append(worker)
        if wait:
            self.wait_for_workers(len(self.live_workers()), timeout)
        return worker

    def _wait(self, ready, daemon: Daemon, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return True
            if daemon.process.poll() is not None:
                return False
            time.sleep(0.5)
        return False

    def master_state(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while (state := get_json(f"{self.master_webui}/json/")) is None:
            if time.monotonic() > deadline or self.master.process.poll() is not None:
                raise RuntimeError(f"the Spark master's JSON at {self.master_webui}/json/ does not answer; "
                                   f"its log:\n{self.master.log_tail()}")
            time.sleep(1)
        return state

    def alive_worker_ids(self) -> set[str]:
        return {w["id"] for w in self.master_state()["workers"] if w["state"] == "ALIVE"}

    def live_workers(self) -> list[Daemon]:
        return [w for w in self.workers if w.process.poll() is None]

    def wait_for_workers(self, n: int, timeout: float = START_TIMEOUT_S) -> None:
        """Until ``n`` of our live workers are registered ALIVE with the master (ids noted)."""
        deadline = time.monotonic() + timeout
        while True:
            by_port = {int(w["webuiaddress"].rsplit(":", 1)[1]): w["id"]
                       for w in self.master_state()["workers"] if w["state"] == "ALIVE"}
            for worker in self.live_workers():
                worker.worker_id = by_port.get(worker.webui_port, worker.worker_id)
            registered = [w for w in self.live_workers() if w.webui_port in by_port]
            if len(registered) >= n:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {w.name} (pid {w.pid}, exit {w.process.poll()}):\n{w.log_tail()}"
                                 for w in self.workers)
                raise RuntimeError(f"{len(registered)} of {n} workers registered with {self.master_url} "
                                   f"after {timeout:.0f} s; worker logs:\n{logs}")
            for worker in self.workers:  # died before registering (its port was taken): replace it
                if worker.process.poll() is not None and not worker.worker_id:
                    self.workers.remove(worker)
                    self.add_worker(wait=False)
                    break
            time.sleep(0.5)

    def ensure_workers(self, n: int, timeout: float = START_TIMEOUT_S) -> None:
        """Start workers until ``n`` are alive (after a test killed one)."""
        while len(self.live_workers()) < n:
            self.add_worker(wait=False)
        self.wait_for_workers(n, timeout)

    # ---- applications ------------------------------------------------------------------------
    def submit(self, script: str | Path, args: list[str], py_files: list[Path], log: Path,
               conf: dict[str, str] | None = None, ui_port: int | None = None,
               env: dict[str, str] | None = None) -> Submission:
        """Start ``spark-submit --master <this cluster> --py-files ...`` as a subprocess, through
        scripts/submit.sh (spark-submit with a quiet console, as make demo runs the jobs).

        The driver runs in the subprocess (client mode), with conf/spark as SPARK_CONF_DIR (Delta's
        jars, as for every job) and no PYTHONPATH; the executors run the venv's Python. ``env``:
        more environment variables (AUDIOHASH_LOG_DIR, for one).
        """
        ui_port = ui_port or free_port()
        settings = {"spark.pyspark.python": sys.executable, "spark.ui.port": str(ui_port), **(conf or {})}
        cmd = [str(REPO / "scripts" / "submit.sh"), "--master", self.master_url,
               "--py-files", ",".join(str(p) for p in py_files)]
        for key, value in settings.items():
            cmd += ["--conf", f"{key}={value}"]
        cmd += [str(script), *args]
        with open(log, "wb") as out:
            process = subprocess.Popen(cmd, env=cluster_env(SPARK_CONF_DIR=str(REPO / "conf" / "spark"), **(env or {})),
                                       cwd=log.parent, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return Submission(process, log, ui_port)

    def kill_worker(self, worker: Daemon) -> list[int]:
        """Lose a machine: SIGKILL the worker JVM and everything under it (its executor JVMs and
        their Python workers), by their process ids. Returns the pids killed."""
        pids = [worker.pid, *descendants(worker.pid)]
        for pid in reversed(pids):  # deepest first, so no executor outlives its worker unnoticed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        worker.process.wait(30)
        return pids

    # ---- teardown ----------------------------------------------------------------------------
    def _terminate(self, daemons: list[Daemon], grace_s: float = 30) -> None:
        tree = {pid: cmdline(pid) for d in daemons if d.process.poll() is None for pid in descendants(d.pid)}
        for daemon in daemons:
            if daemon.process.poll() is None:
                daemon.process.send_signal(signal.SIGTERM)  # a worker stops its executors on SIGTERM
        for daemon in daemons:
            try:
                daemon.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                daemon.process.kill()
                daemon.process.wait(10)
        for pid, command in tree.items():  # leftovers of ours only: same pid and same command line
            if alive(pid) and cmdline(pid) == command:
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        """Stop the workers, then the master, by their own pids (and any executor they left)."""
        self._terminate(self.workers)
        if self.master is not None:
            self._terminate([self.master])


@pytest.fixture(scope="session")
def standalone_cluster(tmp_path_factory):
    """A master and two 1-core workers on loopback for the whole test run; started only when a
    test asks for it (import this fixture into the test module)."""
    with StandaloneCluster(tmp_path_factory.mktemp("spark-cluster")) as cluster:
        cluster.start(n_workers=2)
        yield cluster


def read_event_log(folder: Path) -> list[dict]:
    """The events of the one application that logged into ``folder`` (written with
    spark.eventLog.compress=false and spark.eventLog.rolling.enabled=false)."""
    files = [p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")]
    if len(files) != 1:
        raise AssertionError(f"expected one event log in {folder}, found {[p.name for p in files]}")
    return [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]


EVENT_LOG_CONF = {"spark.eventLog.enabled": "true", "spark.eventLog.compress": "false",
                  "spark.eventLog.rolling.enabled": "false"}


# ---- an application's event log, read after it ran -------------------------------------------------
def stages_with_operator(events: list[dict], operator: str) -> set[int]:
    """Stage ids whose RDDs come from the SQL operator ``operator`` (RDD scope names)."""
    return {e["Stage Info"]["Stage ID"] for e in events if e["Event"] == "SparkListenerStageSubmitted"
            and any(operator in (r.get("Scope") or "") for r in e["Stage Info"]["RDD Info"])}


def lost_tasks(events: list[dict], stage_ids: set[int]) -> list[dict]:
    """TaskEnd events of ``stage_ids`` that failed because their executor was lost."""
    return [e for e in events if e["Event"] == "SparkListenerTaskEnd" and e["Stage ID"] in stage_ids
            and e["Task End Reason"]["Reason"] == "ExecutorLostFailure"]
