"""Relation pairs of the classification-head baseline (udfs/pairs.py): candidates, targets at the tails' end
tokens, and decoding back, on hand-made offsets (no tokenizer)."""

from __future__ import annotations

from notelake.conf.task import Task, load_task
from notelake.udfs.pairs import (IGNORE, candidate_tails, decode_tails, encode_targets, end_token, gap, head_prefix,
                                 pass_span, seen_pairs, with_predicted, with_seen_pairs)

PHEE = load_task("phee")
TEXT = "Insulin induced lipoatrophies in women of reproductive age."
#       0       8       16            30 33    39 42          55
OFFSETS = [(0, 7), (7, 15), (15, 29), (29, 32), (32, 38), (38, 41), (41, 54), (54, 58), (58, 59)]


def concept(label: str, word: str, occurrence_start: int = 0) -> dict:
    start = TEXT.index(word, occurrence_start)
    return {"label": label, "start": start, "end": start + len(word), "text": word}


TRIGGER = concept("ADE_trigger", "induced")
DRUG, TREATMENT = concept("Drug", "Insulin"), concept("Treatment", "Insulin")
EFFECT = concept("Effect", "lipoatrophies")
SUBJECT, AGE = concept("Subject", "women of reproductive age"), concept("Subject_age", "reproductive age")
CONCEPTS = [DRUG, TREATMENT, TRIGGER, EFFECT, SUBJECT, AGE]


def test_candidates_are_the_pairs_the_task_allows():
    assert candidate_tails(PHEE, TRIGGER, CONCEPTS) == [DRUG, TREATMENT, EFFECT, SUBJECT, AGE]
    assert candidate_tails(PHEE, DRUG, CONCEPTS) == [EFFECT]  # adverse_effect / potential_therapeutic_effect
    assert candidate_tails(PHEE, EFFECT, CONCEPTS) == []  # an Effect heads nothing
    assert head_prefix("ADE_trigger", "induced") == "ADE_trigger: induced\n"


def test_nested_tails_ending_on_one_token_stay_apart():
    relations = list(PHEE.relations)
    tails = [(t["end"], {r: 1 for r in ([t["label"]])}) for t in (SUBJECT, AGE, EFFECT)]
    targets = encode_targets(OFFSETS, relations, tails)
    age_end = end_token(OFFSETS, AGE["end"])
    assert age_end == end_token(OFFSETS, SUBJECT["end"]) == 7  # "age" ends both
    codes = targets[age_end]
    assert codes[relations.index("Subject")] == 1 and codes[relations.index("Subject_age")] == 1
    assert codes[relations.index("Drug")] == IGNORE
    assert all(c == IGNORE for i, row in enumerate(targets) if i not in (age_end, 2) for c in row)
    decisions = [[1 if c == 1 else 0 for c in row] for row in targets]
    decoded = decode_tails(PHEE, TRIGGER, [SUBJECT, AGE, EFFECT], OFFSETS, decisions)
    assert decoded == [("Subject", SUBJECT), ("Subject_age", AGE), ("Effect", EFFECT)]


def test_a_no_is_kept_and_a_yes_wins_on_a_shared_token():
    relations = list(PHEE.relations)
    targets = encode_targets(OFFSETS, relations, [(EFFECT["end"], {"adverse_effect": 0,
                                                                   "potential_therapeutic_effect": 0})])
    row = targets[end_token(OFFSETS, EFFECT["end"])]
    assert row[relations.index("adverse_effect")] == 0 and row[relations.index("potential_therapeutic_effect")] == 0
    both = encode_targets(OFFSETS, relations, [(AGE["end"], {"Subject": 0}), (SUBJECT["end"], {"Subject": 1})])
    assert both[7][relations.index("Subject")] == 1
    assert end_token(OFFSETS, 0) is None


def test_predicted_concepts_join_the_gold_ones_as_stand_ins_or_false():
    """A tagger's concept equal to a gold one adds nothing; one overlapping gold concepts of its label stands for the
    one it overlaps most (its id: it inherits the gold relations); one overlapping only another label's concept, or
    nothing, is false (an id no relation names)."""
    gold = [{"id": "T1", "label": "Drug", "start": 0, "end": 7, "text": "heparin"},
            {"id": "T2", "label": "Effect", "start": 16, "end": 32, "text": "thrombocytopenia"},
            {"id": "T3", "label": "Effect", "start": 34, "end": 40, "text": "a rash"}]
    predicted = [{"label": "Drug", "start": 0, "end": 7, "text": "heparin"},        # exact
                 {"label": "Effect", "start": 8, "end": 32, "text": "induced thrombocytopenia"},  # shifted T2
                 {"label": "Effect", "start": 30, "end": 40, "text": "ia, a rash"},  # T2 by 2 chars, T3 by 6
                 {"label": "Drug", "start": 16, "end": 32, "text": "thrombocytopenia"},  # another label's span
                 {"label": "Effect", "start": 44, "end": 48, "text": "pain"}]       # nothing there
    concepts, counts = with_predicted(gold, predicted)
    assert counts == {"predicted": 5, "exact": 1, "stand_in": 2, "false": 2}
    assert concepts[:3] == gold and concepts[0] is not gold[0]  # copies: the gold list is not touched
    assert [(c["id"], c["start"]) for c in concepts[3:]] == [("T2", 8), ("T3", 30), ("predicted:3", 16),
                                                               ("predicted:4", 44)]
    assert with_predicted(gold, []) == (gold, {"predicted": 0, "exact": 0, "stand_in": 0, "false": 0})


def test_a_largest_gap_limits_the_tails_and_the_text_a_pass_reads():
    """``max_gap``: characters between head and tail (0 when they touch or nest); a pass then reads from the first to
    the last character of the head and its tails."""
    assert gap(DRUG, TRIGGER) == gap(TRIGGER, DRUG) == 1 and gap(SUBJECT, AGE) == 0
    assert gap(TRIGGER, SUBJECT) == SUBJECT["start"] - TRIGGER["end"] == 18
    assert candidate_tails(PHEE, TRIGGER, CONCEPTS, max_gap=17) == [DRUG, TREATMENT, EFFECT]
    assert candidate_tails(PHEE, TRIGGER, CONCEPTS, max_gap=18) == [DRUG, TREATMENT, EFFECT, SUBJECT]
    assert candidate_tails(PHEE, TRIGGER, CONCEPTS, max_gap=27) == candidate_tails(PHEE, TRIGGER, CONCEPTS)
    assert pass_span(TRIGGER, [DRUG, EFFECT]) == (0, EFFECT["end"])
    assert pass_span(EFFECT, [SUBJECT]) == (EFFECT["start"], SUBJECT["end"])


OPEN_TASK = Task(name="open", description="d", kind="cre", concepts={"A": "a", "B": "b", "C": "c"},
                 relations={"MODIFY": {"definition": "any pair"},
                            "CAUSE": {"definition": "fixed pairs", "pairs": [["A", "C"]]}})


def record(concepts: str, relations: list[tuple[str, int, int]]) -> dict:
    return {"concepts": [{"id": f"T{k}", "label": label} for k, label in enumerate(concepts)],
            "relations": [{"label": r, "head": f"T{h}", "tail": f"T{t}"} for r, h, t in relations]}


def test_seen_label_pairs_limit_only_the_relations_the_schema_leaves_open():
    """MACCROBAT's relations hold between any labels: ``with_seen_pairs`` keeps, for such a relation, the label pairs
    it holds between at least ``min_count`` times in the training notes; a relation with pairs keeps its own;
    relations of other tasks' labels, or naming a missing concept, are not counted."""
    notes = [record("AB", [("MODIFY", 0, 1)]), record("ABC", [("MODIFY", 0, 1), ("MODIFY", 2, 0), ("CAUSE", 0, 2)]),
             record("B", [("OTHER", 0, 0), ("MODIFY", 0, 9)])]
    assert seen_pairs(OPEN_TASK, notes) == {("MODIFY", "A", "B"): 2, ("MODIFY", "C", "A"): 1, ("CAUSE", "A", "C"): 1}
    limited, counts = with_seen_pairs(OPEN_TASK, notes, min_count=2)
    assert limited.relations["MODIFY"].pairs == [("A", "B")] and limited.relations["CAUSE"].pairs == [("A", "C")]
    assert counts == {"seen_relations": 3, "seen_relations_kept": 2, "seen_label_pairs": 1}
    assert limited.allows("MODIFY", "A", "B") and not limited.allows("MODIFY", "C", "A")
    assert OPEN_TASK.allows("MODIFY", "C", "A") and OPEN_TASK.relations["MODIFY"].pairs is None  # not touched
    assert with_seen_pairs(OPEN_TASK, notes, 1)[0].relations["MODIFY"].pairs == [("A", "B"), ("C", "A")]
    assert Task.model_validate(limited.model_dump(mode="json")) == limited  # survives a manifest round trip
