"""The REPLAY engine (data-plane benchmarks): schema-valid, grounded answers in order, simulated latency. No vLLM."""

from __future__ import annotations

import json
import time

import pytest

from notelake.conf import EngineConfig
from notelake.conf.task import load_task
from notelake.models.engine import GenerationRequest, make_engine
from notelake.models.replay import ReplayEngine, replay_answer
from notelake.udfs.answer import answer_json_schema
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
    assert isinstance(engine, ReplayEngine)
    assert engine.describe()["backend"] == "replay"


def test_answers_are_schema_valid_grounded_and_in_order(engine, task):
    schema = answer_json_schema(task)
    reqs = [GenerationRequest(f"r{i}", build_messages(task, t), json_schema=schema, max_tokens=256)
            for i, t in enumerate(TEXTS)]
    out = engine.generate(reqs)
    assert [r.request_id for r in out] == ["r0", "r1", "r2"]
    for text, r in zip(TEXTS, out):
        assert r.ok and r.finish_reason == "stop" and r.prompt_tokens > 50 and r.output_tokens > 0
        answer = json.loads(r.text)
        assert set(answer) == {"concepts", "relations"}
        assert 1 <= len(answer["concepts"]) <= 4
        for c in answer["concepts"]:
            assert c["label"] in task.concepts and c["text"] in text
        for rel in answer["relations"]:
            assert rel["label"] in task.relations and rel["head"] < len(answer["concepts"])
    assert out[0].text == engine.generate(reqs[:1])[0].text  # deterministic per text


def test_without_schema_answers_empty(task):
    assert replay_answer(TEXTS[0], None) == {"concepts": []}
    assert replay_answer("", answer_json_schema(task)) == {"concepts": [], "relations": []}


def test_latency_model_and_per_item_errors(base_model_path, task):
    engine = ReplayEngine(EngineConfig(backend="replay", max_num_seqs=2, max_model_len=1024),
                          decode_step_s=0.01, prefill_s_per_token=0.0)
    schema = answer_json_schema(task)
    ok = [GenerationRequest(f"ok{i}", build_messages(task, t), json_schema=schema, max_tokens=64)
          for i, t in enumerate(TEXTS)]
    too_long = GenerationRequest("long", build_messages(task, "word " * 1200), json_schema=schema, max_tokens=64)
    t0 = time.monotonic()
    out = engine.generate(ok + [too_long])
    elapsed = time.monotonic() - t0
    assert out[3].error.startswith("prompt_too_long") and all(r.ok for r in out[:3])
    # Two waves of max_num_seqs=2, each sleeping 10 ms per token of its longest answer.
    expected = 0.01 * (max(r.output_tokens for r in out[:2]) + max(r.output_tokens for r in out[2:]))
    assert expected <= elapsed < expected + 1.0
