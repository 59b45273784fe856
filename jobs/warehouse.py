"""The job's Delta output tables: concepts, relations, errors, runs and the ledger (delta-rs, object stores too).

Layout: concepts, relations and the ledger are partitioned by ``task`` and ``note_bucket`` (a hash of the note id
modulo the output's bucket count, fixed when the output is created and kept in ``_notelake_layout.json``). The job
assigns each round of notes to a few buckets, and every write names them as partition literals, so a round
touches only its buckets' files however large the tables grow.

Write semantics (design notes): a round's notes are replaced atomically, one commit per table: notes seen before
by ``write_deltalake(mode="overwrite", predicate=<task, buckets, note ids>)`` (delta-rs replaceWhere: the notes'
old rows out, the new ones in, in one commit, the data checked against the predicate); first-time notes by a plain
append. The ledger is committed last, so a crash before it means the round is redone, never lost or duplicated.

Schema evolution: every write merges the data's schema into the table's (``schema_mode="merge"``, ``merge_schema``
on MERGE), so a pass-through column added to the input becomes a new column of concepts, relations and the
ledger (older rows null) and one the input no longer has stays in the table, null on new rows.

Concurrency: one run at a time per output (:func:`notelake.jobs.guards.output_lock`). ``Warehouse.fence`` (the
lock's ``check``) runs before every commit, so a run whose object-store lease was taken over commits nothing
more.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa


log = logging.getLogger("notelake.warehouse")

TABLES = ("concepts", "relations", "errors", "runs", "ledger")
NOTE_TABLES = ("concepts", "relations", "ledger")  # one note's rows: partitioned by (task, note_bucket)
_PARTITIONS = {t: ["task", "note_bucket"] for t in NOTE_TABLES}
LAYOUT_FILE = "_notelake_layout.json"
LAYOUT_VERSION = 2
_COMMIT_RETRIES = 5
_DELETE_BATCH = 5000  # note ids per DELETE predicate
_DELETE_BUCKETS = 4  # note buckets per DELETE commit: each reads and rewrites only those buckets' files
STAGING_DIR = "_staging"


class OutputLayoutError(ValueError):
    """The output was written by an older release with another table layout."""


class OutputWriteError(RuntimeError):
    """A Delta commit failed for a reason other than a concurrent writer (read-only or full disk, permissions)."""


def _one_line(exc: BaseException, limit: int = 400) -> str:
    """delta-rs errors span several lines with ANSI colour codes: one plain line (they hold paths, not data)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    return " / ".join(part.strip(" ↳") for part in text.splitlines() if part.strip())[:limit]


def sql_string_list(values: Iterable[str]) -> str:
    """A SQL IN-list of string literals with quotes escaped."""
    return ", ".join("'" + str(v).replace("'", "''") + "'" for v in values)


def read_delta_arrow(path: str | os.PathLike, columns: list[str] | None = None,
                     opts: dict[str, str] | None = None) -> pa.Table | None:
    """Current snapshot of a Delta table through deltalake (never by globbing Parquet files), or None."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        table = DeltaTable(str(path), storage_options=opts)
    except TableNotFoundError:
        return None
    return table.to_pyarrow_dataset().to_table(columns=columns)


def snapshot_files(path: str | os.PathLike, version: int | None = None) -> list[str]:
    """Parquet files of a local Delta table's snapshot (the current one, or ``version``): how Spark reads delta-rs
    tables without delta-spark."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(str(path), version=version).file_uris()
    except TableNotFoundError:
        return []


def empty_snapshot(path: str | os.PathLike, opts: dict[str, str] | None = None,
                   version: int | None = None) -> pa.Table | None:
    """An empty table with the Delta table's schema (a table with no rows has no files), or None if absent."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        table = DeltaTable(str(path), version=version, storage_options=opts)
    except TableNotFoundError:
        return None
    return pa.schema(table.schema().to_arrow()).empty_table()


def read_snapshot_spark(spark, path: str | os.PathLike, opts: dict[str, str] | None = None,
                        version: int | None = None):
    """A delta-rs table (its current snapshot, or ``version``) as a Spark DataFrame without delta-spark, or None if
    there is no table. Local tables: the snapshot's Parquet files through Spark's own reader, with ``basePath`` so
    Hive-style partition columns (``task=phee/``) come back as columns. Object stores (Spark has no connector
    here): the ``notelake_table`` data source, whose tasks read the snapshot's files with delta-rs."""
    from notelake.jobs import storage

    if storage.is_uri(str(path)):
        if empty_snapshot(path, opts, version) is None:
            return None
        return storage.read_table(spark, str(path), "delta", opts, version=version)
    files = snapshot_files(path, version)
    if files:
        return spark.read.option("basePath", Path(path).resolve().as_uri()).parquet(*files)
    empty = empty_snapshot(path, version=version)
    return None if empty is None else spark.createDataFrame(empty)


@dataclass
class Warehouse:
    """The output tables under one root directory, written with delta-rs."""

    root: str  # a local path or an object-store URI
    commit_metadata: dict[str, str]
    storage_options: dict[str, str] = field(default_factory=dict, repr=False)  # credentials: never logged
    # called before every commit (the output lock's ``check``): raises when this run may no longer write
    fence: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def path(self, table: str) -> str:
        from notelake.jobs import storage

        return storage.join(self.root, table)

    def version(self, table: str) -> int | None:
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            return DeltaTable(self.path(table), storage_options=self.storage_options).version()
        except TableNotFoundError:
            return None

    def versions(self) -> dict[str, int | None]:
        return {t: self.version(t) for t in TABLES}

    def commit_properties(self, operation: str):
        """A commit's properties: the warehouse's metadata (run, model, ...) and ``operation``, with its retries."""
        from deltalake import CommitProperties

        return CommitProperties(
            custom_metadata={**self.commit_metadata, "notelake.operation": operation},
            max_commit_retries=_COMMIT_RETRIES,
        )

    def with_retries(self, what: str, action):
        """Run a commit, retrying optimistic-concurrency conflicts with backoff (another writer committed).

        Any other failure (read-only or full disk, permissions) becomes :class:`OutputWriteError` naming the table;
        nothing later in the round -- above all the ledger -- is committed after it.
        """
        from deltalake.exceptions import CommitFailedError, DeltaError

        for attempt in range(1, _COMMIT_RETRIES + 1):
            if self.fence is not None:
                self.fence()
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
                            commit_properties=self.commit_properties(operation),
                            storage_options=self.storage_options)
            return True

        return self.with_retries(table, create)

    def replace_notes(self, table: str, data: pa.Table, task: str, note_ids: list[str], buckets: set[int]) -> None:
        """Replace all rows of ``note_ids`` (of ``task``, in ``buckets``) with ``data`` in one commit; only the
        named buckets' files are read or rewritten."""
        from deltalake import write_deltalake

        if not note_ids or self._create_or_append(table, data, "replace_notes"):
            return
        self.with_retries(table, lambda: write_deltalake(
            self.path(table), data, mode="overwrite", predicate=note_scope(task, buckets, note_ids), schema_mode="merge",
            commit_properties=self.commit_properties("replace_notes"), storage_options=self.storage_options))

    def upsert(self, table: str, data: pa.Table, key: str = "run_id") -> None:
        """MERGE on ``key`` (the small runs table)."""
        from deltalake import DeltaTable

        if not data.num_rows or self._create_or_append(table, data, "upsert"):
            return
        self.with_retries(table, lambda: (
            DeltaTable(self.path(table), storage_options=self.storage_options)
            # merge_schema: a table written by an older release gains the columns added since (all nullable)
            .merge(data, predicate=f"t.{key} = s.{key}", source_alias="s", target_alias="t", merge_schema=True,
                   commit_properties=self.commit_properties("upsert"))
            .when_matched_update_all().when_not_matched_insert_all().execute()))

    def update_columns(self, table: str, data: pa.Table, task: str, buckets: set[int], columns: list[str]) -> None:
        """Set ``columns`` on every row of the notes in ``data`` (one row per note_id) from ``data``: pass-through
        columns refreshed without calling the model. Only the named buckets' files are read."""
        from deltalake import DeltaTable

        if not data.num_rows or self.version(table) is None:
            return
        predicate = f"t.note_id = s.note_id AND {note_scope(task, buckets, alias='t')}"
        self.with_retries(table, lambda: (
            DeltaTable(self.path(table), storage_options=self.storage_options)
            # merge_schema: a column new to the table is added (without it delta-rs drops the values silently)
            .merge(data, predicate=predicate, source_alias="s", target_alias="t", merge_schema=True,
                   commit_properties=self.commit_properties("update_columns"))
            .when_matched_update({c: f"s.{c}" for c in columns}).execute()))

    def append(self, table: str, data: pa.Table) -> None:
        """Append ``data``; an empty ``data`` still creates a missing table, so every output table exists (with its
        schema) after the first run and downstream SQL never meets a missing one."""
        if data.num_rows == 0 and self.version(table) is not None:
            return
        from deltalake import write_deltalake

        self.with_retries(table, lambda: write_deltalake(
            self.path(table), data, mode="append", partition_by=_PARTITIONS.get(table), schema_mode="merge",
            commit_properties=self.commit_properties("append"), storage_options=self.storage_options,
        ))

    def delete_notes(self, task: str, notes: dict[str, int], tables: tuple[str, ...] = NOTE_TABLES) -> None:
        """Remove every row of the notes ``{note_id: note_bucket}`` of ``task`` from ``tables``, bucket by bucket:
        each commit covers at most ``_DELETE_BUCKETS`` buckets and ``_DELETE_BATCH`` notes, so it reads and
        rewrites only those buckets' files. In each batch the ledger goes last, so a crash in between is finished
        by the next run (the ledger still lists the notes)."""
        present = [t for t in tables if self.version(t) is not None]
        for buckets, ids in _delete_batches(notes):
            scope = note_scope(task, buckets, ids)
            for table in present:
                self.with_retries(table, lambda: _delete(self.path(table), scope, self.storage_options,
                                                          self.commit_properties("delete_notes")))

    def reset_attempts(self, task: str, notes: dict[str, int]) -> None:
        """Set the ledger's ``attempts`` to 0 on the failed rows of the notes ``{note_id: note_bucket}`` of
        ``task`` (given-up notes selected again, ``--retry-given-up``), bucket by bucket like :meth:`delete_notes`."""
        from deltalake import DeltaTable

        for buckets, ids in _delete_batches(notes):
            predicate = f"{note_scope(task, buckets, ids)} AND status = 'failed'"
            self.with_retries("ledger", lambda: DeltaTable(self.path("ledger"), storage_options=self.storage_options)
                              .update(updates={"attempts": "0"}, predicate=predicate,
                                      commit_properties=self.commit_properties("reset_attempts")))

    def commit_round(self, staged: dict[str, pa.Table], task: str, replaced: list[str], first: list[str],
                     ledger_known: list[str], buckets: set[int]) -> None:
        """Commit one round: concepts and relations of ``replaced`` notes replaced, those of ``first`` (no rows
        yet) appended, errors appended, then the ledger last (rows of ``ledger_known`` notes replaced)."""
        import pyarrow.compute as pc

        def rows_of(table: pa.Table, ids: list[str]) -> pa.Table:
            return table.filter(pc.is_in(table["note_id"], pa.array(ids, pa.string())))

        for name in ("concepts", "relations"):
            self.replace_notes(name, rows_of(staged[name], replaced), task, replaced, buckets)
            self.append(name, rows_of(staged[name], first))
        self.append("errors", staged["errors"])
        _failpoint("exit_before_ledger_commit")
        self.commit_ledger(staged["ledger"], task, ledger_known, buckets)

    def commit_ledger(self, ledger: pa.Table, task: str, known: list[str], buckets: set[int]) -> None:
        """The notes' ledger rows: those of ``known`` notes (already in the ledger) replace theirs, the rest are
        appended."""
        import pyarrow.compute as pc

        known_ids = pa.array(sorted(set(known)), pa.string())
        is_known = pc.is_in(ledger["note_id"], known_ids)
        self.replace_notes("ledger", ledger.filter(is_known), task, known_ids.to_pylist(), buckets)
        self.append("ledger", ledger.filter(pc.invert(is_known)))

    # ------------------------------------------------------------------------------------------ layout, recovery
    def note_buckets(self, wanted: int, create: bool = True) -> int:
        """The output's bucket count: fixed by its first run (``_notelake_layout.json``); ``wanted`` for a new one.

        Refuses an output written by an older release (another layout): its rows could not be replaced in place.
        """
        from notelake.jobs import storage

        layout_path = storage.join(self.root, LAYOUT_FILE)
        text = storage.read_text(layout_path, self.storage_options)
        if text is not None:
            layout = json.loads(text)
            if layout.get("note_buckets") != wanted:
                log.warning("output keeps its %d note buckets (job.note_buckets %d applies to new outputs)",
                            layout["note_buckets"], wanted)
            return int(layout["note_buckets"])
        if self.version("ledger") is not None:
            raise OutputLayoutError(
                f"output {self.root} was written by an older notelake (table layout 1: no note buckets, one ledger "
                "row per text and fingerprint). Write to a new --output: the v3 adapter and answer schema change "
                "the extraction fingerprint, so every note is re-extracted anyway (README, upgrade notes).")
        if create:
            storage.write_text(layout_path, json.dumps({"layout": LAYOUT_VERSION, "note_buckets": wanted}) + "\n",
                               self.storage_options)
        return wanted

    def staging_root(self, staging: str | None = None) -> str:
        """Where this output's runs stage rows (each run in ``<root>/<pass id>``): ``<output>/_staging``, or
        ``<staging>/<output id>`` (:func:`output_id`) under a shared ``storage.staging``, so recovering one
        output never touches the rows another output's run has staged."""
        from notelake.jobs import storage

        if staging is None:
            return storage.join(self.root, STAGING_DIR)
        return storage.join(staging, output_id(self.root))

    def recover(self, staging_root: str) -> tuple[list[str], int]:
        """Clean up after the runs on this output that ended without finishing: remove their staged files under
        ``staging_root`` (:meth:`staging_root`: this output's only; note-derived PHI), mark their ``running`` rows
        ``abandoned``, and remove the rows of the round they died in (:meth:`repair`). Returns (the runs marked
        abandoned, notes repaired).

        Call it holding the output's lock (:func:`notelake.jobs.guards.output_lock`): every other run on this
        output has then ended, released its lease or let it expire, and one that lost its lease is fenced off the
        tables (``fence`` is checked first, and before each commit)."""
        from notelake.jobs import storage

        if self.fence is not None:
            self.fence()
        storage.delete_tree(staging_root, self.storage_options)
        runs = read_delta_arrow(self.path("runs"), opts=self.storage_options)
        if runs is None:
            return [], 0
        rows = sorted(runs.to_pylist(), key=lambda r: r["started_at"])
        stale = [r for r in rows if r["status"] == "running"]
        for row in stale:
            row["status"] = "abandoned"
        if stale:
            self.upsert("runs", pa.Table.from_pylist(stale, schema=runs.schema))
        last_ok = max((k for k, r in enumerate(rows) if r["status"] == "succeeded"), default=-1)
        unfinished = [r["run_id"] for r in rows[last_ok + 1:]]
        return [r["run_id"] for r in stale], self.repair(unfinished) if unfinished else 0

    def repair(self, run_ids: list[str]) -> int:
        """Remove the concept and relation rows that ``run_ids`` committed for notes whose ledger row they never
        wrote: the round a run died in (killed, or stopped by a write error) between its row commits and its
        ledger commit. The next run extracts those notes again, so the rows would otherwise be duplicated (a
        first-time note's rows are appended). Returns the notes repaired."""
        import pyarrow.compute as pc

        ledger = read_delta_arrow(self.path("ledger"), columns=["task", "note_id", "run_id"], opts=self.storage_options)
        acked = set() if ledger is None else {
            (r["task"], r["note_id"]) for r in ledger.filter(pc.is_in(ledger["run_id"], pa.array(run_ids))).to_pylist()}
        orphans: dict[str, dict[str, int]] = {}
        for table in ("concepts", "relations"):
            if self.version(table) is None:
                continue
            from deltalake import DeltaTable

            written = DeltaTable(self.path(table), storage_options=self.storage_options).to_pyarrow_dataset().to_table(
                columns=["task", "note_id", "note_bucket"], filter=pc.field("run_id").isin(run_ids))
            for r in written.to_pylist():
                if (r["task"], r["note_id"]) not in acked:
                    orphans.setdefault(r["task"], {})[r["note_id"]] = r["note_bucket"]
        runs_in = f"run_id IN ({sql_string_list(run_ids)})"
        for task, notes in orphans.items():
            for table in ("concepts", "relations"):
                if self.version(table) is not None:
                    scope = f"{note_scope(task, set(notes.values()), sorted(notes))} AND {runs_in}"
                    self.with_retries(table, lambda: _delete(self.path(table), scope, self.storage_options,
                                                              self.commit_properties("repair")))
        return sum(len(n) for n in orphans.values())


#: Reliability tests: ``NOTELAKE_FAILPOINT=exit_before_ledger_commit:N`` kills the driver in its N-th round, after
#: the concepts, relations and errors commits and before the ledger's (a crash at the worst moment).
FAILPOINT_ENV = "NOTELAKE_FAILPOINT"
_failpoint_hits: dict[str, int] = {}


def _failpoint(name: str) -> None:
    spec = os.environ.get(FAILPOINT_ENV, "")
    if spec.split(":")[0] != name:
        return
    _failpoint_hits[name] = _failpoint_hits.get(name, 0) + 1
    if _failpoint_hits[name] >= int(spec.split(":")[1] if ":" in spec else 1):
        os._exit(9)


def note_scope(task: str, buckets: set[int], note_ids: list[str] | None = None, alias: str = "") -> str:
    """SQL predicate for the rows of ``note_ids`` of ``task`` in ``buckets``; the partition literals let delta-rs
    skip every other bucket's files."""
    col = f"{alias}." if alias else ""
    scope = f"{col}task = '{task}' AND {col}note_bucket IN ({', '.join(str(int(b)) for b in sorted(buckets))})"
    if note_ids is not None:
        scope += f" AND {col}note_id IN ({sql_string_list(note_ids)})"
    return scope


def _delete_batches(notes: dict[str, int]) -> Iterator[tuple[set[int], list[str]]]:
    """(buckets, note ids) of each delete commit: whole buckets in order, at most ``_DELETE_BUCKETS`` buckets and
    ``_DELETE_BATCH`` ids per commit (a bucket with more ids is split over several commits)."""
    by_bucket: dict[int, list[str]] = {}
    for note_id, bucket in notes.items():
        by_bucket.setdefault(int(bucket), []).append(note_id)
    buckets: set[int] = set()
    ids: list[str] = []
    for bucket in sorted(by_bucket):
        members = sorted(by_bucket[bucket])
        for start in range(0, len(members), _DELETE_BATCH):
            part = members[start:start + _DELETE_BATCH]
            if ids and (len(buckets | {bucket}) > _DELETE_BUCKETS or len(ids) + len(part) > _DELETE_BATCH):
                yield buckets, ids
                buckets, ids = set(), []
            buckets.add(bucket)
            ids.extend(part)
    if ids:
        yield buckets, ids


def output_id(root: str) -> str:
    """A short, readable name for an output location, distinct for ``s3://a/wh`` and ``s3://b/wh``: its last path
    part and the first 12 hex digits of the sha256 of the whole location."""
    import hashlib

    location = str(root).rstrip("/")
    tail = re.sub(r"[^A-Za-z0-9_.-]+", "_", location.rsplit("/", 1)[-1])[:40].strip(".") or "output"
    return f"{tail}-{hashlib.sha256(location.encode()).hexdigest()[:12]}"


def _delete(path: str, predicate: str, opts: dict[str, str], commit_properties) -> None:
    from deltalake import DeltaTable

    DeltaTable(path, storage_options=opts).delete(predicate, commit_properties=commit_properties)


def open_warehouse(root: str | os.PathLike, commit_metadata: dict[str, str],
                   storage_options: dict[str, str] | None = None,
                   fence: Callable[[], None] | None = None) -> Warehouse:
    """The output tables under ``root``; ``fence``: the output lock's ``check``, run before every commit."""
    from notelake.jobs import storage

    root = str(root)
    if storage.is_local(root):
        root = storage.join(root)
        os.makedirs(root, exist_ok=True)
    return Warehouse(root, commit_metadata, dict(storage_options or {}), fence)
