"""The job's Spark session and log levels: the job's own lines (``notelake.*``) at INFO, Spark and Ray at WARN
unless ``--verbose``.

Spark's and Ray's level follows the Python logger ``pyspark`` (:func:`configure_logging` sets it; a process that
never calls it, such as a test, gets WARN). At WARN:

* the session is started with ``spark.log.level=WARN``, which Spark applies as its SparkContext starts (under
  ``spark-submit`` too, whose JVM is already running when Python starts). The three lines naming Spark's, the OS's
  and Java's versions come before it; a ``--conf spark.log.level=...`` of spark-submit wins;
* a session this job starts itself (``python -m notelake.jobs.extract``, ``notelake extract``, tests, benchmarks)
  also launches its JVM with ``spark.driver.extraJavaOptions=-Dlog4j2.configurationFile=<log4j2.properties beside
  this module>``, so not even its start-up prints at INFO. A ``spark.driver.extraJavaOptions`` in the settings'
  ``spark.extra`` replaces that option. Under spark-submit, ``--driver-java-options
  -Dlog4j2.configurationFile=file:<that file>`` does the same for the lines spark-submit prints before Python
  starts (setting the file from Python comes too late: the SparkContext reloads Spark's default profile as it
  starts).

Executors run in the driver's JVM in local mode; on a cluster they write to their own logs (YARN containers, the
standalone workers' folders) under the cluster's configuration. Ray's driver logger is set again once Ray is up
(``ray.init`` sets its own level).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from notelake.conf import Settings

LOG4J2_PROPERTIES = Path(__file__).with_name("log4j2.properties")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: the Python loggers of the libraries whose lines --verbose shows ("pyspark" also sets Spark's JVM level)
LIBRARY_LOGGERS = ("pyspark", "ray")


def configure_logging(verbose: bool = False) -> None:
    """The job's own lines at INFO; Spark and Ray at INFO with ``verbose``, else WARNING; every other library at
    WARNING (py4j, for one, logs benign socket resets at INFO when Ray's processes close inherited driver
    connections)."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    logging.getLogger("notelake").setLevel(logging.INFO)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def library_level() -> int:
    """The level Spark's and Ray's lines are shown at."""
    return logging.getLogger("pyspark").getEffectiveLevel()


def restore_ray_level() -> None:
    """Ray's driver logger back at the library level, after ``ray.init`` set its own."""
    logging.getLogger("ray").setLevel(library_level())


def _spark_level() -> str:
    return "INFO" if library_level() <= logging.INFO else "WARN"


def start_spark(settings: Settings, app_name: str = "notelake-extract"):
    """The Spark session the job runs on (or the running one, under spark-submit), configured from ``settings``
    where spark-submit's ``--master`` and ``--conf`` do not say otherwise."""
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    level = _spark_level()
    # Started by spark-submit (its JVM launched this Python): attach to that JVM first, since it carries --master
    # and --conf as system properties that a SparkConf made before the gateway exists cannot see. Those win over
    # the YAML; started any other way, the YAML's settings apply.
    submitted = "PYSPARK_GATEWAY_PORT" in os.environ
    if submitted:
        SparkContext._ensure_initialized()
    conf = SparkConf()
    builder = SparkSession.builder.appName(app_name)
    if not conf.contains("spark.master"):
        builder = builder.master(settings.spark.master)
    for key, value in {**_spark_defaults(settings, quiet=level == "WARN", launches_jvm=not submitted),
                       **settings.spark.extra}.items():
        if not conf.contains(key):
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(level)
    return spark


def _spark_defaults(settings: Settings, quiet: bool, launches_jvm: bool) -> dict[str, str]:
    defaults = {
        "spark.sql.shuffle.partitions": str(settings.spark.shuffle_partitions),
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(settings.spark.arrow_batch_size),
        "spark.sql.session.timeZone": "UTC",
        "spark.python.worker.reuse": "true",
        # workers fork from a daemon that imported the job's modules (jobs/spark_daemon.py)
        "spark.python.daemon.module": "notelake.jobs.spark_daemon",
        "spark.ui.showConsoleProgress": "false",
        # files Spark itself writes (staged rejections and rounds, local dirs) get the same restrictive umask
        "spark.hadoop.fs.permissions.umask-mode": settings.job.umask[-3:],
    }
    if quiet:
        defaults["spark.log.level"] = "WARN"
        if launches_jvm:  # read when the JVM starts, before Spark logs its first line
            defaults["spark.driver.extraJavaOptions"] = f"-Dlog4j2.configurationFile={LOG4J2_PROPERTIES.as_uri()}"
    return defaults
