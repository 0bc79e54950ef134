"""The one SparkSession factory: Delta enabled, Arrow on, quiet console, settings from conf/."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from delta import configure_spark_with_delta_pip
from pyspark.sql import SparkSession

from audiohash.config import SparkSettings

log = logging.getLogger("audiohash.spark")

DELTA_SETTINGS = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}


def get_spark(settings: SparkSettings) -> SparkSession:
    """Build (or return the running) SparkSession.

    ``settings.master`` empty means: the master spark-submit was given, or local[*] under plain
    python. Under spark-submit the JVM already runs, so Delta's jars come from
    conf/spark/spark-defaults.conf (SPARK_CONF_DIR) or --packages; under plain python they are
    fetched here by ``configure_spark_with_delta_pip``.
    """
    # Local Python workers must run this interpreter (the venv), not python3 from PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(settings.app_name)
    if settings.master:
        builder = builder.master(settings.master)
    conf = {
        **DELTA_SETTINGS,
        "spark.driver.memory": settings.driver_memory,
        "spark.sql.shuffle.partitions": str(settings.shuffle_partitions),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(settings.arrow_batch_rows),
        "spark.ui.showConsoleProgress": str(settings.show_progress).lower(),
        # Delta's default 50 snapshot partitions cost seconds per read on small local tables.
        "spark.databricks.delta.snapshotPartitions": "2",
        **settings.extra,
    }
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = configure_spark_with_delta_pip(builder).getOrCreate()
    conf_dir = os.environ.get("SPARK_CONF_DIR")
    if not (conf_dir and (Path(conf_dir) / "log4j2.properties").is_file()):
        # Spark's built-in profile prints INFO on the console; conf/spark/log4j2.properties
        # (SPARK_CONF_DIR) keeps INFO in the run's log file and only WARN+ on the console.
        spark.sparkContext.setLogLevel("WARN")
    log.info("spark %s, master %s", spark.version, spark.sparkContext.master)
    return spark
