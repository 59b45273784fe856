"""The vLLM engine behind one shared Ray actor (session fixtures ``ray_address`` / ``engine_pool``).

Every test that needs vLLM reuses the one engine actor (load ~30-60 s on 2 CPU cores); each generate call
is a few short prompts. Pool mechanics (ordering across batches, a dying actor) use tiny fake actors.
"""

from __future__ import annotations

import json
import os

import pytest
import ray

from notelake.conf.task import load_task
from notelake.models.actor import CounterTotals, EnginePool, actor_names, engine_config_hash
from notelake.models.dispatch import ENGINE_UNAVAILABLE
from notelake.models.engine import GenerationRequest, GenerationResult
from notelake.udfs.answer import answer_guide, mention_ngrams
from notelake.udfs.parsing import ParsedAnswer, parse_answer
from notelake.udfs.prompts import build_messages

PHEE_TEXT = "A 54-year-old woman developed severe hepatotoxicity after starting isoniazid for latent tuberculosis."


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_generate_preserves_order_and_ids(engine_pool):
    reqs = [
        GenerationRequest("first", _user("Name one color of the rainbow."), max_tokens=12),
        GenerationRequest("second", _user("Say hello."), max_tokens=12),
    ]
    out = engine_pool.generate(reqs)
    assert [r.request_id for r in out] == ["first", "second"]
    for r in out:
        assert r.error is None and r.text and r.output_tokens > 0 and r.prompt_tokens > 0
        assert r.finish_reason in ("stop", "length")


def test_sensible_text(engine_pool):
    (res,) = engine_pool.generate([GenerationRequest("paris", _user("What is the capital of France?"), max_tokens=24)])
    assert res.error is None
    assert "Paris" in res.text
    assert res.finish_reason == "stop"


@pytest.mark.parametrize("task_name", ["phee", "maccrobat"])
def test_grounded_grammar_admits_only_task_labels_and_text_mentions(engine_pool, task_name):
    """The base model knows neither the labels nor the format: whatever it writes under the grounded grammar is
    answer-format lines of the task's labels whose every mention is a word n-gram of the text."""
    task = load_task(task_name)
    req = GenerationRequest("g1", build_messages(task, PHEE_TEXT), guide=answer_guide(task, PHEE_TEXT, "grounded"),
                            max_tokens=48)
    (res,) = engine_pool.generate([req])
    assert res.error is None and res.text
    parsed = parse_answer(res.text, task, truncated=res.finish_reason == "length")
    assert isinstance(parsed, ParsedAnswer)
    assert all(w.startswith("output cut at max_tokens") for w in parsed.warnings), parsed.warnings
    allowed = set(mention_ngrams(PHEE_TEXT))
    assert parsed.concepts or res.text.strip() == "none" or res.finish_reason == "length"
    assert all(c.label in task.concepts and c.text in allowed for c in parsed.concepts)


def test_bad_items_are_isolated(engine_pool):
    reqs = [
        GenerationRequest("ok-1", _user("What is the capital of France?"), max_tokens=16),
        GenerationRequest("too-long", _user("note " * 5000), max_tokens=16),
        GenerationRequest("bad-schema", _user("Answer."), guide={"grammar": "root ::= ( no such rule"}, max_tokens=8),
        GenerationRequest("ok-2", _user("Say hello."), max_tokens=8),
    ]
    out = engine_pool.generate(reqs)
    assert [r.request_id for r in out] == ["ok-1", "too-long", "bad-schema", "ok-2"]
    assert out[0].error is None and "Paris" in out[0].text
    assert out[1].text is None and out[1].error.startswith("prompt_too_long")
    assert "note" not in out[1].error  # no prompt text in errors
    assert out[2].text is None and out[2].error  # rejected by vLLM, isolated by the one-by-one retry
    assert out[3].error is None and out[3].text


def _peft_greedy(base_model_path, adapter_path, messages, max_new_tokens) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_model_path))
    model = AutoModelForCausalLM.from_pretrained(str(base_model_path), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_path)).eval()
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_lora_adapter_changes_output(lora_pool, tiny_adapter, base_model_path):
    messages = _user("What is the capital of France?")
    base, lora, default = lora_pool.generate([
        GenerationRequest("base", messages, max_tokens=16, adapter=""),
        GenerationRequest("lora", messages, max_tokens=16, adapter=str(tiny_adapter)),
        GenerationRequest("default", messages, max_tokens=16),  # engine default = no adapter
    ])
    assert base.error is None and lora.error is None and default.error is None
    assert "Paris" in base.text
    assert lora.text != base.text
    assert default.text == base.text
    # vLLM applies the adapter as PEFT does: same greedy start as PEFT on transformers.
    reference = _peft_greedy(base_model_path, tiny_adapter, messages, 16)
    assert lora.text.split("\n")[0] == reference.split("\n")[0]


def test_merged_adapter_engine_serves_the_adapter_from_its_weights(ray_address, settings, tiny_adapter,
                                                                  base_model_path):
    """engine.merge_adapter: the default adapter is folded into the weights (no LoRARequest); answers match
    PEFT's, and any other adapter (or the bare base model) is refused per item."""
    merged_settings = settings.with_overrides(engine={"adapter": str(tiny_adapter), "merge_adapter": True,
                                                               "enable_lora": True,
                                                               "vllm_args": {"max_num_batched_tokens": 1024}},
                                              ray={"num_cpus_per_actor": 0.5})  # beside engine_pool and lora_pool
    pool = EnginePool.get_or_create(merged_settings)
    try:
        pool.ready()
        messages = _user("What is the capital of France?")
        default, base = pool.generate([GenerationRequest("default", messages, max_tokens=16),
                                       GenerationRequest("base", messages, max_tokens=16, adapter="")])
        assert default.error is None
        assert default.text.split("\n")[0] == _peft_greedy(base_model_path, tiny_adapter, messages, 16).split("\n")[0]
        assert base.text is None and base.error.startswith("adapter_refused") and "merge_adapter" in base.error
        desc = pool.describe()
        assert desc["adapter_merged"] is True and desc["adapter"] == "tiny-test"
        assert desc["max_num_batched_tokens"] == 1024 and desc["max_num_seqs"] == settings.engine.max_num_seqs
    finally:
        pool.shutdown()


def test_unknown_vllm_args_stop_the_engine_before_it_starts(settings):
    from notelake.conf.settings import ConfigError
    from notelake.models.vllm_engine import VLLMEngine

    for args, named in (({"max_num_batched_tokenz": 512}, "max_num_batched_tokenz"), ({"model": "other"}, "model")):
        with pytest.raises(ConfigError, match=f"engine.vllm_args: {named} not accepted"):
            VLLMEngine(settings.engine.model_copy(update={"vllm_args": args}))


def test_refused_adapter_is_a_per_item_error(lora_pool, base_model_path, tmp_path):
    from conftest import make_tiny_adapter

    wrong = make_tiny_adapter(base_model_path, tmp_path / "wrong-base", base_model_sha="0" * 64)
    ok, bad = lora_pool.generate([
        GenerationRequest("ok", _user("Say hello."), max_tokens=8, adapter=""),
        GenerationRequest("bad", _user("Say hello."), max_tokens=8, adapter=str(wrong)),
    ])
    assert ok.error is None
    assert bad.text is None and bad.error.startswith("adapter_refused") and "0" * 64 in bad.error


def test_counts_rise_per_finished_request_before_the_call_returns(engine_pool):
    """The actors' live counters (progress lines) advance as each request finishes: polled from another thread
    while one call of prompts with different max_tokens runs, they stand between the start and the end."""
    import threading
    import time

    n = 12
    requests = [GenerationRequest(f"count-{i}", _user("Write the numbers from 1 to 300, separated by commas."),
                                  max_tokens=1 if i % 2 else 128) for i in range(n)]
    before = engine_pool.counts()
    seen: list[int] = []
    finished = threading.Event()

    def poll() -> None:
        while not finished.is_set():
            seen.append(engine_pool.counts()["requests"] - before["requests"])
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        out = engine_pool.generate(requests, batch_size=n)  # one actor call of all n
    finally:
        finished.set()
        poller.join()
    assert all(r.error is None for r in out)
    assert any(0 < k < n for k in seen), seen
    after = engine_pool.counts()
    assert after["requests"] - before["requests"] == n
    assert after["output_tokens"] - before["output_tokens"] == sum(r.output_tokens for r in out)
    assert after["errors"] == before["errors"]


def test_describe_and_connect(engine_pool, ray_address, settings, base_model_sha):
    desc = engine_pool.describe()
    assert desc["backend"] == "vllm" and desc["model_sha256"] == base_model_sha
    assert desc["adapter"] is None and desc["dtype"] == "float32"
    assert desc["actors"][0]["name"] == f"notelake-engine-{engine_config_hash(settings.engine)}-0"
    again = EnginePool.connect(ray_address, settings)  # what a Spark executor does
    assert again.names == engine_pool.names == actor_names(settings)
    assert again.pids() == engine_pool.pids()


# ------------------------------------------------------------------ pool mechanics with fake actors (no vLLM)
@ray.remote(num_cpus=0)
class _EchoActor:
    def generate(self, requests):
        return [GenerationResult(r.request_id, f"echo:{r.request_id}", None) for r in requests]


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class _DyingActor:
    def generate(self, requests):
        os._exit(1)


def test_pool_orders_results_across_batches(ray_address, settings):
    actors = [_EchoActor.remote(), _EchoActor.remote()]
    pool = EnginePool(actors, ["echo-0", "echo-1"], settings)
    reqs = [GenerationRequest(f"r{i}", _user("x")) for i in range(11)]
    out = pool.generate(reqs, batch_size=2)
    assert [r.request_id for r in out] == [f"r{i}" for i in range(11)]
    assert all(r.text == f"echo:{r.request_id}" for r in out)
    pool.shutdown()


def test_progress_counts_never_go_back():
    """The live counters behind the progress lines: an actor that did not answer this time keeps its last answer
    (a busy actor used to count as zero: a line showed -523 prompts at -13 prompts/s), and one Ray restarted
    adds its new counts to what it counted before."""
    totals = CounterTotals()
    totals.update(0, {"requests": 523, "output_tokens": 8000, "errors": 1})
    totals.update(1, {"requests": 10, "output_tokens": 100, "errors": 0})
    assert totals.total() == {"requests": 533, "output_tokens": 8100, "errors": 1}
    # actor 1 not asked or not answering: no update, its 10 stand
    totals.update(0, {"requests": 600, "output_tokens": 9000, "errors": 1})
    assert totals.total()["requests"] == 610
    # actor 0 restarted: counting from zero again
    totals.update(0, {"requests": 5, "output_tokens": 50, "errors": 0})
    assert totals.total() == {"requests": 615, "output_tokens": 9150, "errors": 1}
    totals.update(0, {"requests": 7, "output_tokens": 70, "errors": 0})
    assert totals.total()["requests"] == 617


def test_dead_actor_gives_per_item_errors(ray_address, settings):
    pool = EnginePool([_DyingActor.remote()], ["dying-0"], settings)
    reqs = [GenerationRequest(f"r{i}", _user("x")) for i in range(5)]
    out = pool.generate(reqs, batch_size=2)
    assert [r.request_id for r in out] == [f"r{i}" for i in range(5)]
    assert all(r.text is None and r.error == ENGINE_UNAVAILABLE for r in out)
    pool.shutdown()


# ------------------------------------------------------------------ transformers fallback (no vLLM, no Ray)
def test_hf_engine_fallback(settings, tiny_adapter, base_model_sha):
    from notelake.models.engine import make_engine
    from notelake.models.hf_engine import HFEngine

    cfg = settings.engine.model_copy(update={"backend": "hf", "enable_lora": True})
    engine = make_engine(cfg)
    assert isinstance(engine.inner, HFEngine) and engine.backend == "hf"  # beside the heads (models/extractors.py)
    messages = _user("What is the capital of France?")
    reported = []
    base, lora, long = engine.generate([
        GenerationRequest("base", messages, max_tokens=12),
        GenerationRequest("lora", messages, max_tokens=12, adapter=str(tiny_adapter)),
        GenerationRequest("long", _user("note " * 5000), max_tokens=12),
    ], on_result=reported.append)
    assert reported == [base, lora, long]  # each request reported as it finished
    assert base.error is None and "Paris" in base.text and base.finish_reason == "stop"
    assert lora.error is None and lora.text != base.text
    assert long.text is None and long.error.startswith("prompt_too_long")
    (again,) = engine.generate([GenerationRequest("again", messages, max_tokens=12, adapter="")])
    assert again.text == base.text  # adapter switched off again for the base model
    desc = engine.describe()
    assert desc["backend"] == "hf" and desc["model_sha256"] == base_model_sha and desc["guided_decoding"] == "off"
    assert engine.count_tokens("hello world") > 0


_CHILD = """
import json, sys
from notelake.conf import Settings
from notelake.models.actor import EnginePool
from notelake.models.engine import GenerationRequest
pool = EnginePool.connect(sys.argv[1], Settings.model_validate(json.loads(sys.argv[2])))
(res,) = pool.generate([GenerationRequest("child", [{"role": "user", "content": "What is the capital of France?"}],
                                          max_tokens=16)])
print(json.dumps({"error": res.error, "paris": "Paris" in (res.text or "")}))
"""


def test_connect_from_another_process(engine_pool, ray_address, settings):
    """What a Spark executor's Python worker does: attach by GCS address, without the driver's Ray env vars."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run([sys.executable, "-c", _CHILD, ray_address, settings.model_dump_json()],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"error": None, "paris": True}
