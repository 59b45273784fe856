"""Label-set perturbation (udfs/perturb.py) on real gold records of both corpora."""

import json
import random
from pathlib import Path

import pytest

from notelake.conf.task import load_task
from notelake.udfs.answer import gold_answer
from notelake.udfs.parsing import ParsedAnswer, parse_answer
from notelake.udfs.perturb import PerturbSpec, perturb_example, perturb_task
from notelake.udfs.prompts import build_messages

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _records(corpus: str, n: int) -> list[dict]:
    path = DATA / corpus / "train.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present")
    with path.open(encoding="utf-8") as fh:
        return [json.loads(next(fh)) for _ in range(n)]


@pytest.mark.parametrize("corpus", ["phee", "maccrobat"])
def test_perturbed_examples_are_valid_zero_shot_tasks_whose_gold_parses(corpus):
    task = load_task(corpus)
    spec = PerturbSpec(keep_prob=0.5, max_labels=8, rename_prob=0.7)
    renamed = 0
    for k, record in enumerate(_records(corpus, 20)):
        window = (0, min(len(record["text"]), task.max_chunk_chars))
        perturbed, relabelled = perturb_example(task, record, random.Random(k), spec, window)
        assert perturbed.define_labels and len(perturbed.concepts) <= spec.max_labels
        # every kept label keeps its definition, under its old or new name
        assert set(perturbed.concepts.values()) <= set(task.concepts.values())
        renamed += sum(label not in task.concepts for label in perturbed.concepts)
        answer = gold_answer(perturbed, relabelled, window)
        parsed = parse_answer(answer, perturbed)
        assert isinstance(parsed, ParsedAnswer), answer
        assert {c.label for c in parsed.concepts} <= set(perturbed.concepts)
        present = {c["label"] for c in relabelled["concepts"]
                   if c["spans"][0][0] >= window[0] and c["spans"][-1][1] <= window[1]}
        if any(c["spans"][-1][1] <= window[1] for c in record["concepts"]):
            assert present, "at least one label of the gold window stays in the label set"
        prompt = build_messages(perturbed, record["text"][window[0]:window[1]])[1]["content"]
        for label, definition in perturbed.concepts.items():
            assert f"- {label}: {definition}" in prompt
    assert renamed > 0


def test_event_anchors_stay_and_derived_relations_follow_the_renames():
    task = load_task("phee")
    perturbed, concepts, _ = perturb_task(task, random.Random(3), PerturbSpec(keep_prob=1.0, max_labels=30,
                                                                           rename_prob=1.0, code_prob=1.0))
    assert set(perturbed.events.anchors) == {concepts["ADE_trigger"], concepts["PTE_trigger"]}
    adverse = [d for d in perturbed.events.derived if d.relation == "adverse_effect"]
    assert adverse and adverse[0].head == concepts["Drug"] and adverse[0].tail == concepts["Effect"]


def test_same_seed_same_perturbation():
    task = load_task("maccrobat")
    first = perturb_task(task, random.Random("x"), PerturbSpec())
    again = perturb_task(task, random.Random("x"), PerturbSpec())
    assert first == again
