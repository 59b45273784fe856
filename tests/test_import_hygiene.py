"""udfs/ and conf/ run inside Spark executors and training alike: importing them must not pull in heavy ML
frameworks (torch, vllm, ray, transformers)."""

import json
import subprocess
import sys

FORBIDDEN = ("torch", "vllm", "ray", "transformers")

_PROBE = """
import importlib, json, pkgutil, sys
imported = []
for pkg_name in ("notelake.udfs", "notelake.conf"):
    pkg = importlib.import_module(pkg_name)
    imported.append(pkg_name)
    for info in pkgutil.walk_packages(pkg.__path__, pkg_name + "."):
        importlib.import_module(info.name)
        imported.append(info.name)
forbidden = %r
heavy = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
print(json.dumps({"imported": imported, "heavy": heavy}))
"""


def test_udfs_and_conf_import_no_ml_frameworks():
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE % (FORBIDDEN,)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for module in ("notelake.udfs.grounding", "notelake.udfs.parsing", "notelake.udfs.chunking",
                   "notelake.udfs.assemble", "notelake.udfs.schemas", "notelake.udfs.hashing",
                   "notelake.udfs.answer", "notelake.udfs.prompts", "notelake.conf.task"):
        assert module in report["imported"]
    assert report["heavy"] == [], f"heavy modules imported: {report['heavy']}"


def test_sql_command_needs_only_the_base_install():
    """`notelake sql` (DuckDB over the output tables) imports neither Spark nor an engine framework."""
    probe = ("import json, sys; import notelake.jobs.cohort, notelake.jobs.warehouse, duckdb, polars; "
             "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in %r)))"
             % (FORBIDDEN + ("pyspark",),))
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
