"""The Spark side of a publish: each changed bucket's mentions, relations and note changes, staged as Parquet."""

from __future__ import annotations

import pyarrow as pa

from notelake.jobs import storage
from notelake.jobs.warehouse import Warehouse, read_snapshot_spark
from notelake.udfs import omop
from notelake.jobs.omop.state import _Publish


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
