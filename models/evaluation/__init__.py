"""Evaluation: the real extraction path on a gold slice, scored per task and per label, with reports.

Where to look: :mod:`.metrics` (strict / lenient micro-F1 of concepts and relations, bootstrap CIs, the CI gate),
:mod:`.harness` (running an evaluation: :func:`evaluate_records` over a dev slice), :mod:`.report` (Markdown, plots,
the Delta score table).
"""

from notelake.models.evaluation.harness import (EvalOptions, evaluate_records, now_iso, read_gold, select_slice,
                                                slice_fingerprint)
from notelake.models.evaluation.metrics import (Counts, Mention, NoteItems, Rel, bootstrap_f1, f1_gate, gold_items,
                                                match_concepts, match_relations, note_counts, predicted_items, prf,
                                                rescore_prefix, score_notes)
from notelake.models.evaluation.report import (bar_plot, comparison_table, curve_plot, markdown_report, score_rows,
                                               write_delta)

__all__ = [
    "Counts", "EvalOptions", "Mention", "NoteItems", "Rel", "bar_plot", "bootstrap_f1", "comparison_table",
    "curve_plot", "evaluate_records", "f1_gate", "gold_items", "markdown_report", "match_concepts",
    "match_relations", "note_counts", "now_iso", "predicted_items", "prf", "read_gold", "rescore_prefix",
    "score_notes", "score_rows", "select_slice", "slice_fingerprint", "write_delta",
]
