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

Modules: ``state`` (schemas, stats, what changed), ``stage`` (the Spark side), ``rows`` (ids and CDM rows, commits),
``publish`` (:func:`publish_omop`), ``cli`` (``notelake omop``).
"""

from notelake.jobs.omop.state import OMOP_STAGE_VERSION, OUTPUT_TABLES, OmopError, OmopStats
from notelake.jobs.omop.publish import nlp_type_concept, publish_fingerprint, publish_omop
from notelake.jobs.omop.cli import main, run

__all__ = ["OMOP_STAGE_VERSION", "OUTPUT_TABLES", "OmopError", "OmopStats", "main",
           "nlp_type_concept", "publish_fingerprint", "publish_omop", "run"]
