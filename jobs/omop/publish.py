"""The entry point of the OMOP publish (:func:`publish_omop`), the NLP type concept and the publish fingerprint."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid

import pyarrow.compute as pc

from notelake import __version__
from notelake.conf import Settings
from notelake.jobs import storage
from notelake.jobs.warehouse import Warehouse
from notelake.udfs import schemas
from notelake.jobs.omop.rows import _publish_pass, _record_publish
from notelake.jobs.omop.state import (OMOP_STAGE_VERSION, OmopError, OmopStats, SOURCES, _Publish, _dirty_buckets,
                                      _last_publish)

log = logging.getLogger("notelake.omop")


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
