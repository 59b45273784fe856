"""A real S3-compatible server for tests: ``moto_server`` in a subprocess on 127.0.0.1.

A subprocess (not moto's in-process mocks) keeps the tests honest: delta-rs (Rust ``object_store``), pyarrow's
``S3FileSystem`` (the AWS C++ SDK) and Spark's Python workers all talk HTTP to it exactly as they would to S3.

:func:`s3_server` starts the server, creates one bucket and yields the storage options that configure both
delta-rs (``storage_options=``) and :func:`notelake.jobs.storage.filesystem`; the server is stopped on exit.
Needs the dev extra ``moto[server]``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Iterator

BUCKET = "notelake-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is serving
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"moto_server did not answer on {url} within {timeout:.0f} s")


def _moto_command(port: int) -> list[str]:
    # the console script next to this interpreter (the venv's), else the module behind it
    script = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    base = [script] if script else [sys.executable, "-m", "moto.server"]
    return [*base, "-H", "127.0.0.1", "-p", str(port)]


@contextlib.contextmanager
def s3_server(bucket: str = BUCKET, timeout: float = 30.0) -> Iterator[dict[str, str]]:
    """Run moto_server on a free port with ``bucket`` created; yield the delta-rs/pyarrow storage options."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(_moto_command(port), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_ready(endpoint, proc, timeout)
        # moto does not check signatures: an unsigned CreateBucket is enough, no boto3 needed
        with urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"), timeout=5):
            pass
        yield {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            # No AWS_S3_ALLOW_UNSAFE_RENAME / locking provider: delta-rs 1.x commits with put-if-absent
            # (If-None-Match), which moto enforces as S3 does.
            "AWS_REGION": "us-east-1",
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
