"""Answer schema v2: the guided-decoding grammar accepts exactly the answers the parser reads (checked with
xgrammar, the structured-output backend vLLM runs), and the grounded grammar admits only the chunk's own words."""

import math

import pytest
from notelake.conf.task import load_task
from notelake.udfs.answer import (
    MAX_MENTION_TOKENS,
    MAX_TOKEN_CHARS,
    answer_grammar,
    answer_lines_bound,
    gold_answer,
    line_items_bound,
    mention_bound,
    mention_ngrams,
)
from notelake.udfs.parsing import ParsedAnswer, parse_answer
from notelake.udfs.prompts import prompt_version

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


WORDS = " ".join(f"w{k}" for k in range(60)) + "."


def mention(n: int) -> str:
    return " ".join(f"w{k}" for k in range(n))


def test_a_mention_is_bounded_by_its_label(compiler):
    """Each label's longest mention is the task's bound for it (learned from training data, conf/tasks/*.yaml)."""
    task = load_task("phee")
    drug, treatment = mention_bound(task, "Drug"), mention_bound(task, "Treatment")
    assert drug < treatment < 60
    grammar = answer_grammar(task, WORDS)
    assert accepts(compiler, grammar, f"Drug: {mention(drug)}")
    assert not accepts(compiler, grammar, f"Drug: {mention(drug + 1)}")
    assert accepts(compiler, grammar, f"Treatment: {mention(treatment)}")
    assert not accepts(compiler, grammar, f"Treatment: {mention(treatment + 1)}")
    event = f"ADE_trigger: w0 | Drug: {mention(drug)} | Effect: w3"
    assert accepts(compiler, grammar, event)
    assert not accepts(compiler, grammar, event.replace(mention(drug), mention(drug + 1)))
    unbounded = task.model_copy(update={"max_mention_tokens": {}})  # a label not bounded: MAX_MENTION_TOKENS
    assert accepts(compiler, answer_grammar(unbounded, WORDS), f"Drug: {mention(MAX_MENTION_TOKENS)}")
    assert not accepts(compiler, answer_grammar(unbounded, WORDS), f"Drug: {mention(MAX_MENTION_TOKENS + 1)}")


def test_a_line_holds_at_most_the_tasks_items(compiler):
    phee, maccrobat = load_task("phee"), load_task("maccrobat")
    n = line_items_bound(phee)
    event = "ADE_trigger: w0" + "".join(f" | Drug: w{k}" for k in range(1, n))
    assert accepts(compiler, answer_grammar(phee, WORDS), event)
    assert not accepts(compiler, answer_grammar(phee, WORDS), event + " | Drug: w59")
    m = line_items_bound(maccrobat)
    line = "Sign_symptom: w0" + "".join(f" | MODIFY: w{k}" for k in range(1, m))
    assert accepts(compiler, answer_grammar(maccrobat, WORDS), line)
    assert not accepts(compiler, answer_grammar(maccrobat, WORDS), line + " | MODIFY: w59")


def test_an_answer_holds_at_most_the_lines_its_window_is_worth(compiler):
    """A model that repeats lines instead of stopping (MACCROBAT dev: a third of the windows ran to max_tokens so) is
    stopped at as many lines per 100 characters as the densest training windows hold."""
    task = load_task("maccrobat")
    n = answer_lines_bound(task, WORDS)
    assert n == 1 + math.ceil(task.max_lines_per_100_chars * len(WORDS) / 100) and answer_lines_bound(task, "pain") == 2
    grammar = answer_grammar(task, WORDS)
    assert accepts(compiler, grammar, "\n".join(["Sign_symptom: w1"] * n))
    assert not accepts(compiler, grammar, "\n".join(["Sign_symptom: w1"] * (n + 1)))
    assert accepts(compiler, answer_grammar(task), "\n".join(["Sign_symptom: w1"] * (n + 1)))  # no text: no bound


def test_a_mention_never_copies_a_blob_token(compiler):
    blob = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xt"  # a base64 run: one \w token of 52 chars
    text = f"Aspirin {blob} caused rash."
    grammar = answer_grammar(load_task("phee"), text)
    assert len(blob) > MAX_TOKEN_CHARS and blob not in mention_ngrams(text)
    assert accepts(compiler, grammar, "Drug: Aspirin\nEffect: rash")
    assert not accepts(compiler, grammar, f"Drug: {blob}")
    assert not accepts(compiler, grammar, f"Drug: Aspirin {blob}")


def test_shipped_bounds_are_those_the_training_data_gives(shared_data_root):
    """conf/tasks/{phee,maccrobat}.yaml hold what `notelake bounds --task <task> --gold <train> --write` computes."""
    from notelake.jobs.bounds import learned_bounds

    for name in ("phee", "maccrobat"):
        task = load_task(name)
        learned = learned_bounds(task, shared_data_root / name / "train.jsonl")
        assert task.max_mention_tokens == learned["max_mention_tokens"], name
        assert task.max_line_items == learned["max_line_items"], name
        assert task.max_lines_per_100_chars == learned["max_lines_per_100_chars"], name


def test_bounds_are_part_of_the_prompt_version():
    task = load_task("phee")
    assert prompt_version(task) != prompt_version(task.model_copy(update={"max_line_items": 3}))
    assert prompt_version(task) != prompt_version(task.model_copy(update={"max_lines_per_100_chars": 1.0}))
    tighter = {**task.max_mention_tokens, "Drug": 2}
    assert prompt_version(task) != prompt_version(task.model_copy(update={"max_mention_tokens": tighter}))


@pytest.fixture(scope="module")
def shared_data_root():
    from pathlib import Path

    for root in (Path(__file__).resolve().parents[2] / "shared" / "data", Path("/work/shared/data")):
        if (root / "phee" / "train.jsonl").exists():
            return root
    pytest.skip("shared/data not available beside the repository")
