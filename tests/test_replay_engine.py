"""The REPLAY engine (data-plane benchmarks): schema-valid, grounded answers in order, simulated latency. No vLLM."""

from __future__ import annotations

import time

import pytest

from notelake.conf import EngineConfig
from notelake.conf.task import load_task
from notelake.models.engine import GenerationRequest, make_engine
from notelake.models.replay import ReplayEngine, replay_answer
from notelake.udfs.answer import answer_guide
from notelake.udfs.parsing import ParsedAnswer, parse_answer
from notelake.udfs.prompts import build_messages

TEXTS = [
    "A 67-year-old man developed acute kidney injury after starting ibuprofen for knee pain.",
    "Severe hepatotoxicity was observed in a woman treated with isoniazid.",
    "Rash resolved after amoxicillin was stopped.",
]


@pytest.fixture(scope="module")
def task():
    return load_task("phee")


@pytest.fixture(scope="module")
def engine(base_model_path):
    return make_engine(EngineConfig(backend="replay", max_num_seqs=2))


def test_make_engine_dispatches_to_replay(engine):
    assert isinstance(engine.inner, ReplayEngine)  # beside the heads (models/extractors.py)
    assert engine.describe()["backend"] == "replay"


def test_answers_parse_ground_and_keep_order(engine, task):
    reqs = [GenerationRequest(f"r{i}", build_messages(task, t), guide=answer_guide(task, t, "grounded"), max_tokens=256)
            for i, t in enumerate(TEXTS)]
    out = engine.generate(reqs)
    assert [r.request_id for r in out] == ["r0", "r1", "r2"]
    for text, r in zip(TEXTS, out):
        assert r.ok and r.finish_reason == "stop" and r.prompt_tokens > 10 and r.output_tokens > 0
        answer = parse_answer(r.text, task)
        assert isinstance(answer, ParsedAnswer) and answer.warnings == []
        assert 1 <= len(answer.concepts) <= 4
        assert all(c.label in task.concepts and c.text in text for c in answer.concepts)
        assert all(r.label in task.relations for r in answer.relations)
    assert out[0].text == engine.generate(reqs[:1])[0].text  # deterministic per text


def test_without_grammar_answers_none(task):
    assert replay_answer(TEXTS[0], None) == "none"
    assert replay_answer("", answer_guide(task, "", "labels")) == "none"


def test_latency_model_and_per_item_errors(base_model_path, task):
    engine = ReplayEngine(EngineConfig(backend="replay", max_num_seqs=2, max_model_len=1024),
                          decode_step_s=0.01, prefill_s_per_token=0.0)
    ok = [GenerationRequest(f"ok{i}", build_messages(task, t), guide=answer_guide(task, t, "labels"), max_tokens=64)
          for i, t in enumerate(TEXTS)]
    too_long = GenerationRequest("long", build_messages(task, "word " * 1200), max_tokens=64)
    reported = {}
    t0 = time.monotonic()
    out = engine.generate(ok + [too_long], on_result=lambda r: reported.setdefault(r.request_id, time.monotonic()))
    elapsed = time.monotonic() - t0
    assert out[3].error.startswith("prompt_too_long") and all(r.ok for r in out[:3])
    # Two waves of max_num_seqs=2, each sleeping 10 ms per token of its longest answer.
    first_wave = 0.01 * max(r.output_tokens for r in out[:2])
    expected = first_wave + 0.01 * max(r.output_tokens for r in out[2:])
    assert expected <= elapsed < expected + 1.0
    # each wave's results are reported when its own latency has passed, the first before the second wave's
    assert list(reported) == ["ok0", "ok1", "ok2", "long"]
    assert t0 + first_wave <= reported["ok0"] < t0 + expected <= reported["ok2"]
