"""The job's Spark session and log levels: the job's own lines (``notelake.*``) at INFO, Spark and Ray at WARN
unless ``--verbose``.

Spark's and Ray's level follows the Python logger ``pyspark`` (:func:`configure_logging` sets it; a process that
never calls it, such as a test, gets WARN). At WARN:

* the session is started with ``spark.log.level=WARN``, which Spark applies as its SparkContext starts (under
  ``spark-submit`` too, whose JVM is already running when Python starts). The three lines naming Spark's, the OS's
  and Java's versions come before it; a ``--conf spark.log.level=...`` of spark-submit wins;
* a session this job starts itself (``python -m notelake.jobs.extract``, ``notelake extract``, tests, benchmarks)
  launches its JVM, at any level, with ``spark.driver.extraJavaOptions=-Dlog4j2.configurationFile=<log4j2.properties
  beside this module> -Dnotelake.spark.level=<level>``, so not even its start-up prints at INFO. A
  ``spark.driver.extraJavaOptions`` in the settings' ``spark.extra`` replaces that option. Under spark-submit,
  ``--driver-java-options -Dlog4j2.configurationFile=file:<that file>`` does the same for the lines spark-submit
  prints before Python starts (setting the file from Python comes too late: the SparkContext reloads Spark's
  default profile as it starts).

That file withholds what follows an exception's class name in Spark's own lines: an executor's exception (a Python
UDF's traceback, a cast error quoting a value) comes back in ``Lost task ...`` and ``Exception in task ...`` lines,
past the job's own redaction. ``job.log_phi`` launches the JVM with ``log4j2-phi.properties`` (messages whole).
On the driver, PySpark prints an SQL error raised with a query context (a cast error quoting a value) as a JSON
line of its own (:data:`QUERY_CONTEXT_LOGGERS`): those loggers are off unless ``job.log_phi``.

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
LOG4J2_PHI_PROPERTIES = Path(__file__).with_name("log4j2-phi.properties")  # job.log_phi: executors' messages whole
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: PySpark's loggers that print an SQL error raised on the driver, message and all, to stderr (their own handler)
QUERY_CONTEXT_LOGGERS = ("DataFrameQueryContextLogger", "SQLQueryContextLogger")
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
    if submitted:
        _use_job_log_config(spark, settings.job.log_phi, quiet=level == "WARN")
    spark.sparkContext.setLogLevel(level)
    _query_context_logs(settings.job.log_phi)
    return spark


def _use_job_log_config(spark, log_phi: bool, quiet: bool) -> None:
    """Under spark-submit the JVM started on Spark's default log profile, whose lines carry executors' exception
    messages in full: switch it to the job's file (``log4j2.properties``, or the PHI one with ``job.log_phi``) once
    the context is up (its start re-reads the default profile, so not before). On a cluster the executors' JVMs
    keep their own configuration (docs/operations.md)."""
    jvm = spark.sparkContext._jvm
    jvm.java.lang.System.setProperty("notelake.spark.level", "warn" if quiet else "info")
    path = LOG4J2_PHI_PROPERTIES if log_phi else LOG4J2_PROPERTIES
    jvm.org.apache.logging.log4j.core.config.Configurator.reconfigure(jvm.java.net.URI(path.as_uri()))


def _query_context_logs(log_phi: bool) -> None:
    """PySpark's query-context error lines on only with ``job.log_phi``: the job logs each failure itself."""
    from pyspark.logger import PySparkLogger

    for name in QUERY_CONTEXT_LOGGERS:
        PySparkLogger.getLogger(name).disabled = not log_phi


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
        log4j2 = LOG4J2_PHI_PROPERTIES if settings.job.log_phi else LOG4J2_PROPERTIES
        defaults["spark.driver.extraJavaOptions"] = (f"-Dlog4j2.configurationFile={log4j2.as_uri()} "
                                                     f"-Dnotelake.spark.level={'warn' if quiet else 'info'}")
    return defaults
