"""The executors' side of linking (``mapInArrow``): mentions the joins left unmatched go through the fuzzy step
against the broadcast lexicon of their target."""

from __future__ import annotations

import pyarrow as pa

from notelake.udfs.matching import FuzzyLexicon
from notelake.jobs.linking.lexicon import _EXECUTOR_FIELDS


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
