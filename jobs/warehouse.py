"""The job's Delta output tables: concepts, relations, errors, runs and the ledger.

Write semantics (design notes): each batch of notes replaces its notes' rows atomically, one commit per table
(MERGE on the row id, ``when_not_matched_by_source_delete`` restricted to the batch's note ids and task), and
the ledger is committed last, so a crash before it means the batch is redone, never lost or duplicated.

Two writers share that contract: ``deltalake`` (delta-rs, embedded, the default) and ``delta-spark``
(clusters; needs ``--packages io.delta:delta-spark_2.13:<ver>``), chosen by ``spark.delta_writer``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.dataset as ds

from notelake.udfs import schemas

log = logging.getLogger("notelake.warehouse")

TABLES = ("concepts", "relations", "errors", "runs", "ledger")
# Row keys for MERGE. Concepts and relations are replaced per note; ledger and runs are upserted.
_KEYS = {
    "concepts": ("concept_id",),
    "relations": ("relation_id",),
    "ledger": ("note_id", "text_sha256", "fingerprint"),
    "runs": ("run_id",),
}
_PARTITIONS = {"concepts": ["task"], "relations": ["task"]}
_COMMIT_RETRIES = 5
_DELETE_BATCH = 5000  # note ids per DELETE predicate


class OutputWriteError(RuntimeError):
    """A Delta commit failed for a reason other than a concurrent writer (read-only or full disk, permissions)."""


def _one_line(exc: BaseException, limit: int = 400) -> str:
    """delta-rs errors span several lines with ANSI colour codes: one plain line (they hold paths, not data)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    return " / ".join(part.strip(" ↳") for part in text.splitlines() if part.strip())[:limit]


def sql_string_list(values: Iterable[str]) -> str:
    """A SQL IN-list of string literals with quotes escaped."""
    return ", ".join("'" + str(v).replace("'", "''") + "'" for v in values)


def read_delta_arrow(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table | None:
    """Current snapshot of a Delta table through deltalake (never by globbing Parquet files), or None."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        table = DeltaTable(str(path))
    except TableNotFoundError:
        return None
    return table.to_pyarrow_dataset().to_table(columns=columns)


def snapshot_files(path: str | os.PathLike) -> list[str]:
    """Parquet files of a Delta table's current snapshot (how Spark reads delta-rs tables without delta-spark)."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(str(path)).file_uris()
    except TableNotFoundError:
        return []


def empty_snapshot(path: str | os.PathLike) -> pa.Table | None:
    """An empty table with the Delta table's schema (a table with no rows has no files), or None if absent."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return pa.schema(DeltaTable(str(path)).schema().to_arrow()).empty_table()
    except TableNotFoundError:
        return None


def read_snapshot_spark(spark, path: str | os.PathLike):
    """A delta-rs table as a Spark DataFrame without delta-spark: the current snapshot's Parquet files, with
    ``basePath`` so Hive-style partition columns (``task=phee/``) come back as columns. None if no table."""
    files = snapshot_files(path)
    if files:
        return spark.read.option("basePath", Path(path).resolve().as_uri()).parquet(*files)
    empty = empty_snapshot(path)
    return None if empty is None else spark.createDataFrame(empty)


@dataclass
class Warehouse:
    """The output tables under one root directory, written with delta-rs."""

    root: Path
    commit_metadata: dict[str, str]

    def path(self, table: str) -> str:
        return str(self.root / table)

    def version(self, table: str) -> int | None:
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            return DeltaTable(self.path(table)).version()
        except TableNotFoundError:
            return None

    def versions(self) -> dict[str, int | None]:
        return {t: self.version(t) for t in TABLES}

    def _commit_properties(self, operation: str):
        from deltalake import CommitProperties

        return CommitProperties(
            custom_metadata={**self.commit_metadata, "notelake.operation": operation},
            max_commit_retries=_COMMIT_RETRIES,
        )

    def _with_retries(self, what: str, action):
        """Run a commit, retrying optimistic-concurrency conflicts with backoff (another writer committed).

        Any other failure (read-only or full disk, permissions) becomes :class:`OutputWriteError` naming the table;
        nothing later in the round -- above all the ledger -- is committed after it.
        """
        from deltalake.exceptions import CommitFailedError, DeltaError

        for attempt in range(1, _COMMIT_RETRIES + 1):
            try:
                return action()
            except CommitFailedError as exc:
                if attempt == _COMMIT_RETRIES:
                    raise OutputWriteError(f"cannot write table {what} at {self.path(what)}: commit conflicts "
                                           f"persisted after {_COMMIT_RETRIES} retries ({_one_line(exc)})") from exc
                log.warning("commit conflict on %s, retry %d/%d", what, attempt, _COMMIT_RETRIES)
                time.sleep(0.2 * 2**attempt)
            except (OSError, DeltaError) as exc:
                raise OutputWriteError(f"cannot write table {what} at {self.path(what)} "
                                       f"({type(exc).__name__}: {_one_line(exc)})") from exc

    def _create_or_append(self, table: str, data: pa.Table, operation: str) -> bool:
        """Create the table with ``data`` if it does not exist; True when it did so."""
        from deltalake import write_deltalake

        def create() -> bool:
            if self.version(table) is not None:
                return False
            write_deltalake(self.path(table), data, mode="append", partition_by=_PARTITIONS.get(table),
                            commit_properties=self._commit_properties(operation))
            return True

        return self._with_retries(table, create)

    def replace_notes(self, table: str, data: pa.Table, task: str, note_ids: list[str]) -> None:
        """Replace all rows of ``note_ids`` (for ``task``) with ``data`` in one commit."""
        if note_ids and not self._create_or_append(table, data, "replace_notes"):
            self._merge(table, data, scope=f"t.task = '{task}' AND t.note_id IN ({sql_string_list(note_ids)})")

    def upsert(self, table: str, data: pa.Table) -> None:
        if data.num_rows and not self._create_or_append(table, data, "upsert"):
            self._merge(table, data)

    def _merge(self, table: str, data: pa.Table, scope: str | None = None) -> None:
        """MERGE on the table's key; with ``scope``, target rows in scope missing from ``data`` are deleted."""
        from deltalake import DeltaTable

        on = " AND ".join(f"t.{k} = s.{k}" for k in _KEYS[table])

        def merge():
            merger = (
                DeltaTable(self.path(table))
                # merge_schema: a table written by an older release gains the columns added since (all nullable)
                .merge(data, predicate=on, source_alias="s", target_alias="t", merge_schema=True,
                       commit_properties=self._commit_properties("replace_notes" if scope else "upsert"))
                .when_matched_update_all()
                .when_not_matched_insert_all()
            )
            if scope:
                merger = merger.when_not_matched_by_source_delete(predicate=scope)
            merger.execute()

        self._with_retries(table, merge)

    def append(self, table: str, data: pa.Table) -> None:
        if data.num_rows == 0:
            return
        from deltalake import write_deltalake

        self._with_retries(table, lambda: write_deltalake(
            self.path(table), data, mode="append", partition_by=_PARTITIONS.get(table),
            commit_properties=self._commit_properties("append"),
        ))

    def delete_notes(self, task: str, note_ids: list[str]) -> None:
        """Remove every row of ``note_ids`` for ``task`` (notes deleted at the source): concepts and relations
        first, the ledger last, so a crash in between is finished by the next run (the ledger still lists them)."""
        for start in range(0, len(note_ids), _DELETE_BATCH):
            scope = f"task = '{task}' AND note_id IN ({sql_string_list(note_ids[start:start + _DELETE_BATCH])})"
            for table in ("concepts", "relations", "ledger"):
                if self.version(table) is not None:
                    self._delete(table, scope)

    def _delete(self, table: str, predicate: str) -> None:
        from deltalake import DeltaTable

        self._with_retries(table, lambda: DeltaTable(self.path(table)).delete(
            predicate, commit_properties=self._commit_properties("delete_notes")))

    def commit_round(self, staged: dict[str, pa.Table], task: str, note_ids: list[str]) -> None:
        """Commit one round of staged output: concepts, relations, errors, then the ledger last."""
        self.replace_notes("concepts", staged["concepts"], task, note_ids)
        self.replace_notes("relations", staged["relations"], task, note_ids)
        self.append("errors", staged["errors"])
        self.upsert("ledger", staged["ledger"])


class SparkDeltaWarehouse(Warehouse):
    """Same tables and semantics through delta-spark (cluster mode).

    Needs the delta-spark jars on the session (``--packages io.delta:delta-spark_2.13:<ver>`` plus the Delta SQL
    extension and catalog). Not exercised where Maven is unreachable; the embedded default is delta-rs.
    """

    def __init__(self, root: Path, commit_metadata: dict[str, str], spark):
        super().__init__(root, commit_metadata)
        self.spark = spark

    def _df(self, data: pa.Table):
        return self.spark.createDataFrame(data)

    def _exists(self, table: str) -> bool:
        from delta.tables import DeltaTable

        return DeltaTable.isDeltaTable(self.spark, self.path(table))

    def _write(self, table: str, data: pa.Table, mode: str) -> None:
        writer = self._df(data).write.format("delta").mode(mode)
        if table in _PARTITIONS:
            writer = writer.partitionBy(*_PARTITIONS[table])
        writer.option("userMetadata", json.dumps(self.commit_metadata)).save(self.path(table))

    def _create_or_append(self, table: str, data: pa.Table, operation: str) -> bool:
        if self._exists(table):
            return False
        self._write(table, data, "append")
        return True

    def _merge(self, table: str, data: pa.Table, scope: str | None = None) -> None:
        from delta.tables import DeltaTable

        on = " AND ".join(f"t.{k} = s.{k}" for k in _KEYS[table])
        merger = (
            DeltaTable.forPath(self.spark, self.path(table)).alias("t")
            .merge(self._df(data).alias("s"), on).whenMatchedUpdateAll().whenNotMatchedInsertAll()
        )
        if scope:
            merger = merger.whenNotMatchedBySourceDelete(condition=scope)
        # a table written by an older release gains the columns added since (all nullable)
        self.spark.conf.set("spark.databricks.delta.schema.autoMerge.enabled", "true")
        merger.execute()

    def _delete(self, table: str, predicate: str) -> None:
        from delta.tables import DeltaTable

        DeltaTable.forPath(self.spark, self.path(table)).delete(predicate)

    def version(self, table: str) -> int | None:
        if not self._exists(table):
            return None
        from delta.tables import DeltaTable

        return DeltaTable.forPath(self.spark, self.path(table)).history(1).collect()[0]["version"]

    def append(self, table, data):
        if data.num_rows:
            self._write(table, data, "append")


def open_warehouse(root: str | os.PathLike, writer: str, commit_metadata: dict[str, str], spark=None) -> Warehouse:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if writer == "delta-spark":
        return SparkDeltaWarehouse(root, commit_metadata, spark)
    return Warehouse(root, commit_metadata)


def read_staged(path: str) -> pa.Table | None:
    """Parquet files staged by executors for one table of one round (plain Parquet, not Delta)."""
    if not Path(path).exists():
        return None
    return ds.dataset(path, format="parquet").to_table()
