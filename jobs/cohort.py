"""Cohort SQL over the output tables, with DuckDB or Spark SQL (same queries, same rows).

    notelake sql --output <warehouse dir> --query drug_adverse_effects [--engine duckdb|spark] [--latest]
    notelake sql --output <warehouse dir> --query "select label, count(*) from relations group by label"

What a query sees: the job commits concepts, relations, errors and the ledger as separate Delta commits, round
after round, so while a run is in progress the tables' latest snapshots mix rounds. A query therefore reads
``concepts``, ``relations`` and ``errors`` as of the versions that the latest *finished* run recorded when it ended
(``runs.table_versions_json``; finished: it succeeded, or it committed every round and failed on the error rate):
every note appears with all of its rows from one extraction, as the tables stood at the end of one run, and
nothing of a run in progress. The rounds of a run that died become visible when the next run finishes; before
any run has finished the tables read as empty. ``runs`` is read at its latest version (a run in progress shows as
``running``). ``--latest`` (``latest=True``) reads every table's latest snapshot instead: fresher, without that
guarantee. A recorded version is read by Delta time travel, so it needs that version's log and files: a VACUUM
whose retention is shorter than the time since the last finished run makes the query fail (then use --latest).

Both engines read exactly the chosen snapshot's Parquet files, listed by ``deltalake``: DuckDB scans the
snapshot's Arrow dataset, Spark reads its files with ``spark.read.parquet`` (the path for delta-rs tables where
the delta-spark jars are absent). Never glob a table directory's Parquet files: that would resurrect deleted
rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow as pa

SQL_DIR = Path(__file__).resolve().parent / "sql"
QUERY_TABLES = ("concepts", "relations", "runs", "errors",
                # OMOP: the linker's links and the CDM tables `notelake omop` publishes (jobs/omop/)
                "concept_links", "note_nlp", "note_nlp_relation", "drug_exposure", "condition_occurrence",
                "note_crosswalk")
#: The OMOP vocabulary's tables by their CDM names, under omop.vocabulary (default <output>/vocabulary).
VOCABULARY_TABLES = ("concept", "concept_synonym", "concept_relationship", "concept_ancestor", "vocabulary")
PINNED_TABLES = ("concepts", "relations", "errors")  # read as of the last finished run (runs: always latest)
FINISHED = ("succeeded", "failed")  # statuses of runs that recorded their table versions when they ended


class StaleVersionError(RuntimeError):
    """A recorded table version can no longer be read (its log or files were removed)."""


def query_text(query: str) -> str:
    """The SQL of a shipped query's name, of a ``.sql`` file, or ``query`` itself when it is a statement (holds a
    space). Anything else is a :class:`ConfigError` naming the shipped queries."""
    from notelake.conf.settings import ConfigError

    path = Path(query) if query.endswith(".sql") else SQL_DIR / f"{query}.sql"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if not query.endswith(".sql") and any(c.isspace() for c in query.strip()):
        return query
    known = ", ".join(sorted(p.stem for p in SQL_DIR.glob("*.sql")))
    raise ConfigError(f"no query {query!r}: give a shipped query ({known}), a .sql file or a SQL statement")


def finished_versions(output: str | Path, opts: dict[str, str] | None = None) -> dict[str, int | None] | None:
    """The table versions recorded by the latest finished run on ``output`` (the latest ``ended_at`` among runs
    that succeeded or failed with their versions recorded), or None when no run has finished."""
    from notelake.jobs import storage
    from notelake.jobs.warehouse import read_delta_arrow

    runs = read_delta_arrow(storage.join(str(output), "runs"), ["status", "ended_at", "table_versions_json"], opts)
    finished = [r for r in (runs.to_pylist() if runs is not None else [])
                if r["status"] in FINISHED and r["ended_at"] is not None
                and json.loads(r["table_versions_json"] or "{}")]
    if not finished:
        return None
    return json.loads(max(finished, key=lambda r: r["ended_at"])["table_versions_json"])


def read_versions(output: str | Path, opts: dict[str, str] | None = None,
                  latest: bool = False) -> dict[str, int | None] | None:
    """What each pinned table is read at: {table: version, or None for "no rows yet"}; None = every latest."""
    if latest:
        return None
    recorded = finished_versions(output, opts) or {}
    return {table: recorded.get(table) for table in PINNED_TABLES}


def _delta_table(path: str, opts: dict[str, str] | None, version: int | None):
    """The table at ``version`` (None: latest), or None when there is no table."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError, TableNotFoundError

    try:
        return DeltaTable(path, version=version, storage_options=opts)
    except TableNotFoundError:
        if version is None:
            return None
        raise StaleVersionError(f"{path}: version {version}, recorded by the last finished run, is gone "
                                "(removed by VACUUM or log cleanup); read with --latest") from None
    except DeltaError as exc:
        if version is None:
            raise
        raise StaleVersionError(f"{path}: version {version}, recorded by the last finished run, cannot be read "
                                f"({type(exc).__name__}); read with --latest") from None


def _arrow_view(path: str, opts: dict[str, str] | None, pinned: bool, version: int | None):
    """What DuckDB scans for one table: the snapshot's Arrow dataset; an empty table when it is pinned to "no rows
    yet" (with the table's current schema, so queries still parse); None when the table does not exist."""
    table = _delta_table(path, opts, version if pinned else None)
    if table is None:
        return None
    if pinned and version is None:
        return pa.schema(table.schema().to_arrow()).empty_table()
    return table.to_pyarrow_dataset()


def table_location(output: str | Path, table: str, vocabulary: str | None = None) -> str:
    """Where a table a query names lives: under the output, or (a vocabulary table) under ``vocabulary``."""
    from notelake.jobs import storage
    from notelake.jobs.vocab import vocabulary_root

    root = vocabulary_root(str(output), vocabulary) if table in VOCABULARY_TABLES else str(output)
    return storage.join(root, table)


def run_duckdb(output: str | Path, sql: str, opts: dict[str, str] | None = None, latest: bool = False,
               vocabulary: str | None = None) -> pa.Table:
    """DuckDB over the tables as of the last finished run (``latest``: their current snapshots): delta-rs hands
    DuckDB an Arrow dataset of exactly the snapshot's files (local or on an object store), which DuckDB scans
    with projection and filter pushdown."""
    import duckdb

    versions = read_versions(output, opts, latest)
    con = duckdb.connect()
    for table in QUERY_TABLES + VOCABULARY_TABLES:
        pinned = versions is not None and table in versions
        view = _arrow_view(table_location(output, table, vocabulary), opts, pinned,
                           versions.get(table) if pinned else None)
        if view is not None:
            con.register(table, view)
    return con.sql(sql).to_arrow_table()


def run_spark(spark, output: str | Path, sql: str, opts: dict[str, str] | None = None, latest: bool = False,
              vocabulary: str | None = None):
    """Spark SQL over delta-rs tables as of the last finished run (``latest``: their current snapshots), via the
    snapshot's Parquet files (no delta-spark needed)."""
    from notelake.jobs.warehouse import read_snapshot_spark

    versions = read_versions(output, opts, latest)
    for table in QUERY_TABLES + VOCABULARY_TABLES:
        path = table_location(output, table, vocabulary)
        pinned = versions is not None and table in versions
        if pinned and versions[table] is None:
            empty = _arrow_view(path, opts, pinned=True, version=None)
            df = None if empty is None else spark.createDataFrame(empty)
        else:
            version = versions[table] if pinned else None
            if version is not None:
                _delta_table(path, opts, version)  # a clear error when the recorded version is gone
            df = read_snapshot_spark(spark, path, opts, version=version)
        if df is not None:
            df.createOrReplaceTempView(table)
    return spark.sql(sql)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="notelake sql", description="run a cohort query over the output tables")
    p.add_argument("--output", required=True, help="warehouse directory written by the extract job")
    p.add_argument("--query", default="drug_adverse_effects",
                   help="shipped query name, a .sql file, or a SQL statement over the output's tables (concepts, "
                        "relations, runs, errors; OMOP: concept_links, note_nlp, note_nlp_relation, drug_exposure, "
                        "condition_occurrence, note_crosswalk) and the vocabulary's (concept, concept_ancestor, ...)")
    p.add_argument("--engine", choices=("duckdb", "spark"), default="duckdb")
    p.add_argument("--max-rows", type=int, default=50)
    p.add_argument("--latest", action="store_true",
                   help="read each table's latest snapshot, rounds of a run in progress included (default: the "
                        "tables as of the last finished run)")
    p.add_argument("--conf", default=None, help="settings YAML whose storage.options reach an object-store output "
                                               "(the environment's AWS_* variables serve too)")
    args = p.parse_args(argv)
    import duckdb

    from notelake.conf import load_settings
    from notelake.conf.settings import ConfigError
    from notelake.jobs import storage

    try:
        sql = query_text(args.query)
        settings = load_settings(args.conf)
        opts = storage.settings_options(settings)
        if not args.latest and finished_versions(args.output, opts) is None:
            print("note: no run has finished on this output yet, so concepts, relations and errors read as empty "
                  "(--latest reads what is committed so far)", file=sys.stderr)
        if args.engine == "spark":
            from pyspark.errors import AnalysisException  # parse errors too: ParseException is one

            from notelake.jobs.extraction.session import start_spark

            spark = start_spark(settings, app_name="notelake-sql")
            try:
                run_spark(spark, args.output, sql, opts, args.latest, settings.omop.vocabulary).show(args.max_rows, truncate=False)
            except AnalysisException as exc:  # the statement's own error (its plan, never rows): for the user
                raise ConfigError(f"Spark SQL: {exc}") from None
            return 0
        table = run_duckdb(args.output, sql, opts, args.latest, settings.omop.vocabulary)
    except (ConfigError, StaleVersionError, duckdb.Error) as exc:  # a query or a setting to fix: for the user
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import polars as pl

    with pl.Config(tbl_rows=args.max_rows, tbl_width_chars=160, fmt_str_lengths=60):
        print(pl.from_arrow(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
