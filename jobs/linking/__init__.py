"""The link stage: every concepts row linked to a standard concept of the site's OMOP vocabulary (``concept_links``).

    notelake link --output <warehouse> [--conf conf/local.yaml] [--task phee[,maccrobat]] [--vocabulary URI]

(also :func:`link_concepts`, which the extraction job calls after its rounds; modules: ``lexicon`` the targets,
fingerprints and lexicon with its exact resolution, ``executors`` the fuzzy step, ``driver`` the passes and MERGE,
``cli`` the command). One ``concept_links`` row per
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

from notelake.jobs.linking.lexicon import (LINKER_VERSION, LINKS_TABLE, LinkPlan, LinkStats, Vocabulary,
                                           open_vocabulary, plan_links)
from notelake.jobs.linking.driver import STATE_FILE, link_concepts, plan_passes
from notelake.jobs.linking.cli import build_parser, main, run

__all__ = ["LINKER_VERSION", "LINKS_TABLE", "STATE_FILE", "LinkPlan", "LinkStats", "Vocabulary", "build_parser",
           "link_concepts", "main", "open_vocabulary", "plan_links", "plan_passes", "run"]
