"""Cohort SQL over the output tables, with DuckDB or Spark SQL (same queries, same rows).

    notelake sql --output <warehouse dir> --query drug_adverse_effects [--engine duckdb|spark]
    notelake sql --output <warehouse dir> --query "select label, count(*) from relations group by label"

Both engines read exactly the current Delta snapshot's Parquet files, listed by ``deltalake``
(``DeltaTable.file_uris()``): DuckDB with ``read_parquet``, Spark with ``spark.read.parquet`` (the path for
delta-rs tables where the delta-spark jars are absent). Never glob a table directory's Parquet files:
that would resurrect deleted rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow as pa

SQL_DIR = Path(__file__).resolve().parent / "sql"
QUERY_TABLES = ("concepts", "relations", "runs", "errors")


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


def run_duckdb(output: str | Path, sql: str, opts: dict[str, str] | None = None) -> pa.Table:
    """DuckDB over each table's current snapshot: delta-rs hands DuckDB an Arrow dataset of exactly the snapshot's
    files (local or on an object store), which DuckDB scans with projection and filter pushdown."""
    import duckdb
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    from notelake.jobs import storage

    con = duckdb.connect()
    for table in QUERY_TABLES:
        try:
            con.register(table, DeltaTable(storage.join(str(output), table), storage_options=opts).to_pyarrow_dataset())
        except TableNotFoundError:
            continue
    return con.sql(sql).to_arrow_table()


def run_spark(spark, output: str | Path, sql: str, opts: dict[str, str] | None = None):
    """Spark SQL over delta-rs tables via their current snapshot's Parquet files (no delta-spark needed)."""
    from notelake.jobs import storage
    from notelake.jobs.warehouse import read_snapshot_spark

    for table in QUERY_TABLES:
        df = read_snapshot_spark(spark, storage.join(str(output), table), opts)
        if df is not None:
            df.createOrReplaceTempView(table)
    return spark.sql(sql)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="notelake sql", description="run a cohort query over the output tables")
    p.add_argument("--output", required=True, help="warehouse directory written by the extract job")
    p.add_argument("--query", default="drug_adverse_effects",
                   help="shipped query name, a .sql file, or a SQL statement over concepts, relations, runs, errors")
    p.add_argument("--engine", choices=("duckdb", "spark"), default="duckdb")
    p.add_argument("--max-rows", type=int, default=50)
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
        if args.engine == "spark":
            from pyspark.errors import AnalysisException  # parse errors too: ParseException is one

            from notelake.jobs.extract import start_spark

            spark = start_spark(settings, app_name="notelake-sql")
            try:
                run_spark(spark, args.output, sql, opts).show(args.max_rows, truncate=False)
            except AnalysisException as exc:  # the statement's own error (its plan, never rows): for the user
                raise ConfigError(f"Spark SQL: {exc}") from None
            return 0
        table = run_duckdb(args.output, sql, opts)
    except (ConfigError, duckdb.Error) as exc:  # a query or a setting to fix: its message is for the user
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import polars as pl

    with pl.Config(tbl_rows=args.max_rows, tbl_width_chars=160, fmt_str_lengths=60):
        print(pl.from_arrow(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
