"""The linker's inputs: the vocabulary's tables, each label's target (the link plan, its fingerprint) and the
lexicon of each target, built and resolved (exact, maps_to) with Spark joins, plus its fuzzy entries."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from notelake.conf import ConfigError
from notelake.conf.settings import OmopConfig
from notelake.conf.task import LabelNormalization, Task
from notelake.jobs import storage
from notelake.udfs import schemas
from notelake.udfs.hashing import link_fingerprint
from notelake.udfs.normalize import NORMALIZER_VERSION, normalize_term
from notelake.udfs.vocabulary import release_name, release_versions


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
