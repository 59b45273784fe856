"""Answer schema v2: the guided-decoding grammar accepts exactly the answers the parser reads (checked with
xgrammar, the structured-output backend vLLM runs), and the grounded grammar admits only the chunk's own words."""

import pytest
from notelake.conf.task import load_task
from notelake.udfs.answer import answer_grammar, gold_answer, mention_ngrams
from notelake.udfs.parsing import ParsedAnswer, parse_answer

xgr = pytest.importorskip("xgrammar")

TEXT = "Lithium-induced seizure in a 54-year-old man | on day 3;\nWarfarin was stopped."


@pytest.fixture(scope="module")
def compiler(base_model_path):
    from transformers import AutoTokenizer

    return xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(base_model_path)))


def accepts(compiler, grammar: str, answer: str) -> bool:
    matcher = xgr.GrammarMatcher(compiler.compile_grammar(grammar))
    return matcher.accept_string(answer) and matcher.is_completed()


def test_mention_ngrams_follow_the_text():
    grams = set(mention_ngrams(TEXT))
    assert {"Lithium", "Lithium-induced", "induced seizure", "54-year-old man", "Warfarin was stopped."} <= grams
    assert not {"man | on", "day 3;\nWarfarin", "3; Warfarin", "Lithium seizure"} & grams  # no separator, line or gap


@pytest.mark.parametrize("answer, grounded_ok", [
    ("ADE_trigger: induced | Drug: Lithium | Effect(negated): seizure\nSubject_age: 54-year-old", True),
    ("Drug: Warfarin\nSubject: 54-year-old man", True),
    ("none", True),
    ("Drug: aspirin", False),  # not in the text
    ("Drug: Lithium seizure", False),  # words of the text, not contiguous
])
def test_grounded_grammar_admits_only_text_mentions(compiler, answer, grounded_ok):
    task = load_task("phee")
    assert accepts(compiler, answer_grammar(task, TEXT), answer) is grounded_ok
    assert accepts(compiler, answer_grammar(task), answer)  # labels-only grammar: any mention
    assert isinstance(parse_answer(answer, task), ParsedAnswer)


@pytest.mark.parametrize("answer", [
    "Alien: Lithium",  # unknown label
    "Drug: Lithium | Subject: man",  # an argument after a non-anchor concept
    "ADE_trigger: induced | ADE_trigger: seizure",  # a trigger is no argument
    "ADE_trigger: induced | MODIFY: seizure",  # no reference items in PHEE
    "Drug(absent): Lithium",  # unknown assertion
    "Drug: Lithium\n",  # a trailing newline is not a line
])
def test_grammar_refuses_what_the_format_cannot_carry(compiler, answer):
    assert not accepts(compiler, answer_grammar(load_task("phee")), answer)


def test_maccrobat_reference_items(compiler):
    task = load_task("maccrobat")
    text = "Severe chest pain radiating to the left arm."
    assert accepts(compiler, answer_grammar(task, text), "Severity: Severe | MODIFY: chest pain\nSign_symptom: chest pain")
    assert not accepts(compiler, answer_grammar(task, text), "Severity: Severe | OVERLAP: chest pain")  # not extracted


def test_every_gold_answer_of_the_dev_sets_is_grammatical(compiler, shared_data_records):
    """What training teaches (gold answers) is what guided decoding allows, mention for mention (except
    discontinuous mentions, ~2 %, which the grounded grammar cannot write)."""
    grounded = 0
    for task_name, record in shared_data_records:
        task = load_task(task_name)
        text = record["text"][:task.max_chunk_chars]
        answer = gold_answer(task, record, window=(0, len(text)))
        assert accepts(compiler, answer_grammar(task), answer), (task_name, record["note_id"])
        if not any(len(c["spans"]) > 1 for c in record["concepts"]) and "\n" not in text:
            assert accepts(compiler, answer_grammar(task, text), answer), (task_name, record["note_id"])
            grounded += 1
    assert grounded >= 50


@pytest.fixture(scope="module")
def shared_data_records():
    import json
    from pathlib import Path

    for root in (Path(__file__).resolve().parents[2] / "shared" / "data", Path("/work/shared/data")):
        if (root / "phee" / "dev.jsonl").exists():
            out = []
            for task in ("phee", "maccrobat"):
                lines = (root / task / "dev.jsonl").read_text(encoding="utf-8").splitlines()[:60]
                out += [(task, json.loads(line)) for line in lines]
            return out
    pytest.skip("shared/data not available beside the repository")
