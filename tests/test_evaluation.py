"""Scoring unit tests (hand-built gold/pred) and the CI quality gate for the shipped adapter.

The gate (``test_shipped_adapter_gate``) runs the real extraction path through the module-scoped vLLM
``lora_pool`` (tests/conftest.py) on a fixed PHEE dev slice and fails when the lenient micro-F1 drops below
the recorded baseline minus 2 x its bootstrap SE (models/baselines/*.json). It is marked ``slow``-free on
purpose: it is the regression test for the adapter and takes ~2-3 min on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from notelake.conf.task import load_task
from notelake.models.evaluation import (
    Counts,
    Mention,
    NoteItems,
    Rel,
    bootstrap_f1,
    f1_gate,
    gold_items,
    markdown_report,
    match_concepts,
    match_relations,
    predicted_items,
    prf,
    score_notes,
    select_slice,
)

REPO = Path(__file__).resolve().parents[1]
BASELINES = REPO / "models" / "baselines"


def M(label, *spans):
    return Mention(label, tuple(spans) if spans else None)


# ------------------------------------------------------------------------------------------------ matching
def test_strict_and_lenient_differ():
    gold = [M("Drug", (0, 7)), M("Effect", (20, 35))]
    pred = [M("Drug", (0, 7)), M("Effect", (24, 35))]  # Effect boundary off: lenient only
    assert len(match_concepts(pred, gold, "strict")) == 1
    assert len(match_concepts(pred, gold, "lenient")) == 2


def test_label_must_match_and_ungrounded_never_matches():
    gold = [M("Drug", (0, 7))]
    assert match_concepts([M("Effect", (0, 7))], gold, "lenient") == []
    assert match_concepts([M("Drug")], gold, "lenient") == []  # ungrounded prediction


def test_lenient_matching_is_one_to_one():
    gold = [M("Effect", (10, 30))]
    pred = [M("Effect", (10, 15)), M("Effect", (20, 30))]  # two fragments both overlap one gold
    assert len(match_concepts(pred, gold, "lenient")) == 1
    # exact pair first: the exact prediction is not stolen by an overlapping one listed earlier
    gold2 = [M("Effect", (10, 30)), M("Effect", (12, 14))]
    pred2 = [M("Effect", (12, 14)), M("Effect", (10, 30))]
    assert sorted(match_concepts(pred2, gold2, "lenient")) == [(0, 1), (1, 0)]


def test_discontinuous_spans_strict_needs_all_fragments():
    gold = [M("Effect", (0, 5), (10, 15))]
    assert len(match_concepts([M("Effect", (0, 5), (10, 15))], gold, "strict")) == 1
    assert len(match_concepts([M("Effect", (0, 15))], gold, "strict")) == 0
    assert len(match_concepts([M("Effect", (0, 15))], gold, "lenient")) == 1
    # overlap counts characters of fragments, not the extent: (6, 9) lies in the gap
    assert len(match_concepts([M("Effect", (6, 9))], gold, "lenient")) == 0


def test_relation_scoring_strict_vs_lenient():
    drug, eff, trig = M("Drug", (0, 7)), M("Effect", (20, 35)), M("ADE_trigger", (10, 17))
    gold = [Rel("adverse_effect", drug, eff), Rel("Effect", trig, eff)]
    eff_loose = M("Effect", (24, 35))
    pred = [Rel("adverse_effect", drug, eff_loose), Rel("Effect", trig, eff), Rel("Drug", trig, drug)]
    assert match_relations(pred, gold, "strict") == 1
    assert match_relations(pred, gold, "lenient") == 2
    # wrong relation label or wrong argument label: no credit
    assert match_relations([Rel("potential_therapeutic_effect", drug, eff)], gold, "lenient") == 0
    assert match_relations([Rel("adverse_effect", M("Treatment", (0, 7)), eff)], gold, "lenient") == 0
    # one-to-one
    assert match_relations([Rel("Effect", trig, eff), Rel("Effect", trig, eff_loose)], gold, "lenient") == 1


def test_prf_and_score_notes_micro():
    task = load_task("phee")
    g = NoteItems("n1", [M("Drug", (0, 7)), M("Effect", (20, 35))], [])
    p = NoteItems("n1", [M("Drug", (0, 7)), M("Effect", (24, 35)), M("Subject", (40, 45))], [])
    s = score_notes(task, [(p, g)], resamples=0)
    assert s["cce"]["strict"]["tp"] == 1 and s["cce"]["strict"]["n_pred"] == 3 and s["cce"]["strict"]["n_gold"] == 2
    assert s["cce"]["lenient"]["f1"] == pytest.approx(round(prf(2, 3, 2)[2], 4))
    assert s["per_label"]["Effect"]["strict"]["f1"] == 0.0
    assert s["per_label"]["Effect"]["lenient"]["f1"] == 1.0
    assert s["per_label"]["Subject"]["lenient"]["precision"] == 0.0
    assert s["grounding_rate"] == 1.0
    assert prf(0, 0, 0) == (0.0, 0.0, 0.0)


def test_gold_and_predicted_items_from_rows():
    task = load_task("phee")
    record = {"note_id": "x_1", "text": "Lithium induced seizure.",
              "concepts": [{"id": "T1", "label": "Drug", "spans": [[0, 7]], "text": "Lithium"},
                           {"id": "T2", "label": "ADE_trigger", "spans": [[8, 15]], "text": "induced",
                            "attributes": {"Negated": True}},
                           {"id": "T3", "label": "Effect", "spans": [[16, 23]], "text": "seizure"}],
              "relations": [{"id": "R1", "label": "Effect", "head": "T2", "tail": "T3"},
                            {"id": "R2", "label": "adverse_effect", "head": "T1", "tail": "T3"}]}
    gold = gold_items(task, record)
    assert len(gold.concepts) == 3 and len(gold.relations) == 2
    assert gold.assertions[("Effect", ((16, 23),))] == "negated"
    rows = [{"concept_id": "a", "label": "Drug", "grounded": True, "spans": [{"start": 0, "end": 7}]},
            {"concept_id": "b", "label": "Effect", "grounded": True, "spans": [{"start": 16, "end": 23}],
             "assertion": "negated"},
            {"concept_id": "c", "label": "Subject", "grounded": False, "spans": None}]
    rels = [{"label": "adverse_effect", "head_concept_id": "a", "tail_concept_id": "b"}]
    pred = predicted_items("x_1", rows, rels)
    s = score_notes(task, [(pred, gold)], resamples=0)
    assert s["cce"]["strict"]["tp"] == 2 and s["cce"]["strict"]["n_pred"] == 3
    assert s["cre"]["strict"]["tp"] == 1 and s["cre"]["strict"]["n_gold"] == 2
    assert s["grounding_rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["assertion_accuracy"] == 1.0


def test_bootstrap_ci_contains_point_estimate_and_se_shrinks():
    per_note = [Counts(3, 4, 5), Counts(1, 2, 2), Counts(0, 1, 3), Counts(4, 4, 4)] * 10
    b = bootstrap_f1(per_note, resamples=500, seed=1)
    total = Counts()
    for c in per_note:
        total.add(c)
    f1 = prf(total.tp, total.n_pred, total.n_gold)[2]
    assert b["ci95"][0] <= f1 <= b["ci95"][1]
    assert bootstrap_f1(per_note * 10, resamples=500, seed=1)["se"] < b["se"]


def test_slice_is_fixed_by_seed():
    recs = [{"note_id": f"n{i:03d}"} for i in range(50)]
    a = select_slice(recs, 10, seed=0)
    assert [r["note_id"] for r in a] == [r["note_id"] for r in select_slice(list(reversed(recs)), 10, seed=0)]
    assert [r["note_id"] for r in a] != [r["note_id"] for r in select_slice(recs, 10, seed=1)]
    assert [r["note_id"] for r in select_slice(recs, 20, seed=0)][:10] == [r["note_id"] for r in a]


def test_gate_rule():
    report = {"scores": {"cce": {"lenient": {"f1": 0.50}}}}
    assert f1_gate(report, {"lenient_f1": 0.52, "lenient_f1_se": 0.02})[0]
    assert not f1_gate(report, {"lenient_f1": 0.56, "lenient_f1_se": 0.02})[0]


def test_markdown_report_renders_without_text():
    task = load_task("phee")
    g = NoteItems("n1", [M("Drug", (0, 7))], [])
    s = score_notes(task, [(g, g)], resamples=10)
    s.update(invalid_output_rate=0.0, engine_error_rate=0.0, error_types={},
             throughput={"prompts": 1, "wall_s": 1.0, "prompts_per_s": 1.0, "output_tokens_per_s": 10.0,
                         "output_tokens": 10, "prompt_tokens": 100, "truncated_outputs": 0})
    report = {"task": "phee", "gold": "g.jsonl", "run_id": "r", "label": "x",
              "slice": {"n_notes": 1, "seed": 0, "limit": 1, "n_gold_concepts": 1, "sha256": "0" * 64},
              "model": {"name": "m", "sha256": "1" * 64}, "adapter": None,
              "engine": {"backend": "vllm", "dtype": "float32", "greedy": True, "guided_decoding": "grounded", "max_tokens": 8},
              "scores": s}
    md = markdown_report(report, [report])
    assert "| CCE lenient |" in md and "| Drug |" in md and "Runs compared" in md


# ------------------------------------------------------------------------------------------------ CI gate
def _shipped_baseline() -> tuple[dict, Path] | None:
    for path in sorted(BASELINES.glob("*.json")):
        baseline = json.loads(path.read_text(encoding="utf-8"))
        if baseline.get("gate") and (REPO / baseline["adapter"]).is_dir():
            return baseline, path
    return None


def test_baseline_files_are_well_formed():
    for path in sorted(BASELINES.glob("*.json")):
        b = json.loads(path.read_text(encoding="utf-8"))
        for key in ("task", "lenient_f1", "lenient_f1_se", "slice", "command"):
            assert key in b, f"{path.name} lacks {key}"
        assert 0 <= b["lenient_f1"] <= 1 and b["lenient_f1_se"] >= 0


def test_shipped_adapter_gate(lora_pool):
    """Concept and relation lenient F1 of the shipped adapter on its fixed gate slice >= baseline - 2 x SE (greedy,
    grounded guided decoding, the job's defaults)."""
    found = _shipped_baseline()
    if found is None:
        pytest.skip("no gate baseline in models/baselines/ yet")
    baseline, path = found
    from notelake.models.evaluation import EvalOptions, evaluate_records, read_gold

    task = load_task(baseline["task"])
    gold_path = (REPO / baseline["gold"]).resolve()
    if not gold_path.is_file():
        pytest.skip(f"gold data not present: {gold_path}")
    gate = baseline["gate"]
    records = select_slice(read_gold(gold_path), gate["limit"], gate["seed"])
    n_gold = sum(len(gold_items(task, r).concepts) for r in records)
    assert n_gold >= 100, f"gate slice has only {n_gold} gold concepts"
    options = EvalOptions(adapter=str((REPO / baseline["adapter"]).resolve()), chunk_overlap_chars=200,
                          resamples=1000, seed=gate["seed"], progress=False)
    scores = evaluate_records(task, records, lora_pool.generate, options)
    report = {"scores": scores}
    ok, msg = f1_gate(report, {"lenient_f1": gate["lenient_f1"], "lenient_f1_se": gate["lenient_f1_se"]})
    assert scores["invalid_output_rate"] is not None
    assert ok, f"{path.name}: {msg}"
    if gate.get("cre_lenient_f1") is not None:
        floor = gate["cre_lenient_f1"] - 2 * gate["cre_lenient_f1_se"]
        assert scores["cre"]["lenient"]["f1"] >= floor, f"relation lenient F1 {scores['cre']['lenient']['f1']} < {floor}"


def test_rescore_prefix_matches_scoring_the_prefix():
    from notelake.models.evaluation import rescore_prefix

    task = load_task("phee")
    notes = []
    for k in range(6):
        g = NoteItems(f"n{k}", [M("Drug", (0, 7)), M("Effect", (20, 35))], [])
        p = NoteItems(f"n{k}", [M("Drug", (0, 7)), M("Effect", (24 + k, 35))][: 1 + k % 2], [])
        notes.append((p, g))
    full = score_notes(task, notes, resamples=200, seed=3)
    pre = rescore_prefix(full, 4, resamples=200, seed=3)
    direct = score_notes(task, notes[:4], resamples=200, seed=3)
    assert pre["n_notes"] == 4
    assert pre["cce_lenient"] == direct["cce"]["lenient"] and pre["cce_strict"] == direct["cce"]["strict"]


def test_evaluation_extracts_through_windows_and_sets_assertions_as_the_job_does(base_model_path):
    """``evaluate_records`` answers windows as the job does (an embedded base64 blob: no model call) and sets the
    concepts' assertions by the job's method: a finding the text negates, which the REPLAY engine's answer leaves
    present, scores as negated under ``combined`` and as present under ``model``."""
    import base64
    import random

    from notelake.conf import EngineConfig
    from notelake.models.engine import make_engine
    from notelake.models.evaluation import EvalOptions, evaluate_records

    engine = make_engine(EngineConfig(backend="replay", max_num_seqs=4))
    blob = base64.encodebytes(random.Random(3).randbytes(57 * 20)).decode()
    record = {"note_id": "n", "text": f"Patient denies nausea after heparin.\n{blob}", "relations": [],
              "concepts": [{"id": "T1", "label": "Activity", "spans": [[15, 21]], "attributes": {"Negated": True}}]}
    for method, agree in (("combined", 1), ("model", 0)):
        scores = evaluate_records(load_task("maccrobat"), [record], engine.generate,
                                  EvalOptions(assertion=method, resamples=0, progress=False))
        assert scores["windows"]["no_prose"] >= 1
        assert scores["assertion_accuracy"] == agree
