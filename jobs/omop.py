"""Publish the warehouse's concepts as OMOP CDM v5.4 rows: ``note_nlp``, ``note_nlp_relation`` and (omop.domain_tables)
NLP-derived ``drug_exposure`` / ``condition_occurrence`` (shapes and mappings: udfs/omop.py).

    notelake omop --output <warehouse> [--conf conf/local.yaml] [--task phee,maccrobat]

(also :func:`publish_omop`, which the extraction job calls after linking, as ``omop.publish`` says).

Incremental. Each publish records the Delta versions of its sources (concepts, relations, concept_links) per task
in ``omop_publish``; the next one lists only the data files added or removed since then (Delta log, no rows read)
and visits only those note buckets. There, Spark computes each note's key (a hash of its concept rows' lineage,
links, person, date and the publish fingerprint) and compares it with ``omop_state``; only notes whose key changed
are rewritten, notes gone from the concepts table are removed, and a rerun with nothing changed writes no table
but its own ``omop_publish`` row.
A change of the publish fingerprint (these settings, the stage version, the NLP type concept) republishes all.

Commits. Per pass of ``omop.publish_buckets_per_pass`` buckets: one commit per output table, whose predicate names
the task, the buckets and the rewritten notes' OMOP note ids (a note's old rows out, its new rows in) -- or only the
task and buckets when every note published there is rewritten (a first publish, a vocabulary release), so no
IN-list of every note -- then ``omop_state`` last; a crash before it only means the notes are published again by
the next run, with the same ids.

Identifiers, assigned once and never reused (the ``omop_ids`` table reserves each block before it is used, so a
crash leaves a gap, never a duplicate):

* ``note_id``: the input's OMOP note id (omop.note_id_column) or ``note_crosswalk``: each source note id gets a
  BIGINT the first time it is published and keeps it, deleted or not.
* ``note_nlp_id``: kept by a mention (a concepts ``concept_id``) as long as it exists: a re-extracted note's
  unchanged mentions keep their ids, its new mentions get new ones. The derived rows' ids are their mention's
  note_nlp_id.

Mention text (PHI) passes only through executors, staged Parquet and the driver's commit, never into logs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import uuid
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from notelake import __version__
from notelake.conf import Settings
from notelake.jobs import storage
from notelake.jobs.warehouse import Warehouse, note_scope, read_snapshot_spark
from notelake.udfs import omop, schemas

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


# ------------------------------------------------------------------------------------------------ entry points
def publish_omop(spark, warehouse: Warehouse, settings: Settings, tasks: list[str]) -> OmopStats:
    """Bring the OMOP tables of ``warehouse`` up to date with its concepts, relations and concept_links for
    ``tasks``. Run under the output's run lock (one writer). Raises :class:`OmopError` for a configuration the
    output cannot honour; a note with bad values (OMOP note id, person id, date) is reported in the errors table
    and the rest are published."""
    started = schemas.utc_now()
    stats = OmopStats(publish_id=uuid.uuid4().hex)
    type_concept = nlp_type_concept(warehouse, settings) if settings.omop.domain_tables else None
    ctx = _Publish(settings, stats.publish_id, publish_fingerprint(settings, type_concept), type_concept,
                   storage.join(warehouse.staging_root(settings.storage.staging), f"omop-{stats.publish_id}"),
                   warehouse.storage_options)
    stats.fingerprint = ctx.fingerprint
    previous = _last_publish(warehouse)
    versions = {task: {t: warehouse.version(t) for t in SOURCES} for task in tasks}
    if warehouse.version("concept_links") is None:
        log.warning("no concept_links table: mentions are published with concept 0 until the linker has run")
    try:
        for task in tasks:
            buckets = _dirty_buckets(warehouse, task, previous.get(task), ctx.fingerprint)
            stats.per_task[task] = len(buckets)
            step = settings.omop.publish_buckets_per_pass
            for i in range(0, len(buckets), step):
                _publish_pass(spark, warehouse, ctx, task, buckets[i:i + step], stats)
    finally:
        storage.delete_tree(ctx.staging, ctx.opts)
    stats.buckets_visited = sum(stats.per_task.values())
    stats.seconds = round((schemas.utc_now() - started).total_seconds(), 3)
    _record_publish(warehouse, ctx, tasks, versions, stats, started)
    log.info("omop publish %s: %d buckets, %d notes written, %d removed, %d note_nlp rows, %d drug_exposure, "
             "%d condition_occurrence, %.1f s", stats.publish_id, stats.buckets_visited, stats.notes_published,
             stats.notes_removed, stats.note_nlp_rows, stats.drug_exposure_rows, stats.condition_occurrence_rows,
             stats.seconds)
    return stats


def nlp_type_concept(warehouse: Warehouse, settings: Settings) -> int:
    """The vocabulary's type concept of NLP-derived records: the valid standard concept named 'NLP' of domain
    'Type Concept' (OMOP's is 32858; a site or demo vocabulary may carry its own). :class:`OmopError` if absent."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    from notelake.jobs.vocab import vocabulary_root

    path = storage.join(vocabulary_root(warehouse.root, settings.omop.vocabulary), "concept")
    try:
        dataset = DeltaTable(path, storage_options=warehouse.storage_options or None).to_pyarrow_dataset()
    except TableNotFoundError:
        raise OmopError(f"omop.domain_tables needs the vocabulary's concept table, not found at {path} "
                        "(notelake vocab load)") from None
    found = dataset.to_table(columns=["concept_id", "standard_concept", "invalid_reason"], filter=(
        (pc.field("concept_name") == "NLP") & (pc.field("domain_id") == "Type Concept")))
    ids = sorted(r["concept_id"] for r in found.to_pylist()
                 if r["standard_concept"] == "S" and not r["invalid_reason"])
    if not ids:
        raise OmopError(f"no valid standard concept 'NLP' of domain 'Type Concept' in {path}: the derived rows' "
                        "type concept (OMOP's 32858) must be in the vocabulary")
    return int(ids[0])


def publish_fingerprint(settings: Settings, type_concept_id: int | None) -> str:
    """Hash of everything besides the source rows that decides the rows written: a change republishes every note."""
    conf = settings.omop
    identity = {"stage": OMOP_STAGE_VERSION, "notelake": __version__, "type_concept_id": type_concept_id,
                **{k: getattr(conf, k) for k in ("term_exists_speculated", "domain_tables", "person_id_column",
                                                  "note_date_column", "note_id_column")}}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ what changed
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


# ------------------------------------------------------------------------------------------------ Spark side
def _source_frame(spark, warehouse: Warehouse, table: str, task: str, buckets: list[int]):
    from pyspark.sql import functions as F

    df = read_snapshot_spark(spark, warehouse.path(table), warehouse.storage_options)
    if df is None:
        return None
    return df.where((F.col("task") == task) & F.col("note_bucket").isin(buckets))


def _passthrough(df, name: str | None, cast: str):
    from pyspark.sql import functions as F

    return F.col(name).cast(cast) if name and name in df.columns else F.lit(None).cast(cast)


def _mentions_frame(spark, warehouse: Warehouse, ctx: _Publish, task: str, buckets: list[int]):
    """The concepts of the buckets joined with their links and the note's OMOP values (:data:`omop.MENTION_SCHEMA`)."""
    from pyspark.sql import functions as F

    concepts = _source_frame(spark, warehouse, "concepts", task, buckets)
    if concepts is None:
        return None
    conf = ctx.conf
    note_id_value = (F.col("note_id") if conf.note_id_column == "note_id"
                     else _passthrough(concepts, conf.note_id_column, "string"))
    mentions = concepts.select(
        *[c for c in ("concept_id", "note_id", "task", "note_bucket", "label", "text", "start", "end", "assertion",
                      "grounded", "model", "adapter", "adapter_sha256", "extracted_at", "run_id")],
        _passthrough(concepts, conf.person_id_column, "string").alias("person_value"),
        _passthrough(concepts, conf.note_date_column, "date").alias("note_date"),
        note_id_value.cast("string").alias("note_id_value"))
    links = _source_frame(spark, warehouse, "concept_links", task, buckets)
    link_cols = {"omop_concept_id": "int", "source_concept_id": "int", "domain_id": "string",
                 "match_type": "string"}
    if links is None:
        return mentions.select("*", *[F.lit(None).cast(t).alias(c) for c, t in link_cols.items()])
    return mentions.join(links.select("concept_id", *[F.col(c).cast(t).alias(c) for c, t in link_cols.items()]),
                         "concept_id", "left")


def _changes_frame(spark, warehouse: Warehouse, mentions, ctx: _Publish, task: str, buckets: list[int]):
    """Per note of the buckets whose key differs from ``omop_state``: note_id, note_bucket, note_key (null: gone
    from the concepts table), known (in ``omop_state``) and old_omop_note_id (its OMOP note id there)."""
    from pyspark.sql import functions as F

    signature = F.concat_ws("|", *[F.coalesce(F.col(c).cast("string"), F.lit("~")) for c in (
        "concept_id", "run_id", "assertion", "grounded", "extracted_at", "omop_concept_id", "source_concept_id",
        "domain_id", "match_type", "person_value", "note_date", "note_id_value")])
    sorted_signatures = F.array_join(F.array_sort(F.collect_list(signature)), "\n")
    keys = None if mentions is None else mentions.groupBy("note_id", "note_bucket").agg(
        F.sha2(F.concat_ws("\n", F.lit(ctx.fingerprint), sorted_signatures), 256).alias("note_key"))
    state = _source_frame(spark, warehouse, "omop_state", task, buckets)
    if state is not None:
        state = state.select("note_id", F.col("note_bucket").alias("old_bucket"), F.col("note_key").alias("old_key"),
                             F.col("omop_note_id").alias("old_omop_note_id"))
    if keys is None and state is None:
        return None
    if state is None:
        return keys.select("*", F.lit(False).alias("known"), F.lit(None).cast("bigint").alias("old_omop_note_id"))
    if keys is None:
        return state.select("note_id", F.col("old_bucket").alias("note_bucket"), F.lit(None).cast("string")
                            .alias("note_key"), F.lit(True).alias("known"), "old_omop_note_id")
    joined = keys.join(state, "note_id", "full_outer")
    return joined.where(F.col("old_key").isNull() | F.col("note_key").isNull() | (F.col("old_key") != F.col("note_key"))
                        ).select("note_id", F.coalesce("note_bucket", "old_bucket").alias("note_bucket"), "note_key",
                                 F.col("old_key").isNotNull().alias("known"), "old_omop_note_id")


def _stage_pass(spark, warehouse: Warehouse, ctx: _Publish, task: str, buckets: list[int]) -> dict[str, pa.Table]:
    """Spark: find the changed notes of the buckets and stage their mentions and relations; returns the staged
    tables read back (changes, mentions, relations), empty ones for what there is not."""
    from pyspark.sql import functions as F

    from notelake.jobs.extraction.staging import stage_frame

    where = storage.join(ctx.staging, f"{task}-{buckets[0]}")
    umask = ctx.settings.job.umask
    mentions = _mentions_frame(spark, warehouse, ctx, task, buckets)
    if mentions is not None:
        mentions = mentions.persist()
    try:
        changes = _changes_frame(spark, warehouse, mentions, ctx, task, buckets)
        if changes is None:
            return {}
        stage_frame(changes, storage.join(where, "changes"), ctx.opts, umask)
        staged = {"changes": storage.read_parquet_dir(storage.join(where, "changes"), ctx.opts)}
        if staged["changes"] is None or mentions is None:
            return staged
        published = storage.read_parquet(spark, storage.join(where, "changes"), ctx.opts).where(
            F.col("note_key").isNotNull()).select("note_id")
        stage_frame(mentions.join(published, "note_id", "left_semi").select(*omop.MENTION_SCHEMA.names),
                    storage.join(where, "mentions"), ctx.opts, umask)
        relations = _source_frame(spark, warehouse, "relations", task, buckets)
        if relations is not None:
            stage_frame(relations.join(published, "note_id", "left_semi").select(
                "relation_id", "note_id", "note_bucket", "label", "head_concept_id", "tail_concept_id"),
                storage.join(where, "relations"), ctx.opts, umask)
        for name in ("mentions", "relations"):
            staged[name] = storage.read_parquet_dir(storage.join(where, name), ctx.opts)
        return staged
    finally:
        if mentions is not None:
            mentions.unpersist()
        storage.delete_tree(where, ctx.opts)


# ------------------------------------------------------------------------------------------------ driver side
_CHANGES_SCHEMA = pa.schema([("note_id", pa.string()), ("note_bucket", pa.int32()), ("note_key", pa.string()),
                             ("known", pa.bool_()), ("old_omop_note_id", pa.int64())])
_RELATIONS_SCHEMA = pa.schema([("relation_id", pa.string()), ("note_id", pa.string()), ("note_bucket", pa.int32()),
                               ("label", pa.string()),
                               ("head_concept_id", pa.string()), ("tail_concept_id", pa.string())])


def _staged(staged: dict, name: str, schema: pa.Schema) -> pa.Table:
    table = staged.get(name)
    return schema.empty_table() if table is None else table.select(schema.names).cast(schema)


def _publish_pass(spark, warehouse: Warehouse, ctx: _Publish, task: str, buckets: list[int],
                  stats: OmopStats) -> None:
    """One pass over ``buckets`` of ``task``: stage the changed notes (Spark), then assign ids and commit."""
    _commit_pass(warehouse, ctx, task, buckets, _stage_pass(spark, warehouse, ctx, task, buckets), stats)


def _commit_pass(warehouse: Warehouse, ctx: _Publish, task: str, buckets: list[int], staged: dict[str, pa.Table],
                 stats: OmopStats) -> None:
    """The driver's part of a pass: OMOP note ids and note_nlp ids, the rows, one commit per table, state last."""
    changes = _staged(staged, "changes", _CHANGES_SCHEMA)
    if not changes.num_rows:
        return
    mentions = _staged(staged, "mentions", omop.MENTION_SCHEMA)
    relations = _staged(staged, "relations", _RELATIONS_SCHEMA)
    errors: list[dict] = []
    live = changes.filter(pc.is_valid(changes["note_key"]))
    note_ids = _omop_note_ids(warehouse, ctx, task, live, mentions, errors)
    mentions = mentions.filter(pc.is_in(mentions["note_id"], pa.array(list(note_ids), pa.string())))
    old_ids = [i for i in changes["old_omop_note_id"].to_pylist() if i is not None]
    scope_ids = sorted(set(old_ids) | set(note_ids.values()))
    mention_notes = pa.array([note_ids[n] for n in mentions["note_id"].to_pylist()], pa.int64())
    nlp_ids = _note_nlp_ids(warehouse, task, buckets, scope_ids, mentions["concept_id"])
    systems = _nlp_systems(mentions)
    rows = {"note_nlp": omop.note_nlp_rows(mentions, nlp_ids, mention_notes, systems, ctx.conf.term_exists_speculated),
            "note_nlp_relation": _relation_rows(relations, mentions["concept_id"], nlp_ids, note_ids, task)}
    if ctx.conf.domain_tables or any(warehouse.version(t) is not None for t in omop.DOMAIN_TABLES.values()):
        rows.update(_derived(ctx, task, mentions, nlp_ids, mention_notes, errors, stats))
    whole = _rewrites_whole_buckets(warehouse, task, buckets, changes)
    scope = _scope(task, buckets, None if whole else scope_ids, "note_id")
    for table, data in rows.items():
        _write(warehouse, table, data, scope)
    if errors:
        warehouse.append("errors", schemas.rows_to_table(errors, schemas.ERRORS_SCHEMA))
    state = _state_rows(ctx, task, live, note_ids, rows)
    _write(warehouse, "omop_state", state,
           _scope(task, buckets) if whole else note_scope(task, set(buckets), changes["note_id"].to_pylist()))
    stats.notes_published += len(note_ids)
    stats.notes_removed += changes.num_rows - live.num_rows
    stats.notes_invalid += live.num_rows - len(note_ids)
    stats.note_nlp_rows += rows["note_nlp"].num_rows
    stats.relation_rows += rows["note_nlp_relation"].num_rows
    stats.drug_exposure_rows += rows["drug_exposure"].num_rows if "drug_exposure" in rows else 0
    stats.condition_occurrence_rows += rows["condition_occurrence"].num_rows if "condition_occurrence" in rows else 0


def _scope(task: str, buckets: list[int], omop_note_ids: list[int] | None = None, column: str = "note_id") -> str:
    """Predicate of a pass's rows in an OMOP table: the task, the buckets (partition literals) and, unless the pass
    rewrites the whole buckets, the OMOP note ids."""
    scope = f"task = '{task}' AND note_bucket IN ({', '.join(str(int(b)) for b in sorted(buckets))})"
    if omop_note_ids is not None:
        scope += f" AND {column} IN ({', '.join(str(int(i)) for i in omop_note_ids) or 'NULL'})"
    return scope


def _rewrites_whole_buckets(warehouse: Warehouse, task: str, buckets: list[int], changes: pa.Table) -> bool:
    """True when every note published in ``buckets`` is among the changes (a first publish, a vocabulary release,
    a fingerprint change): the pass then replaces whole partitions instead of naming each note (an IN-list of every
    note). The published count comes from the Delta log's per-file record counts, no rows read."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        actions = pa.table(DeltaTable(warehouse.path("omop_state"), storage_options=warehouse.storage_options or None)
                           .get_add_actions(flatten=True))
    except TableNotFoundError:
        return True
    mine = pc.and_(pc.equal(actions["partition.task"], task),
                   pc.is_in(actions["partition.note_bucket"], pa.array(buckets, pa.int32())))
    published = pc.sum(actions.filter(mine)["num_records"]).as_py() or 0
    return published == pc.sum(changes["known"].cast(pa.int64())).as_py()


def _write(warehouse: Warehouse, table: str, data: pa.Table, predicate: str | None) -> None:
    """One commit: create the table (partitioned) if missing, else replace the rows matching ``predicate`` with
    ``data`` (delta-rs replaceWhere: the data is checked against the predicate), or append when there is none."""
    from deltalake import write_deltalake

    partitions = (_PARTITIONS if "task" in data.schema.names
                  else ["note_bucket"] if table == "note_crosswalk" else None)

    def action() -> None:
        common = dict(commit_properties=warehouse.commit_properties(f"omop_{table}"),
                      storage_options=warehouse.storage_options or None)
        if warehouse.version(table) is None:
            write_deltalake(warehouse.path(table), data, mode="append", partition_by=partitions, **common)
        elif predicate is None:
            if data.num_rows:
                write_deltalake(warehouse.path(table), data, mode="append", **common)
        else:
            write_deltalake(warehouse.path(table), data, mode="overwrite", predicate=predicate, **common)

    warehouse.with_retries(table, action)


def _read_scope(warehouse: Warehouse, table: str, columns: list[str], condition) -> pa.Table | None:
    """Rows of ``table`` matching the pyarrow ``condition`` (partition columns in it prune files), or None."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        dataset = DeltaTable(warehouse.path(table), storage_options=warehouse.storage_options or None)
    except TableNotFoundError:
        return None
    return dataset.to_pyarrow_dataset().to_table(columns=columns, filter=condition)


def _reserve(warehouse: Warehouse, name: str, count: int, table: str, column: str) -> int:
    """The first of ``count`` fresh ids of sequence ``name`` (``omop_ids``), committed before any row uses them:
    never an id handed out before, even when the rows holding the highest ids were deleted since. The table's own
    highest id (Delta log statistics) is a floor, should ``omop_ids`` have been lost."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    sequences = _read_scope(warehouse, "omop_ids", ["name", "next_id"], pc.field("name") == name)
    first = max([1] + (sequences["next_id"].to_pylist() if sequences is not None else []))
    try:
        actions = pa.table(DeltaTable(warehouse.path(table), storage_options=warehouse.storage_options or None)
                           .get_add_actions(flatten=True))
        top = pc.max(actions[f"max.{column}"]).as_py() if f"max.{column}" in actions.column_names else None
    except TableNotFoundError:
        top = None
    first = max(first, (top or 0) + 1)
    warehouse.upsert("omop_ids", pa.Table.from_pylist(
        [{"name": name, "next_id": first + count, "updated_at": schemas.utc_now()}], schema=IDS_SCHEMA), key="name")
    return first


def _omop_note_ids(warehouse: Warehouse, ctx: _Publish, task: str, live: pa.Table, mentions: pa.Table,
                   errors: list[dict]) -> dict[str, int]:
    """Source note id -> OMOP note_id for the notes to publish: from the configured column (a note whose value is
    not an integer is reported and left out) or from the crosswalk, which gets new notes' ids first."""
    notes = live["note_id"].to_pylist()
    if ctx.conf.note_id_column:
        values = dict(zip(mentions["note_id"].to_pylist(), mentions["note_id_value"].to_pylist()))
        ids = {}
        for note in notes:
            value = (values.get(note) or "").strip()
            if value.lstrip("-").isdigit() and -2**63 <= int(value) < 2**63:
                ids[note] = int(value)
            else:
                errors.append(schemas.error_row(run_id=ctx.publish_id, task=task, stage="omop", note_id=note,
                                                error_type="omop_note_id_invalid", message=(
                                                    f"omop.note_id_column {ctx.conf.note_id_column!r} holds no "
                                                    "integer for this note: not published")))
        return ids
    buckets = dict(zip(notes, live["note_bucket"].to_pylist()))
    known = _read_scope(warehouse, "note_crosswalk", ["source_note_id", "note_id"],
                        pc.field("note_bucket").isin(sorted(set(buckets.values())))
                        & pc.field("source_note_id").isin(notes))
    ids = {} if known is None else dict(zip(known["source_note_id"].to_pylist(), known["note_id"].to_pylist()))
    new = sorted(n for n in notes if n not in ids)
    if new:
        first = _reserve(warehouse, "note_id", len(new), "note_crosswalk", "note_id")
        now = schemas.utc_now()
        rows = [{"note_bucket": buckets[n], "source_note_id": n, "note_id": first + k, "assigned_at": now}
                for k, n in enumerate(new)]
        _write(warehouse, "note_crosswalk", pa.Table.from_pylist(rows, schema=CROSSWALK_SCHEMA), None)
        ids.update({r["source_note_id"]: r["note_id"] for r in rows})
    return ids


def _note_nlp_ids(warehouse: Warehouse, task: str, buckets: list[int], scope_ids: list[int],
                  concept_ids: pa.ChunkedArray) -> pa.Array:
    """The note_nlp_id of each mention: the one its concept_id already has in ``note_nlp``, else a fresh one."""
    existing = _read_scope(warehouse, "note_nlp", ["concept_id", "note_nlp_id"], (pc.field("task") == task)
                           & pc.field("note_bucket").isin(buckets) & pc.field("note_id").isin(scope_ids))
    ids = {} if existing is None else dict(zip(existing["concept_id"].to_pylist(), existing["note_nlp_id"].to_pylist()))
    new = sorted(set(concept_ids.to_pylist()) - set(ids))
    if new:
        first = _reserve(warehouse, "note_nlp_id", len(new), "note_nlp", "note_nlp_id")
        ids.update({c: first + k for k, c in enumerate(new)})
    return pa.array([ids[c] for c in concept_ids.to_pylist()], pa.int64())


def _nlp_systems(mentions: pa.Table) -> pa.Array:
    """nlp_system of each mention, from its lineage (one string per distinct model and adapter)."""
    lineage = [(r["model"], r["adapter"], r["adapter_sha256"])
               for r in mentions.select(["model", "adapter", "adapter_sha256"]).to_pylist()]
    systems = {key: omop.nlp_system(__version__, *key) for key in set(lineage)}
    return pa.array([systems[key] for key in lineage], pa.string())


def _relation_rows(relations: pa.Table, concept_ids: pa.ChunkedArray, nlp_ids: pa.Array, note_ids: dict[str, int],
                   task: str) -> pa.Table:
    """note_nlp_relation rows of the published notes' relations (head and tail by their mentions' note_nlp_id);
    a relation whose head or tail is not among the mentions (never, for rows the job wrote) is left out."""
    by_concept = dict(zip(concept_ids.to_pylist(), nlp_ids.to_pylist()))
    rows = [{"relation_id": r["relation_id"], "note_id": note_ids[r["note_id"]],
             "head_note_nlp_id": by_concept[r["head_concept_id"]], "tail_note_nlp_id": by_concept[r["tail_concept_id"]],
             "relationship": r["label"], "task": task, "note_bucket": r["note_bucket"]}
            for r in relations.to_pylist()
            if r["note_id"] in note_ids and r["head_concept_id"] in by_concept and r["tail_concept_id"] in by_concept]
    return pa.Table.from_pylist(rows, schema=omop.NOTE_NLP_RELATION_SCHEMA)


def _integer(value: str | None) -> int | None:
    """An integer id written as text (a pass-through column of any type, cast to string by Spark), else None."""
    text = (value or "").strip()
    return int(text) if text.lstrip("-").isdigit() and len(text) <= 19 else None


def _derived(ctx: _Publish, task: str, mentions: pa.Table, nlp_ids: pa.Array, note_ids: pa.Array, errors: list[dict],
             stats: OmopStats) -> dict[str, pa.Table]:
    """drug_exposure and condition_occurrence rows of the derivable mentions (none when omop.domain_tables is off:
    the tables are then emptied of the republished notes). A note whose derivable mentions lack a person id or a
    date gets one errors row per reason; its note_nlp rows are published all the same."""
    persons = pa.array([_integer(v) for v in mentions["person_value"].to_pylist()], pa.int64())
    has_date = pc.is_valid(mentions["note_date"])
    out = {}
    for domain, table in omop.DOMAIN_TABLES.items():
        wanted = pc.fill_null(omop.derivable(mentions, domain), False)
        if not ctx.conf.domain_tables:
            wanted = pa.array([False] * mentions.num_rows, pa.bool_())
        usable = pc.and_(wanted, pc.and_(pc.is_valid(persons), has_date))
        for reason, column, bad in (
                ("omop_person_id_invalid", "person_id_column", pc.and_(wanted, pc.is_null(persons))),
                ("omop_note_date_missing", "note_date_column", pc.and_(wanted, pc.invert(has_date)))):
            for note in sorted(set(mentions.filter(bad)["note_id"].to_pylist())):
                errors.append(schemas.error_row(
                    run_id=ctx.publish_id, task=task, stage="omop", note_id=note, error_type=reason,
                    message=f"no {table} rows derived for this note: omop.{column} holds no usable value"))
        stats.derived_skipped += pc.sum(pc.and_(wanted, pc.invert(usable)).cast(pa.int64())).as_py() or 0
        keep = mentions.filter(usable)
        out[table] = omop.derived_rows(domain, keep, nlp_ids.filter(usable), note_ids.filter(usable),
                                       persons.filter(usable), ctx.type_concept_id or 0)
    return out


def _state_rows(ctx: _Publish, task: str, live: pa.Table, note_ids: dict[str, int],
                rows: dict[str, pa.Table]) -> pa.Table:
    """``omop_state`` rows of the pass's notes still in the concepts table (published or invalid)."""
    def per_note(table: pa.Table) -> dict[int, int]:
        if not table.num_rows:
            return {}
        counts = table.group_by("note_id").aggregate([("note_id", "count")])
        return dict(zip(counts["note_id"].to_pylist(), counts["note_id_count"].to_pylist()))

    nlp = per_note(rows["note_nlp"])
    derived: dict[int, int] = {}
    for name in omop.DOMAIN_TABLES.values():
        for note, n in per_note(rows.get(name, pa.table({"note_id": pa.array([], pa.int64())}))).items():
            derived[note] = derived.get(note, 0) + n
    now = schemas.utc_now()
    records = []
    for note, bucket, key in zip(live["note_id"].to_pylist(), live["note_bucket"].to_pylist(),
                                 live["note_key"].to_pylist()):
        omop_id = note_ids.get(note)
        records.append({"task": task, "note_bucket": bucket, "note_id": note, "omop_note_id": omop_id,
                        "note_key": key, "note_nlp_rows": nlp.get(omop_id, 0), "derived_rows": derived.get(omop_id, 0),
                        "publish_id": ctx.publish_id, "published_at": now})
    return pa.Table.from_pylist(records, schema=STATE_SCHEMA)


def _record_publish(warehouse: Warehouse, ctx: _Publish, tasks: list[str], versions: dict, stats: OmopStats,
                    started) -> None:
    """The publish's row in ``omop_publish``: the source versions the next publish compares against."""
    row = {"publish_id": ctx.publish_id, "status": "succeeded", "fingerprint": ctx.fingerprint,
           "tasks": ",".join(tasks), "source_versions_json": json.dumps(versions, sort_keys=True),
           "table_versions_json": json.dumps({t: warehouse.version(t) for t in (*OUTPUT_TABLES, "omop_state")}),
           "stats_json": json.dumps(asdict(stats), sort_keys=True), "started_at": started,
           "ended_at": schemas.utc_now()}
    warehouse.upsert("omop_publish", pa.Table.from_pylist([row], schema=PUBLISH_SCHEMA), key="publish_id")


# ------------------------------------------------------------------------------------------------ command line
def run(settings: Settings, output: str, tasks: list[str], spark=None) -> OmopStats:
    """Publish ``tasks`` of ``output`` holding the output's lock (its fence checked before every commit); raises
    ConfigError, OmopError, LockedError, OutputWriteError."""
    from notelake.jobs.guards import output_lock, resolve_output, restrictive_umask
    from notelake.jobs.warehouse import open_warehouse

    out = resolve_output(output, settings.job.output_root)
    opts = storage.settings_options(settings)
    with restrictive_umask(settings.job.umask):
        with output_lock(out, f"omop-{uuid.uuid4().hex}", settings.job.lock_timeout_s, opts,
                         ttl_s=settings.job.lease_ttl_s) as lock:
            warehouse = open_warehouse(out, {"notelake.operation": "omop", "notelake.omop_stage": OMOP_STAGE_VERSION},
                                       opts, fence=lock.check)
            if spark is None:
                from notelake.jobs.extraction.session import start_spark

                spark = start_spark(settings, app_name="notelake-omop")
            return publish_omop(spark, warehouse, settings, tasks)


def main(argv: list[str] | None = None) -> int:
    """``notelake omop``: exit 0 when published, 2 for a configuration or input to fix, 3 when another run holds
    the output, 4 when a table cannot be written, 5 for any other failure (logged as one line without note text)."""
    p = argparse.ArgumentParser(prog="notelake omop", description="publish the concepts as OMOP CDM v5.4 tables "
                                                                  "(note_nlp, note_nlp_relation, derived rows)")
    p.add_argument("--output", required=True, help="warehouse written by the extract job")
    p.add_argument("--conf", default=None, help="settings YAML (omop section; default conf/local.yaml)")
    p.add_argument("--task", default=None, help="task(s), comma-separated (default: job.task of the settings)")
    args = p.parse_args(argv)
    from notelake.conf import load_settings
    from notelake.jobs.cli_common import configure_command_logging, run_command

    configure_command_logging()

    def publish() -> dict:
        settings = load_settings(args.conf)
        stats = run(settings, args.output, (args.task or settings.job.task).split(","))
        return {k: v for k, v in asdict(stats).items() if k != "fingerprint"}

    return run_command("omop publish", publish, usage_errors=(OmopError,))


if __name__ == "__main__":
    sys.exit(main())
