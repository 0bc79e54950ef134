"""Per-partition task statistics (rows, seconds) gathered from the executors into the driver.

Executors' stdout and logs are scattered over the cluster, so each task reports its own numbers
and the driver puts them into the job's log line and its MLflow run. Two ways in, one record:

- stages that collect their output (the query scan): the task returns its rows and seconds in
  extra output columns (``schemas.SCAN_OUTPUT_DDL``); only successful task attempts reach the
  driver, so a task retried after a lost executor is counted once.
- stages that write their output (extract, encode): ``PartitionStatsAccumulator``; executors add
  ``{partition: (rows, seconds)}`` and the driver merges by partition, so a recomputed
  partition replaces its earlier numbers instead of adding to them.

    stats = partition_stats("scan", rows=[...], seconds=[...])   # or accumulator.stats()
    metrics.update(report_partition_stats(stats, "scan"))  # log line + MLflow artifact; the job
                                                           # logs and prints the summary metrics
"""
from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass
from typing import Sequence

from pyspark import SparkContext, TaskContext
from pyspark.accumulators import AccumulatorParam

from audiohash.errors import AudiohashError

log = logging.getLogger("audiohash.stats")


@dataclass(frozen=True)
class PartitionStat:
    """One task's work: ``rows`` read in partition ``partition`` of pass ``job`` in ``seconds``."""

    job: str  # which pass of the stage, e.g. "scan batch 2/7"
    partition: int
    rows: int
    seconds: float


def partition_stats(job: str, rows: Sequence[int], seconds: Sequence[float]) -> list[PartitionStat]:
    """Records from per-partition columns collected in partition order (row i = partition i)."""
    if len(rows) != len(seconds):
        raise AudiohashError(f"partition stats of {job}: {len(rows)} row counts but {len(seconds)} timings")
    return [PartitionStat(job, i, int(r), float(s)) for i, (r, s) in enumerate(zip(rows, seconds))]


def summarize(stats: Sequence[PartitionStat], prefix: str) -> dict[str, float]:
    """Totals and spread over all tasks, as MLflow metric names ``<prefix>_...``.

    task_s_max / task_s_median > 2 means a skewed stage: one slow task holds the stage up.
    """
    if not stats:
        return {f"{prefix}_tasks": 0, f"{prefix}_rows": 0}
    seconds = [s.seconds for s in stats]
    total_s = sum(seconds)
    rows = sum(s.rows for s in stats)
    return {
        f"{prefix}_tasks": len(stats),
        f"{prefix}_rows": rows,
        f"{prefix}_task_s_sum": total_s,
        f"{prefix}_task_s_median": statistics.median(seconds),
        f"{prefix}_task_s_max": max(seconds),
        f"{prefix}_rows_per_task_s": rows / total_s if total_s > 0 else 0.0,
    }


def report_partition_stats(stats: Sequence[PartitionStat], prefix: str) -> dict[str, float]:
    """Log the summary line and, inside an active MLflow run, every record as the artifact
    ``<prefix>_partitions.json``. Returns the summary, for the job's metrics."""
    summary = summarize(stats, prefix)
    shown = ", ".join(f"{k[len(prefix) + 1:]}={v:.3f}" if isinstance(v, float) else f"{k[len(prefix) + 1:]}={v}"
                      for k, v in summary.items())
    log.info("%s: %s", prefix, shown)
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_dict({"partitions": [asdict(s) for s in stats]}, f"{prefix}_partitions.json")
    return summary


class _MergeByPartition(AccumulatorParam):
    """Accumulator values are {partition: (rows, seconds)}; merging replaces by key."""

    def zero(self, value):
        return {}

    def addInPlace(self, value1, value2):
        value1.update(value2)
        return value1


class PartitionStatsAccumulator:
    """Per-partition stats of a stage that writes its output, for one pass (one Spark action).

    Driver: ``acc = PartitionStatsAccumulator(spark.sparkContext, "encode")``; the closure
    captures ``acc`` and each task calls ``acc.add(rows, seconds)`` once; after the action,
    ``acc.stats()``. Spark merges the updates of successful task attempts only.
    """

    def __init__(self, sc: SparkContext, job: str):
        self.job = job
        self._accumulator = sc.accumulator({}, _MergeByPartition())

    def add(self, rows: int, seconds: float) -> None:
        """Executor side: this task's rows and seconds (keyed by its partition)."""
        context = TaskContext.get()
        partition = context.partitionId() if context is not None else -1
        self._accumulator.add({partition: (int(rows), float(seconds))})

    def stats(self) -> list[PartitionStat]:
        """Driver side, after the action: one record per partition, in partition order."""
        return [PartitionStat(self.job, p, rows, seconds)
                for p, (rows, seconds) in sorted(self._accumulator.value.items())]
