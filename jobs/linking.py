"""The link stage: every concepts row linked to a standard concept of the site's OMOP vocabulary (``concept_links``).

    notelake link --output <warehouse> [--conf conf/local.yaml] [--task phee[,maccrobat]] [--vocabulary URI]

(also :func:`link_concepts`, which the extraction job calls after its rounds). One ``concept_links`` row per
``concepts`` row, partitioned like it by ``task`` and ``note_bucket`` (schema: ``udfs.schemas.CONCEPT_LINKS_SCHEMA``).

Where a label's mentions are looked up is the task's ``normalization:`` section (domains, vocabularies, concept
classes, in order of preference). Matching, first hit wins, on normalized text (``udfs.normalize``):

1. ``exact``: a name or synonym of a **valid standard** concept of the label's target (standard_concept 'S',
   invalid_reason null);
2. ``maps_to``: a name or synonym of a non-standard concept with a **valid** ``Maps to`` to such a concept; the
   non-standard concept is kept as ``source_concept_id`` (it may itself be deprecated, as in OMOP's source
   mappings);
3. ``fuzzy``: the most similar lexicon entry (``udfs.matching``) when at least ``omop.fuzzy_threshold`` similar and
   ``omop.fuzzy_margin`` more than any other concept's;

else concept 0 (``none``, or ``ambiguous`` when several concepts fit equally), never a guess. When one normalized
term names several concepts at the same step, the concept's own name beats a synonym, then the label's earlier
domain, then its earlier vocabulary; concepts still tied are ``ambiguous`` (0): a lowest-id rule would be a coin
toss a terminologist could not defend. Several non-standard concepts of one name that map to the same standard
concept give that concept, with the lowest of their ids as the source. A label without a ``normalization:`` entry
is ``unmapped_label`` (0), with one warning per run naming such labels.

It runs in Spark: the lexicon of each target (the vocabulary filtered to it) is built and resolved with joins, the
mentions are matched to it with a join, and the rest go through the fuzzy step inside ``mapInArrow`` with that
lexicon broadcast. Mention text stays on the executors; the driver sees per-bucket counts and link rows (ids,
concept ids, scores).

Incremental: each label has a **link fingerprint** (linker and normalizer versions, matching settings, the label's
target, every vocabulary's version), separate from the extraction fingerprint. A run links the concepts rows
with no link row or one under another fingerprint (a vocabulary release re-links every stored concept without a
model call; concepts of re-extracted notes are new rows) and removes the link rows of concepts that no longer
exist. It works a few note buckets at a time (``omop.link_rows_per_pass``), one Delta MERGE per pass; a rerun
changes nothing.

Exit codes (CLI): 0 linked (or nothing to link); 2 bad config or flags, or a configured vocabulary that is not
there; 3 another run holds the output's lock; 4 the link table could not be written; 5 any other failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from notelake.conf import ConfigError, Settings
from notelake.conf.settings import OmopConfig
from notelake.conf.task import LabelNormalization, Task
from notelake.jobs import storage
from notelake.udfs import schemas
from notelake.udfs.hashing import link_fingerprint
from notelake.udfs.matching import FuzzyLexicon
from notelake.udfs.normalize import NORMALIZER_VERSION, normalize_term
from notelake.udfs.vocabulary import release_name, release_versions

log = logging.getLogger("notelake.linking")

LINKER_VERSION = "l1"
LINKS_TABLE = "concept_links"
_PARTITIONS = ["task", "note_bucket"]
_MATCHED = ("exact", "maps_to")
# the columns the executors produce; the driver adds vocabulary_version and linked_at
_EXECUTOR_FIELDS = [f for f in schemas.CONCEPT_LINKS_SCHEMA if f.name not in ("vocabulary_version", "linked_at")]
_DDL_TYPES = {pa.string(): "string", pa.int32(): "int", pa.float64(): "double"}
_EXECUTOR_DDL = ", ".join(f"{f.name} {_DDL_TYPES[f.type]}" for f in _EXECUTOR_FIELDS)


@dataclass
class LinkStats:
    """What a link run did (counts of concepts rows; no text)."""

    vocabulary_release: str | None = None
    linked: int = 0  # rows (re)linked
    removed: int = 0  # link rows of concepts that no longer exist
    passes: int = 0
    seconds: float = 0.0
    by_match_type: dict[str, int] = field(default_factory=dict)
    skipped: str | None = None  # why nothing was linked (no vocabulary)


@dataclass(frozen=True)
class Vocabulary:
    """The vocabulary a run links against: where its Delta tables are and its release."""

    root: str
    versions: dict[str, str | None]

    @property
    def release(self) -> str:
        return release_name(self.versions)


def open_vocabulary(root: str, opts: dict[str, str] | None = None) -> Vocabulary | None:
    """The vocabulary under ``root`` (its ``vocabulary`` table gives the versions), or None when it has none."""
    from notelake.jobs.warehouse import read_delta_arrow

    if read_delta_arrow(storage.join(root, "concept"), columns=["concept_id"], opts=opts) is None:
        return None
    table = read_delta_arrow(storage.join(root, "vocabulary"), columns=["vocabulary_id", "vocabulary_version"],
                             opts=opts)
    return None if table is None else Vocabulary(root, release_versions(table))


def linker_identity(omop: OmopConfig) -> dict:
    """The linker's share of every link fingerprint: versions and the settings that change a link."""
    return {"linker": LINKER_VERSION, "normalizer": NORMALIZER_VERSION, "scorer": omop.fuzzy_scorer,
            "threshold": omop.fuzzy_threshold, "margin": omop.fuzzy_margin, "min_chars": omop.fuzzy_min_chars}


@dataclass(frozen=True)
class LinkPlan:
    """Per (task, label): the target's key (None: unmapped) and the link fingerprint; targets by key."""

    labels: dict[tuple[str, str], tuple[str | None, str]]
    targets: dict[str, LabelNormalization]
    unmapped: dict[str, str]  # task -> fingerprint of its labels without a target

    def label_rows(self) -> list[dict]:
        return [{"task": task, "label": label, "target": key, "fp": fp}
                for (task, label), (key, fp) in sorted(self.labels.items())]


def plan_links(tasks: list[Task], omop: OmopConfig, vocabulary: Vocabulary) -> LinkPlan:
    """The fingerprints and targets of every label of ``tasks`` (labels sharing a target share its lexicon)."""
    linker = linker_identity(omop)
    labels, targets, unmapped = {}, {}, {}
    for task in tasks:
        unmapped[task.name] = link_fingerprint(linker, None, vocabulary.versions)
        for label, target in task.normalization.items():
            spec = target.model_dump(mode="json")
            key = link_fingerprint({}, spec, {})  # the target alone: the lexicon's key
            targets[key] = target
            labels[(task.name, label)] = (key, link_fingerprint(linker, spec, vocabulary.versions))
    return LinkPlan(labels, targets, unmapped)


# ------------------------------------------------------------------------------------------------------ lexicon
def _normalize_series(terms: pd.Series) -> pd.Series:
    return terms.map(normalize_term, na_action="ignore")


def _normalize_udf():
    """``normalize_term`` as a vectorized Spark UDF (mentions and vocabulary terms alike)."""
    from pyspark.sql import functions as F

    return F.pandas_udf(_normalize_series, "string")


def _rank_col(column: str, preferred: list[str]):
    """1 + the position of ``column``'s value in ``preferred`` (0 when the list is empty: no preference)."""
    from pyspark.sql import functions as F

    if not preferred:
        return F.lit(0)
    return F.array_position(F.array(*[F.lit(v) for v in preferred]), F.col(column))


def build_lexicon(spark, vocabulary: Vocabulary, targets: dict[str, LabelNormalization], opts: dict[str, str]):
    """Every (target, normalized term, standard concept) entry: names and synonyms of the target's valid standard
    concepts (kind 0) and of non-standard concepts with a valid 'Maps to' to one of them (kind 1), with the
    preference ranks that break ties (name before synonym, then domain and vocabulary order)."""
    from functools import reduce

    from pyspark.sql import DataFrame
    from pyspark.sql import functions as F

    from notelake.jobs.warehouse import read_snapshot_spark

    def table(name: str):
        frame = read_snapshot_spark(spark, storage.join(vocabulary.root, name), opts)
        if frame is None:
            raise ConfigError(f"vocabulary at {vocabulary.root} has no {name} table (load it with notelake vocab load)")
        return frame

    concept, synonym, relationship = table("concept"), table("concept_synonym"), table("concept_relationship")
    standard = concept.where((F.col("standard_concept") == "S") & F.col("invalid_reason").isNull())
    per_target = []
    for key, target in targets.items():
        chosen = standard.where(F.col("domain_id").isin(target.domains))
        if target.vocabularies:
            chosen = chosen.where(F.col("vocabulary_id").isin(target.vocabularies))
        if target.concept_classes:
            chosen = chosen.where(F.col("concept_class_id").isin(target.concept_classes))
        per_target.append(chosen.select(
            F.lit(key).alias("target"), F.col("concept_id").alias("omop_concept_id"), "vocabulary_id", "domain_id",
            _rank_col("domain_id", target.domains).alias("domain_rank"),
            _rank_col("vocabulary_id", target.vocabularies).alias("vocab_rank")))
    chosen = reduce(DataFrame.unionByName, per_target)
    names = concept.select("concept_id", F.col("concept_name").alias("term"), F.lit(0).alias("name_rank")).unionByName(
        synonym.select("concept_id", F.col("concept_synonym_name").alias("term"), F.lit(1).alias("name_rank")))
    direct = chosen.join(names, chosen.omop_concept_id == names.concept_id).select(
        chosen["*"], F.col("omop_concept_id").alias("source_concept_id"), "term", "name_rank", F.lit(0).alias("kind"))
    sources = concept.where(F.col("standard_concept").isNull() | (F.col("standard_concept") != "S")).select(
        F.col("concept_id").alias("source_concept_id"))
    maps_to = relationship.where((F.col("relationship_id") == "Maps to") & F.col("invalid_reason").isNull()
                                 & (F.col("concept_id_1") != F.col("concept_id_2"))).select(
        F.col("concept_id_1").alias("source_concept_id"), F.col("concept_id_2").alias("omop_concept_id"))
    mapped = (chosen.join(maps_to, "omop_concept_id").join(sources, "source_concept_id")
              .join(names, F.col("source_concept_id") == names.concept_id)
              .select(chosen["*"], "source_concept_id", "term", "name_rank", F.lit(1).alias("kind")))
    return (direct.unionByName(mapped).withColumn("norm", _normalize_udf()(F.col("term"))).drop("term")
            .where(F.col("norm") != "").distinct())


def resolve_exact(lexicon):
    """One row per (target, normalized term): the concept it names (``exact`` or ``maps_to``), or ``ambiguous``
    (concept 0) when the best-ranked entries name several concepts."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    order = ["kind", "name_rank", "domain_rank", "vocab_rank"]
    best = lexicon.withColumn("rank", F.dense_rank().over(
        Window.partitionBy("target", "norm").orderBy(*order))).where(F.col("rank") == 1)
    grouped = best.groupBy("target", "norm").agg(
        F.countDistinct("omop_concept_id").alias("concepts"), F.min("omop_concept_id").alias("omop_concept_id"),
        F.min("source_concept_id").alias("source_concept_id"), F.first("vocabulary_id").alias("vocabulary_id"),
        F.first("domain_id").alias("domain_id"), F.first("kind").alias("kind"))
    single = F.col("concepts") == 1
    return grouped.select(
        "target", "norm",
        F.when(single, F.col("omop_concept_id")).otherwise(0).alias("r_omop"),
        F.when(single, F.col("source_concept_id")).otherwise(0).alias("r_source"),
        F.when(single, F.col("vocabulary_id")).alias("r_vocabulary"),
        F.when(single, F.col("domain_id")).alias("r_domain"),
        F.when(~single, "ambiguous").when(F.col("kind") == 0, "exact").otherwise("maps_to").alias("r_match"))


def fuzzy_entries(lexicon) -> dict[str, dict[str, list]]:
    """Per target, the entries the fuzzy step compares, in order of preference, one per (term, concept): collected
    to the driver once per run to be broadcast (vocabulary terms only, no note text)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    order = ["kind", "name_rank", "domain_rank", "vocab_rank", "source_concept_id"]
    first = lexicon.withColumn("pick", F.row_number().over(
        Window.partitionBy("target", "norm", "omop_concept_id").orderBy(*order))).where(F.col("pick") == 1)
    table = first.select("target", "norm", "omop_concept_id", "source_concept_id", "vocabulary_id", "domain_id",
                         *order[:-1]).toArrow()
    table = table.sort_by([("target", "ascending"), *[(c, "ascending") for c in order[:-1]],
                           ("norm", "ascending"), ("omop_concept_id", "ascending")])
    entries: dict[str, dict[str, list]] = {}
    for key in pc.unique(table["target"]).to_pylist():
        part = table.filter(pc.equal(table["target"], key))
        entries[key] = {c: part[c].to_pylist() for c in
                        ("norm", "omop_concept_id", "source_concept_id", "vocabulary_id", "domain_id")}
    return entries


# ------------------------------------------------------------------------------------------------------ executors
_FUZZY: dict[tuple[str, str], FuzzyLexicon] = {}


def _fuzzy_lexicon(broadcast, key: str, omop: dict) -> FuzzyLexicon:
    """One FuzzyLexicon per target and run in each Python worker (workers are reused across runs)."""
    cache_key = (broadcast.value["run"], key)
    if cache_key not in _FUZZY:
        entries = broadcast.value["targets"][key]
        _FUZZY[cache_key] = FuzzyLexicon(entries["norm"], entries["omop_concept_id"], scorer=omop["fuzzy_scorer"],
                                         threshold=omop["fuzzy_threshold"], margin=omop["fuzzy_margin"],
                                         min_chars=omop["fuzzy_min_chars"])
    return _FUZZY[cache_key]


def finish_links(batch: pa.RecordBatch, broadcast, omop: dict) -> pa.RecordBatch:
    """Link rows for a batch of mentions after the exact join: exact and maps_to hits as joined, unmapped labels
    as such, the rest through the fuzzy step of their target."""
    rows = batch.to_pydict()
    n = batch.num_rows
    out = {f.name: [None] * n for f in _EXECUTOR_FIELDS}
    for name in ("concept_id", "note_id", "task", "note_bucket", "label", "link_fingerprint"):
        out[name] = rows[name]
    pending: dict[str, list[int]] = {}
    for i in range(n):
        if rows["target"][i] is None:
            _set(out, i, 0, 0, None, None, "unmapped_label", 0.0)
        elif rows["r_match"][i] is not None:
            _set(out, i, rows["r_omop"][i], rows["r_source"][i], rows["r_vocabulary"][i], rows["r_domain"][i],
                 rows["r_match"][i], 1.0)
        elif rows["target"][i] not in broadcast.value["targets"]:  # the vocabulary has no concept for the target
            _set(out, i, 0, 0, None, None, "none", 0.0)
        else:
            pending.setdefault(rows["target"][i], []).append(i)
    for key, positions in pending.items():
        lexicon = _fuzzy_lexicon(broadcast, key, omop)
        entries = broadcast.value["targets"][key]
        for i, result in zip(positions, lexicon.lookup([rows["norm"][i] or "" for i in positions])):
            if result.status == "fuzzy":
                e = result.entry
                _set(out, i, entries["omop_concept_id"][e], entries["source_concept_id"][e],
                     entries["vocabulary_id"][e], entries["domain_id"][e], "fuzzy", result.score)
            else:
                _set(out, i, 0, 0, None, None, result.status, result.score)
    return pa.RecordBatch.from_pydict(out, schema=pa.schema(_EXECUTOR_FIELDS))


def _set(out: dict, i: int, omop: int, source: int, vocabulary: str | None, domain: str | None, match: str,
         score: float) -> None:
    # six values of one link decision, written by every branch of finish_links
    out["omop_concept_id"][i], out["source_concept_id"][i] = omop, source
    out["vocabulary_id"][i], out["domain_id"][i] = vocabulary, domain
    out["match_type"][i], out["match_score"][i] = match, float(score)


# ------------------------------------------------------------------------------------------------------ driver
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


# ------------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="notelake link", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="warehouse written by the extraction job")
    p.add_argument("--conf", default=None, help="settings YAML (default: conf/local.yaml)")
    p.add_argument("--task", default=None, help="task(s) to link, comma-separated (default: job.task)")
    p.add_argument("--vocabulary", default=None, help="vocabulary tables' location (default: omop.vocabulary, "
                                                      "else <output>/vocabulary)")
    return p


def run(settings: Settings, output: str, spark=None) -> LinkStats:
    """Link ``settings.job.tasks`` in ``output`` holding the output's lock (its fence checked before every
    commit); raises ConfigError, LockedError, OutputWriteError."""
    from notelake.conf.task import load_task
    from notelake.jobs.guards import output_lock, resolve_output, restrictive_umask
    from notelake.jobs.warehouse import open_warehouse

    tasks = [load_task(name) for name in settings.job.tasks]
    out = resolve_output(output, settings.job.output_root)
    opts = storage.settings_options(settings)
    with restrictive_umask(settings.job.umask):
        with output_lock(out, f"link-{uuid.uuid4().hex}", settings.job.lock_timeout_s, opts,
                         ttl_s=settings.job.lease_ttl_s) as lock:
            warehouse = open_warehouse(out, {"notelake.operation": "link", "notelake.linker": LINKER_VERSION},
                                       opts, fence=lock.check)
            if spark is None:
                from notelake.jobs.extraction.session import start_spark

                spark = start_spark(settings, app_name="notelake-link")
            return link_concepts(spark, warehouse, settings, tasks)


def main(argv: list[str] | None = None) -> int:
    """``notelake link``: exit codes as in the module docstring; the stats as one JSON line."""
    from notelake.conf import load_settings
    from notelake.jobs.cli_common import configure_command_logging, run_command

    configure_command_logging()
    args = build_parser().parse_args(argv)

    def link() -> dict:
        settings = load_settings(args.conf).with_overrides(
            job={"task": args.task} if args.task else {},
            omop={"vocabulary": args.vocabulary} if args.vocabulary else {})
        return dataclasses.asdict(run(settings, args.output))

    return run_command("link", link)


if __name__ == "__main__":
    sys.exit(main())
