"""The job's Spark session and log levels: the job's own lines (``notelake.*``) at INFO, Spark and Ray at WARN
unless ``--verbose``.

Spark's and Ray's level follows the Python logger ``pyspark`` (:func:`configure_logging` sets it; a process that
never calls it, such as a test, gets WARN). At WARN, Spark's JVM logs through ``log4j2.properties`` beside this
module, reached two ways:

* a session this job starts (``python -m notelake.jobs.extract``, ``notelake extract``, tests, benchmarks): the
  JVM is launched with ``spark.driver.extraJavaOptions=-Dlog4j2.configurationFile=<that file>``, so even its
  start-up is quiet. A ``spark.driver.extraJavaOptions`` in the settings' ``spark.extra`` replaces it (Spark's
  start-up lines then show, and WARN applies once the session exists);
* under ``spark-submit`` the JVM already runs when Python starts. If it runs on Spark's default log profile, the
  job points log4j2 at its file through the py4j gateway before the SparkContext is created (the context re-reads
  the profile it finds when it starts, so a level set now would not last); a log4j2 configuration of the
  cluster's own is kept and only its root level is set to WARN once the session exists. The lines spark-submit
  prints before it starts Python follow its own options: ``spark-submit --driver-java-options
  -Dlog4j2.configurationFile=file:<that file> jobs/extract.py ...`` quiets those too.

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
        if level == "WARN":
            _use_job_log_profile(SparkContext._jvm)
    conf = SparkConf()
    builder = SparkSession.builder.appName(app_name)
    if not conf.contains("spark.master"):
        builder = builder.master(settings.spark.master)
    for key, value in {**_spark_defaults(settings, quiet_jvm=not submitted and level == "WARN"),
                       **settings.spark.extra}.items():
        if not conf.contains(key):
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(level)
    return spark


def _spark_defaults(settings: Settings, quiet_jvm: bool) -> dict[str, str]:
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
    if quiet_jvm:  # read when the JVM starts, before Spark logs its first line
        defaults["spark.driver.extraJavaOptions"] = f"-Dlog4j2.configurationFile={LOG4J2_PROPERTIES.as_uri()}"
    return defaults


def _use_job_log_profile(jvm) -> None:
    """Point a running JVM's log4j2 at the job's file when it is on Spark's default profile (which Spark loads from
    its own jar when no configuration was given); a configuration of the cluster's own is left alone."""
    context = jvm.org.apache.logging.log4j.LogManager.getContext(False)
    location = context.getConfigLocation()
    if location is None or "org/apache/spark/log4j2" in location.toString():
        context.setConfigLocation(jvm.java.net.URI(LOG4J2_PROPERTIES.as_uri()))
