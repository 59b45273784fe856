"""Cluster mode on real processes on 127.0.0.1 (``make cluster-test``; also part of ``make test``):

* an S3-compatible server (``moto_server``) holding the input note table and the output warehouse as ``s3://``;
* a Spark standalone master and worker started with pyspark's ``bin/spark-class``; the job is submitted with
  ``spark-submit --master spark://127.0.0.1:<port>``, so its executors run in their own JVM and work directory;
* a Ray cluster started with ``ray start --head``; the job attaches to it (``ray.address``) instead of starting
  its own, and the executors reach the engine actor through the cluster's GCS address.

The assertions are the local job test's: rows land with exact offsets, the ledger lists every note, a rerun
selects nothing and changes nothing, no duplicates, and the cohort SQL reads the output from ``s3://`` with DuckDB.
Every process the test started is gone at the end.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pytest
import yaml
from deltalake import DeltaTable, write_deltalake
from jobkit import offsets_exact, sample_notes
from s3server import BUCKET, s3_server

from notelake.jobs.cohort import query_text, run_duckdb
from notelake.jobs.warehouse import read_delta_arrow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.cluster


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


class Processes:
    """Processes started by the test, each in its own session; stopped (the whole tree) at the end."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.started: list[subprocess.Popen] = []
        self.seen: set[int] = set()

    def start(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        self.started.append(proc)
        return proc

    def remember_children(self) -> None:
        """Record every descendant (executors, Ray workers) so the end check covers them too."""
        for proc in self.started:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.seen |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)} | {proc.pid}

    def stop(self) -> list[int]:
        """SIGTERM each process group, then SIGKILL what is left; returns the pids still alive after that."""
        self.remember_children()
        for proc in reversed(self.started):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for pid in self.seen:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(1)
        return [pid for pid in self.seen if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


@pytest.fixture
def cluster(tmp_path, base_model_path):
    """(storage options, spark master URL, Ray GCS address, env for spark-submit, Processes)."""
    import pyspark

    spark_home = Path(pyspark.__file__).parent
    env = {**os.environ, "SPARK_HOME": str(spark_home), "PYSPARK_PYTHON": sys.executable,
           "PYSPARK_DRIVER_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
           # Ray's token authentication, as on a production cluster: one token in every node's environment (the
           # head, the Spark worker whose executors attach, the driver)
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("PYTHONPATH", None)
    procs = Processes(tmp_path)
    with s3_server() as opts:
        try:
            master_port, ray_port = _free_port(), _free_port()
            spark_class = str(spark_home / "bin" / "spark-class")
            master = procs.start("spark-master", [spark_class, "org.apache.spark.deploy.master.Master", "--host",
                                                  "127.0.0.1", "--port", str(master_port), "--webui-port",
                                                  str(_free_port())], env)
            _wait_port(master_port, master, "Spark master")
            url = f"spark://127.0.0.1:{master_port}"
            (tmp_path / "spark-work").mkdir()
            procs.start("spark-worker", [spark_class, "org.apache.spark.deploy.worker.Worker", url, "--host",
                                         "127.0.0.1", "--cores", "2", "--memory", "4g", "--webui-port",
                                         str(_free_port()), "--work-dir", str(tmp_path / "spark-work")], env)
            head = procs.start("ray-head", [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address",
                                            "127.0.0.1", "--port", str(ray_port), "--num-cpus", "2",
                                            "--include-dashboard", "false", "--disable-usage-stats",
                                            "--object-store-memory", str(300 * 2**20)], env)
            _wait_port(ray_port, head, "Ray head")
            yield opts, url, f"127.0.0.1:{ray_port}", env, procs
        finally:
            alive = procs.stop()
    assert not alive, f"processes still running after the cluster test: {alive}"


def _conf(tmp_path: Path, settings, opts: dict, ray_address: str) -> str:
    data = settings.model_dump(mode="json")
    data["engine"].update(max_tokens=48)
    data["ray"] = {**data["ray"], "address": ray_address, "num_cpus": None, "num_actors": 1}
    data["job"].update(task="phee", max_error_rate=1.0, round_notes=2)
    data["storage"] = {"options": opts, "staging": None}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _submit(url: str, env: dict, conf: str, source: str, output: str, logs: Path, name: str) -> int:
    cmd = [str(BIN / "spark-submit"), "--master", url, "--conf", "spark.executor.memory=2g",
           "--conf", "spark.executor.cores=2", "--conf", f"spark.pyspark.python={sys.executable}",
           str(REPO / "jobs" / "extract.py"), "--conf", conf, "--input", source, "--output", output]
    with open(logs / f"{name}.log", "w") as log:
        return subprocess.run(cmd, env=env, cwd=logs, stdout=log, stderr=subprocess.STDOUT, timeout=900).returncode


def test_job_on_spark_standalone_ray_cluster_and_s3(tmp_path, cluster, settings):
    opts, url, ray_address, env, procs = cluster
    opts = {**opts, "AWS_SECRET_ACCESS_KEY": "s3cr3t-notelake-7f3a"}  # moto takes any key; must never be logged
    notes = sample_notes(4)
    source, output = f"s3://{BUCKET}/notes", f"s3://{BUCKET}/warehouse"
    write_deltalake(source, pa.Table.from_pylist(notes), storage_options=opts)
    conf = _conf(tmp_path, settings, opts, ray_address)

    rc = _submit(url, env, conf, source, output, tmp_path, "job-1")
    procs.remember_children()
    assert rc == 0, (tmp_path / "job-1.log").read_text()[-3000:]
    log = (tmp_path / "job-1.log").read_text()
    # the job logs Spark at WARN: that it ran on the standalone master shows in the worker's executor folders
    executors = [p for p in (tmp_path / "spark-work").rglob("stderr")]
    assert executors, "the job did not run on the standalone master: no executor in the worker's work directory"
    assert "s3cr3t-notelake-7f3a" not in log and env["RAY_AUTH_TOKEN"] not in log, "a secret reached the log"
    assert not any(n["text"][:40] in log for n in notes), "note text reached the log"

    def tbl(name: str) -> pa.Table:
        return read_delta_arrow(f"{output}/{name}", opts=opts)

    texts = {n["note_id"]: n["text"] for n in notes}
    concepts, runs = tbl("concepts"), tbl("runs").to_pylist()
    assert concepts.num_rows > 0 and tbl("relations") is not None
    for row in concepts.to_pylist():
        assert row["task"] == "phee"
        assert offsets_exact(row, texts[row["note_id"]]) if row["grounded"] else row["start"] is None
    ids = concepts["concept_id"].to_pylist()
    assert len(ids) == len(set(ids))
    assert sorted(tbl("ledger")["note_id"].to_pylist()) == sorted(texts)
    (first,) = runs
    assert (first["status"], first["selected"], first["succeeded"] + first["failed"]) == ("succeeded", 4, 4)
    assert first["rounds_json"].count('"round"') >= 1
    fs_files = DeltaTable(f"{output}/concepts", storage_options=opts).file_uris()
    assert fs_files and all(f.startswith(f"{output}/concepts/task=phee/note_bucket=") for f in fs_files)

    # The rerun selects nothing and commits nothing to the row tables.
    versions = {t: DeltaTable(f"{output}/{t}", storage_options=opts).version()
                for t in ("concepts", "relations", "ledger")}
    assert _submit(url, env, conf, source, output, tmp_path, "job-2") == 0
    rerun = max(tbl("runs").to_pylist(), key=lambda r: r["started_at"])
    assert (rerun["selected"], rerun["skipped"], rerun["tokens_out"]) == (0, 4, 0)
    assert {t: DeltaTable(f"{output}/{t}", storage_options=opts).version() for t in versions} == versions
    # Staging lives on the output store and is gone after each run.
    from notelake.jobs import storage

    assert storage.list_dirs(f"{output}/_staging", opts) == []

    counts = run_duckdb(output, query_text("concept_counts"), opts).to_pylist()
    assert sum(r["concepts"] for r in counts) == concepts.num_rows
