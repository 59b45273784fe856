"""The link runs on the driver: which buckets need links (fingerprints, stale rows), passes of a few buckets,
one Delta MERGE per pass, and the link state file."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from notelake.conf import ConfigError, Settings
from notelake.conf.settings import OmopConfig
from notelake.conf.task import Task
from notelake.jobs import storage
from notelake.udfs import schemas
from notelake.jobs.linking.executors import finish_links
from notelake.jobs.linking.lexicon import (LINKS_TABLE, LinkPlan, LinkStats, Vocabulary, _DDL_TYPES, _EXECUTOR_DDL,
                                           _EXECUTOR_FIELDS, _PARTITIONS, _normalize_udf, build_lexicon,
                                           fuzzy_entries, open_vocabulary, plan_links, resolve_exact)

log = logging.getLogger("notelake.linking")


@dataclass
class _Run:
    """One link run's Spark inputs and results so far."""

    spark: object
    warehouse: object
    plan: LinkPlan
    vocabulary: Vocabulary
    omop: OmopConfig
    opts: dict[str, str]
    concepts: object  # DataFrame: the concepts rows of the run's tasks, with target and fingerprint
    links: object | None  # DataFrame: the link rows of those tasks (concept_id, task, old fingerprint)
    linked_at: datetime
    stats: LinkStats
    resolved: object | None = None
    broadcast: object | None = None
    unmapped: Counter = field(default_factory=Counter)

    def prepare_lexicon(self) -> None:
        """Build the lexicon once, at the first pass that has rows to link (a rerun with none never reads it)."""
        if self.resolved is not None:
            return
        lexicon = build_lexicon(self.spark, self.vocabulary, self.plan.targets, self.opts).persist()
        self.resolved = resolve_exact(lexicon).persist()
        # "run": a key for the executors' FuzzyLexicon cache, fresh per run (a Python worker outlives a run)
        self.broadcast = self.spark.sparkContext.broadcast({"run": uuid.uuid4().hex,
                                                            "targets": fuzzy_entries(lexicon)})
        self.resolved.count()
        lexicon.unpersist()


def _concepts_with_targets(spark, warehouse, plan: LinkPlan, tasks: list[str], opts: dict[str, str]):
    """The concepts rows of ``tasks`` (no text column beyond the mention) with their target and fingerprint."""
    from pyspark.sql import functions as F

    from notelake.jobs.warehouse import read_snapshot_spark

    concepts = read_snapshot_spark(spark, warehouse.path("concepts"), opts)
    labels = spark.createDataFrame(plan.label_rows(), "task string, label string, target string, fp string") \
        if plan.labels else None
    rows = concepts.where(F.col("task").isin(tasks)).select("concept_id", "note_id", "task", "note_bucket", "label",
                                                             "text")
    if labels is not None:
        rows = rows.join(F.broadcast(labels), ["task", "label"], "left")
    else:
        rows = rows.withColumn("target", F.lit(None).cast("string")).withColumn("fp", F.lit(None).cast("string"))
    unmapped = F.create_map(*[F.lit(x) for kv in plan.unmapped.items() for x in kv])
    return rows.withColumn("link_fingerprint", F.coalesce(F.col("fp"), unmapped[F.col("task")])).drop("fp")


def _bucket_work(run: _Run) -> list[tuple[str, int, int, int]]:
    """(task, note_bucket, rows to link, link rows to remove) of every bucket with work; one Spark aggregation
    over ids and fingerprints."""
    from pyspark.sql import functions as F

    current = run.concepts.select("task", "concept_id", "note_bucket", "link_fingerprint")
    if run.links is None:
        both = current.withColumn("old_fp", F.lit(None).cast("string"))
    else:
        old = run.links.select("task", "concept_id", F.col("note_bucket").alias("old_bucket"),
                               F.col("link_fingerprint").alias("old_fp"))
        both = current.join(old, ["task", "concept_id"], "full_outer").withColumn(
            "note_bucket", F.coalesce("note_bucket", "old_bucket"))
    todo = F.col("link_fingerprint").isNotNull() & (F.col("old_fp").isNull()
                                                    | (F.col("old_fp") != F.col("link_fingerprint")))
    gone = F.col("link_fingerprint").isNull()
    counts = both.groupBy("task", "note_bucket").agg(
        F.sum(todo.cast("long")).alias("todo"), F.sum(gone.cast("long")).alias("gone"))
    return sorted((r.task, r.note_bucket, r.todo, r.gone) for r in counts.where("todo > 0 OR gone > 0").collect())


def plan_passes(work: list[tuple[str, int, int, int]], rows_per_pass: int) -> list[tuple[str, list[int]]]:
    """Consecutive buckets of one task per pass, taken whole until the next would pass ``rows_per_pass`` rows."""
    passes: list[tuple[str, list[int]]] = []
    size = 0
    for task, bucket, todo, gone in work:
        rows = todo + gone
        if passes and passes[-1][0] == task and size + rows <= rows_per_pass:
            passes[-1][1].append(bucket)
            size += rows
        else:
            passes.append((task, [bucket]))
            size = rows
    return passes


def _scope(task: str, buckets: list[int], alias: str = "") -> str:
    col = f"{alias}." if alias else ""
    bucket_list = ", ".join(str(int(b)) for b in sorted(buckets))
    return f"{col}task = '{task.replace(chr(39), chr(39) * 2)}' AND {col}note_bucket IN ({bucket_list})"


def _gone_rows(run: _Run, scope):
    """The pass's link rows whose concepts row no longer exists, as ``_gone`` rows."""
    from pyspark.sql import functions as F

    gone = run.links.where(scope).select("task", "concept_id", "note_id", "note_bucket", "label").join(
        run.concepts.where(scope).select("task", "concept_id"), ["task", "concept_id"], "left_anti")
    filler = [F.lit(None).cast(_DDL_TYPES[f.type]).alias(f.name) for f in _EXECUTOR_FIELDS if f.name not in gone.columns]
    return gone.select("*", *filler, F.lit(True).alias("_gone"))


def _link_pass(run: _Run, task: str, buckets: list[int]) -> pa.Table:
    """The link rows of one pass, and ``_gone`` rows naming the link rows to remove, collected as Arrow."""
    from pyspark.sql import functions as F

    scope = F.expr(_scope(task, buckets))
    parts = [] if run.links is None else [_gone_rows(run, scope)]
    if run.resolved is not None:
        rows = run.concepts.where(scope)
        if run.links is not None:
            old = run.links.where(scope).select("task", "concept_id", F.col("link_fingerprint").alias("old_fp"))
            rows = rows.join(old, ["task", "concept_id"], "left").where(
                F.col("old_fp").isNull() | (F.col("old_fp") != F.col("link_fingerprint"))).drop("old_fp")
        keyed = rows.withColumn("norm", _normalize_udf()(F.col("text"))).drop("text")
        joined = keyed.join(run.resolved, ["target", "norm"], "left")
        broadcast, omop = run.broadcast, run.omop.model_dump()

        def finish(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            for batch in batches:
                yield finish_links(batch, broadcast, omop)

        parts.insert(0, joined.mapInArrow(finish, _EXECUTOR_DDL).withColumn("_gone", F.lit(False)))
    from functools import reduce

    from pyspark.sql import DataFrame

    return reduce(DataFrame.unionByName, parts).toArrow()


def _commit(run: _Run, task: str, buckets: list[int], rows: pa.Table) -> None:
    """One MERGE into concept_links: the pass's rows replace or join theirs, ``_gone`` rows remove theirs."""
    from deltalake import DeltaTable, write_deltalake

    warehouse = run.warehouse
    path = warehouse.path(LINKS_TABLE)
    gone = rows["_gone"]
    data = pa.table({f.name: (rows[f.name] if f.name in rows.column_names else None) for f in _EXECUTOR_FIELDS})
    data = data.append_column("vocabulary_version", pa.array([run.vocabulary.release] * rows.num_rows, pa.string()))
    data = data.append_column("linked_at", pa.array([run.linked_at] * rows.num_rows, schemas.TIMESTAMP))
    keep = pc.invert(gone)
    new = data.filter(keep).cast(schemas.CONCEPT_LINKS_SCHEMA)
    properties = warehouse.commit_properties("link")
    if warehouse.version(LINKS_TABLE) is None:
        warehouse.with_retries(LINKS_TABLE, lambda: write_deltalake(
            path, new, mode="append", partition_by=_PARTITIONS, commit_properties=properties,
            storage_options=warehouse.storage_options))
        return
    source = pa.Table.from_arrays([*(data[f.name].cast(f.type) for f in schemas.CONCEPT_LINKS_SCHEMA), gone],
                                  names=[*schemas.CONCEPT_LINKS_SCHEMA.names, "_gone"])
    columns = {name: f"s.{name}" for name in schemas.CONCEPT_LINKS_SCHEMA.names}
    predicate = f"t.task = s.task AND t.concept_id = s.concept_id AND {_scope(task, buckets, alias='t')}"
    warehouse.with_retries(LINKS_TABLE, lambda: (
        DeltaTable(path, storage_options=warehouse.storage_options)
        .merge(source, predicate=predicate, source_alias="s", target_alias="t", commit_properties=properties)
        .when_matched_delete(predicate="s._gone")
        .when_matched_update(updates=columns, predicate="NOT s._gone")
        .when_not_matched_insert(updates=columns, predicate="NOT s._gone")
        .execute()))


STATE_FILE = "_notelake_links.json"


def _link_state(warehouse, plan: LinkPlan) -> dict:
    """What the links of ``plan``'s tasks depend on: the concepts and link tables' versions and the fingerprints."""
    return {"concepts": warehouse.version("concepts"), "links": warehouse.version(LINKS_TABLE),
            "fingerprints": {f"{task}/{label}": fp for (task, label), (_, fp) in sorted(plan.labels.items())},
            "unmapped": dict(sorted(plan.unmapped.items()))}


def _stored_state(warehouse, plan: LinkPlan) -> dict | None:
    """The state recorded by the last run that linked the same tasks (None if none): equal to the current one,
    nothing changed since and a run has nothing to do (no Spark job at all)."""
    text = storage.read_text(storage.join(warehouse.root, STATE_FILE), warehouse.storage_options)
    runs = json.loads(text) if text else {}
    return runs.get(",".join(sorted(plan.unmapped)))


def _store_state(warehouse, state: dict) -> None:
    location = storage.join(warehouse.root, STATE_FILE)
    text = storage.read_text(location, warehouse.storage_options)
    runs = json.loads(text) if text else {}
    runs[",".join(sorted(state["unmapped"]))] = state
    storage.write_text(location, json.dumps(runs, indent=1, sort_keys=True) + "\n", warehouse.storage_options)


def link_concepts(spark, warehouse, settings: Settings, tasks: list[Task]) -> LinkStats:
    """Link the concepts rows of ``tasks`` in ``warehouse`` (a :class:`notelake.jobs.warehouse.Warehouse`) to the
    vocabulary (``settings.omop.vocabulary``, default ``<warehouse>/vocabulary``): only rows without a link under
    the current fingerprint, and remove the link rows of concepts gone. Idempotent; the caller holds the output's
    run lock. A missing vocabulary skips linking with one warning (a ConfigError when one was configured)."""
    started = time.monotonic()
    omop, opts = settings.omop, dict(warehouse.storage_options)
    root = omop.vocabulary or storage.join(warehouse.root, "vocabulary")
    vocabulary = open_vocabulary(root, opts)
    if vocabulary is None:
        if omop.vocabulary:
            raise ConfigError(f"omop.vocabulary: no vocabulary tables at {root} (load them with notelake vocab load)")
        log.warning("no vocabulary at %s: concepts are not linked (notelake vocab load --athena DIR --output %s)",
                    root, warehouse.root)
        return LinkStats(skipped=f"no vocabulary at {root}")
    from pyspark.sql import functions as F

    from notelake.jobs.warehouse import read_snapshot_spark

    plan = plan_links(tasks, omop, vocabulary)
    stats = LinkStats(vocabulary_release=vocabulary.release)
    state = _link_state(warehouse, plan)
    if state["concepts"] is None or state == _stored_state(warehouse, plan):
        stats.seconds = time.monotonic() - started
        log.info("concept links up to date (concepts table version %s, vocabulary %r)", state["concepts"],
                 vocabulary.release)
        return stats
    concepts = _concepts_with_targets(spark, warehouse, plan, [t.name for t in tasks], opts)
    links = read_snapshot_spark(spark, warehouse.path(LINKS_TABLE), opts)
    if links is not None:
        links = links.where(F.col("task").isin([t.name for t in tasks]))
    run = _Run(spark, warehouse, plan, vocabulary, omop, opts, concepts, links,
               datetime.now(timezone.utc), stats)
    try:
        _run_passes(run)
    finally:
        if run.resolved is not None:
            run.resolved.unpersist()
            run.broadcast.destroy()
    _store_state(warehouse, {**state, "links": warehouse.version(LINKS_TABLE)})
    if run.unmapped:
        log.warning("labels with no vocabulary target (no normalization: entry in their task) were left unlinked: "
                    "%s", ", ".join(f"{task}/{label} ({n} rows)" for (task, label), n in sorted(run.unmapped.items())))
    stats.seconds = time.monotonic() - started
    log.info("linked %d concepts rows against vocabulary %r in %d passes (%s), removed %d stale link rows, %.1f s",
             stats.linked, vocabulary.release, stats.passes,
             ", ".join(f"{k} {v}" for k, v in sorted(stats.by_match_type.items())), stats.removed, stats.seconds)
    return stats


def _run_passes(run: _Run) -> None:
    work = _bucket_work(run)
    for task, buckets in plan_passes(work, run.omop.link_rows_per_pass):
        if any(todo for t, b, todo, _ in work if t == task and b in buckets):
            run.prepare_lexicon()
        rows = _link_pass(run, task, buckets)
        if not rows.num_rows:
            continue
        _commit(run, task, buckets, rows)
        linked = rows.filter(pc.invert(rows["_gone"]))
        run.stats.passes += 1
        run.stats.removed += rows.num_rows - linked.num_rows
        run.stats.linked += linked.num_rows
        for match, n in Counter(linked["match_type"].to_pylist()).items():
            run.stats.by_match_type[match] = run.stats.by_match_type.get(match, 0) + n
        unmapped = linked.filter(pc.equal(linked["match_type"], "unmapped_label"))
        run.unmapped.update((task, label) for label in unmapped["label"].to_pylist())
