"""Spark's own log lines carry no note text: an exception raised on an executor with text in its message comes back
in Spark's ``Lost task ...`` and ``Exception in task ...`` lines, past the job's own redaction. The job's JVM log
configuration (jobs/extraction/log4j2.properties) withholds those messages unless job.log_phi is set. Each case runs
as its own process (the log configuration is read when the JVM starts) and reads what it printed."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
from jobkit import write_conf, write_notes

# A Python exception on an executor, raised through the job's own session setup (start_spark, its log4j2 file).
RAISE_IN_PYTHON_UDF = """
import sys
from notelake.conf import load_settings
from notelake.jobs.extraction.session import configure_logging, start_spark

configure_logging()
spark = start_spark(load_settings(sys.argv[1]))
canary = sys.argv[2]

def parse(batches):
    for batch in batches:
        raise ValueError(f"cannot parse note text {canary!r}")
        yield batch

try:
    spark.range(1).mapInArrow(parse, "id long").collect()
except Exception as exc:
    print("failed with", type(exc).__name__)
"""


def run_logged(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    return proc.stdout + proc.stderr


@pytest.fixture()
def conf_of(tmp_path, settings):
    def write(log_phi: bool, **overrides) -> str:
        quick = settings.with_overrides(job={"log_phi": log_phi, "task": "phee"},
                                        spark={"master": "local[1]", "extra": {"spark.ui.enabled": "false"}},
                                        **overrides)
        return write_conf(tmp_path / f"conf-{log_phi}.yaml", quick)
    return write


@pytest.mark.parametrize("log_phi", [False, True], ids=["withheld", "log_phi"])
def test_a_python_exception_on_an_executor_keeps_its_text_out_of_sparks_lines(conf_of, log_phi):
    canary = f"CANARY-{uuid.uuid4().hex}"
    out = run_logged(["-c", RAISE_IN_PYTHON_UDF, conf_of(log_phi), canary])
    assert "failed with PythonException" in out
    lost = [line for line in out.splitlines() if "Lost task" in line]
    assert lost and all("PythonException" in line for line in lost), out[-3000:]
    if log_phi:  # the control: the canary does travel in Spark's lines when nothing withholds it
        assert canary in out
    else:
        assert canary not in out, out[-3000:]


def test_a_job_run_whose_input_fails_on_an_executor_prints_no_input_value(tmp_path, conf_of):
    """The real job (``python -m notelake.jobs.extract``): a watermark column holding text where a timestamp
    belongs fails the cast on the executors (ANSI), and Spark's error quotes the value, in Spark's lines and in
    PySpark's own JSON line for an SQL error; the job exits 5 and prints neither."""
    canary = f"CANARY-{uuid.uuid4().hex}"
    src = write_notes(tmp_path / "notes", [{"note_id": "n1", "text": "Aspirin 81 mg daily.", "edited": canary}])
    conf = conf_of(False, input={"updated_at_column": "edited"})
    proc = subprocess.run([sys.executable, "-m", "notelake.jobs.extract", "--conf", conf, "--input", src,
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 5, out[-3000:]
    assert "Lost task" in out and canary not in out, out[-3000:]


def test_under_spark_submit_the_jvm_switches_to_the_jobs_log_file(tmp_path, conf_of):
    """spark-submit starts the JVM on Spark's default log profile before any of the job's code runs: the session
    switches it to the job's file once the context is up, so an executor's exception text stays out here too."""
    import os
    from pathlib import Path

    canary = f"CANARY-{uuid.uuid4().hex}"
    script = tmp_path / "raise.py"
    script.write_text(RAISE_IN_PYTHON_UDF)
    bin_dir = Path(sys.executable).parent
    proc = subprocess.run([str(bin_dir / "spark-submit"), "--master", "local[1]", str(script), conf_of(False), canary],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    out = proc.stdout + proc.stderr
    assert "failed with PythonException" in out, out[-3000:]
    assert "Lost task" in out and canary not in out, out[-3000:]
