"""The driver side of a publish: OMOP ids (crosswalk, note_nlp ids, reserved ranges), the CDM rows built from the
staged mentions, and their commits bucket by bucket."""

from __future__ import annotations

import json
from dataclasses import asdict

import pyarrow as pa
import pyarrow.compute as pc

from notelake import __version__
from notelake.jobs.warehouse import Warehouse, note_scope
from notelake.udfs import omop, schemas
from notelake.jobs.omop.stage import _stage_pass
from notelake.jobs.omop.state import (CROSSWALK_SCHEMA, IDS_SCHEMA, OUTPUT_TABLES, OmopStats, PUBLISH_SCHEMA,
                                      STATE_SCHEMA, _PARTITIONS, _Publish)


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
