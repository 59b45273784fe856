"""What a publish keeps and compares: its tables' schemas, its stats, the publish context, and which buckets
changed since the last publish (source table versions, files, fingerprints)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from notelake.conf import Settings
from notelake.jobs.warehouse import Warehouse
from notelake.udfs import schemas

log = logging.getLogger("notelake.omop")


#: Bumped when the rows written for the same inputs change: every note is then published again.
OMOP_STAGE_VERSION = "1"
OUTPUT_TABLES = ("note_nlp", "note_nlp_relation", "drug_exposure", "condition_occurrence")
SOURCES = ("concepts", "relations", "concept_links")
_PARTITIONS = ["task", "note_bucket"]

STATE_SCHEMA = pa.schema([
    pa.field("task", pa.string(), nullable=False), pa.field("note_bucket", pa.int32(), nullable=False),
    pa.field("note_id", pa.string(), nullable=False),  # the source note id
    pa.field("omop_note_id", pa.int64()),  # null: the note was not published (its OMOP note id was invalid)
    pa.field("note_key", pa.string(), nullable=False),
    pa.field("note_nlp_rows", pa.int32(), nullable=False), pa.field("derived_rows", pa.int32(), nullable=False),
    pa.field("publish_id", pa.string(), nullable=False), pa.field("published_at", schemas.TIMESTAMP, nullable=False),
])
CROSSWALK_SCHEMA = pa.schema([
    pa.field("note_bucket", pa.int32(), nullable=False), pa.field("source_note_id", pa.string(), nullable=False),
    pa.field("note_id", pa.int64(), nullable=False), pa.field("assigned_at", schemas.TIMESTAMP, nullable=False),
])
IDS_SCHEMA = pa.schema([pa.field("name", pa.string(), nullable=False), pa.field("next_id", pa.int64(), nullable=False),
                        pa.field("updated_at", schemas.TIMESTAMP, nullable=False)])
PUBLISH_SCHEMA = pa.schema([
    pa.field("publish_id", pa.string(), nullable=False), pa.field("status", pa.string(), nullable=False),
    pa.field("fingerprint", pa.string(), nullable=False), pa.field("tasks", pa.string(), nullable=False),
    pa.field("source_versions_json", pa.string(), nullable=False),  # {task: {table: version}}
    pa.field("table_versions_json", pa.string(), nullable=False),
    pa.field("stats_json", pa.string(), nullable=False),
    pa.field("started_at", schemas.TIMESTAMP, nullable=False), pa.field("ended_at", schemas.TIMESTAMP),
])


class OmopError(ValueError):
    """The OMOP output cannot be published as configured (e.g. no 'NLP' type concept in the vocabulary)."""


@dataclass
class OmopStats:
    """What one publish did (also stored in ``omop_publish.stats_json``)."""

    publish_id: str = ""
    buckets_visited: int = 0
    notes_published: int = 0  # notes whose rows were (re)written
    notes_removed: int = 0  # notes gone from the concepts table: their rows deleted
    notes_invalid: int = 0  # notes not published: their OMOP note id is not an integer (errors table)
    note_nlp_rows: int = 0
    relation_rows: int = 0
    drug_exposure_rows: int = 0
    condition_occurrence_rows: int = 0
    derived_skipped: int = 0  # derivable mentions without a person id or note date (errors table, per note)
    seconds: float = 0.0
    fingerprint: str = ""
    per_task: dict = field(default_factory=dict)  # task -> buckets visited


@dataclass(frozen=True)
class _Publish:
    """What every pass of one publish needs."""

    settings: Settings
    publish_id: str
    fingerprint: str
    type_concept_id: int | None  # the vocabulary's 'NLP' type concept (domain tables only)
    staging: str
    opts: dict

    @property
    def conf(self):
        return self.settings.omop


def _last_publish(warehouse: Warehouse) -> dict[str, tuple[str, dict]]:
    """task -> (fingerprint, source versions) of the last succeeded publish that covered it."""
    from notelake.jobs.warehouse import read_delta_arrow

    rows = read_delta_arrow(warehouse.path("omop_publish"), opts=warehouse.storage_options)
    last: dict[str, tuple[str, dict]] = {}
    for row in sorted(rows.to_pylist() if rows is not None else [], key=lambda r: r["started_at"]):
        if row["status"] == "succeeded":
            for task, versions in json.loads(row["source_versions_json"]).items():
                last[task] = (row["fingerprint"], versions)
    return last


def _files(warehouse: Warehouse, table: str, task: str, version: int | None = None) -> dict[str, int] | None:
    """{data file: note bucket} of ``task`` in ``table`` at ``version`` (latest: None) from the Delta log alone;
    None when the table does not exist (then or now)."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        actions = pa.table(DeltaTable(warehouse.path(table), version=version,
                                      storage_options=warehouse.storage_options or None).get_add_actions(flatten=True))
    except TableNotFoundError:
        return None
    if "partition.note_bucket" not in actions.column_names:  # not laid out by bucket: any change is everywhere
        return {p: -1 for p in actions["path"].to_pylist()}
    rows = actions.filter(pc.equal(actions["partition.task"], task))
    return dict(zip(rows["path"].to_pylist(), rows["partition.note_bucket"].to_pylist()))


def _dirty_buckets(warehouse: Warehouse, task: str, previous: tuple[str, dict] | None, fingerprint: str) -> list[int]:
    """The note buckets of ``task`` whose source files changed since the last publish (all of them on the first
    publish, after a fingerprint change, or when an old version can no longer be read)."""
    from deltalake.exceptions import DeltaError

    every = set()
    for table in (*SOURCES, "omop_state"):
        every |= set((_files(warehouse, table, task) or {}).values())
    every.discard(-1)
    if previous is None or previous[0] != fingerprint:
        return sorted(every)
    dirty: set[int] = set()
    for table in SOURCES:
        now = _files(warehouse, table, task) or {}
        since = previous[1].get(table)
        try:
            before = {} if since is None else (_files(warehouse, table, task, since) or {})
        except DeltaError:  # the old version's log was cleaned up (log retention): compare everything
            log.warning("%s version %s no longer readable: every bucket of %s is compared", table, since, task)
            return sorted(every)
        changed = {b for p, b in now.items() if p not in before} | {b for p, b in before.items() if p not in now}
        if -1 in changed:
            return sorted(every)
        dirty |= changed
    return sorted(dirty)
