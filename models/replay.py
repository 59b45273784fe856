"""REPLAY engine (``engine.backend: replay``): made-up, schema-valid answers after a simulated latency.

For data-plane benchmarks only, never for quality: it lets the job's Spark -> Ray hand-off, back-pressure,
parsing, grounding and Delta writes run at corpus sizes (10^5-10^6 notes) the real engine cannot reach on a
benchmark machine. It implements the :class:`~notelake.models.engine.Engine` interface of models/engine.py.

Answers: for each prompt, a v2 answer (udfs/answer.py) naming a few words that really occur in the prompt's text
(so grounding finds real offsets), one ``Label: word`` line each, labels drawn from the request's answer grammar
(no grammar: ``none``), the first line carrying a reference to the second when the grammar has reference items.
Deterministic per text (seeded by its sha256).

Latency (what one vLLM engine with continuous batching costs): a ``generate`` call runs one batch at a time,
like :class:`~notelake.models.vllm_engine.VLLMEngine`, in waves of ``max_num_seqs`` requests; each wave sleeps
``prefill_s_per_token`` x its prompt tokens + ``decode_step_s`` x its longest answer in tokens. Token counts
come from the base model's tokenizer and chat template, as in the vLLM engine. Defaults (GPU-like for a
135M model) can be changed with the environment variables ``NOTELAKE_REPLAY_DECODE_STEP_S`` and
``NOTELAKE_REPLAY_PREFILL_S_PER_TOKEN`` (read when the engine is created, e.g. in a Ray actor that inherits
the driver's environment).

Nothing here logs prompt, note or answer text: counts and timings only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import threading
import time

from notelake.conf.settings import EngineConfig
from notelake.udfs.answer import ITEM_SEP, NONE
from notelake.models.engine import (GenerationRequest, GenerationResult, ResultCallback, error_result, exc_category,
                                    prompt_too_long, report_each, versions)

log = logging.getLogger(__name__)

DECODE_STEP_ENV = "NOTELAKE_REPLAY_DECODE_STEP_S"
PREFILL_ENV = "NOTELAKE_REPLAY_PREFILL_S_PER_TOKEN"
DEFAULT_DECODE_STEP_S = 0.004
DEFAULT_PREFILL_S_PER_TOKEN = 2e-6
# udfs.prompts puts the note text last in the final user turn, after this marker in a zero-shot prompt.
TEXT_MARKER = "\n\nText:\n"
WORD = re.compile(r"[A-Za-z][A-Za-z0-9-]{2,}")
MAX_CONCEPTS = 4


def _rule_labels(grammar: str, rule: str) -> list[str]:
    """The quoted alternatives in the first group of ``rule`` of an answer grammar (udfs.answer.answer_grammar)."""
    m = re.search(rf"^{rule} ::= \(([^)]*)\)", grammar, re.MULTILINE)
    return re.findall(r'"([^"]+)"', m.group(1)) if m else []


def replay_answer(text: str, guide: dict | None) -> str:
    """A grammar-valid v2 answer naming up to MAX_CONCEPTS distinct words of ``text``, in text order."""
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    words = list(dict.fromkeys(WORD.findall(text)))
    labels = _rule_labels(guide["grammar"], "concept") if guide else []
    if not labels or not words:
        return NONE
    picked = sorted(rng.sample(range(len(words)), min(MAX_CONCEPTS, len(words))))
    lines = [f"{rng.choice(labels)}: {words[i]}" for i in picked]
    references = _rule_labels(guide["grammar"], "reference")
    if references and len(picked) >= 2:
        lines[0] += f"{ITEM_SEP}{rng.choice(references)}: {words[picked[1]]}"
    return "\n".join(lines)


class ReplayEngine:
    """Generated answers with a simulated batched latency (see the module docstring)."""

    backend = "replay"

    def __init__(self, cfg: EngineConfig, decode_step_s: float | None = None,
                 prefill_s_per_token: float | None = None):
        from transformers import AutoTokenizer

        from notelake.models.base_model import model_sha256, resolve_model

        t0 = time.monotonic()
        self.cfg = cfg
        self.decode_step_s = float(os.environ.get(DECODE_STEP_ENV, DEFAULT_DECODE_STEP_S)) \
            if decode_step_s is None else decode_step_s
        self.prefill_s_per_token = float(os.environ.get(PREFILL_ENV, DEFAULT_PREFILL_S_PER_TOKEN)) \
            if prefill_s_per_token is None else prefill_s_per_token
        self.model_path = resolve_model(cfg.model)
        self.model_sha256 = model_sha256(self.model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_path))
        self._gen_lock = threading.Lock()  # one batch at a time, like VLLMEngine
        self.load_seconds = round(time.monotonic() - t0, 1)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _prompt_tokens(self, messages: list[dict]) -> int:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.count_tokens(text)

    def _answer(self, req: GenerationRequest) -> GenerationResult:
        try:
            prompt_tokens = self._prompt_tokens(req.messages)
            text = req.messages[-1]["content"].rpartition(TEXT_MARKER)[2]
        except Exception as exc:  # noqa: BLE001 - malformed messages
            return error_result(req.request_id, f"bad_prompt: {exc_category(exc)}")
        too_long = prompt_too_long(req, prompt_tokens, self.cfg.max_model_len)
        if too_long is not None:
            return too_long
        ids = self.tokenizer.encode(replay_answer(text, req.guide), add_special_tokens=False)
        finish = "length" if len(ids) > req.max_tokens else "stop"
        ids = ids[:req.max_tokens]
        return GenerationResult(request_id=req.request_id, text=self.tokenizer.decode(ids), error=None,
                                prompt_tokens=prompt_tokens, output_tokens=len(ids), finish_reason=finish)

    def generate(self, requests: list[GenerationRequest],
                 on_result: ResultCallback | None = None) -> list[GenerationResult]:
        """The answers, each wave's handed to ``on_result`` when its simulated latency has passed."""
        with self._gen_lock:
            t0 = time.monotonic()
            results = [self._answer(r) for r in requests]
            wave = self.cfg.max_num_seqs
            simulated = 0.0
            for start in range(0, len(results), wave):
                batch = results[start:start + wave]
                simulated += (self.prefill_s_per_token * sum(r.prompt_tokens for r in batch)
                              + self.decode_step_s * max(r.output_tokens for r in batch))
                # The answers' own tokenisation counts as part of the simulated time.
                time.sleep(max(0.0, simulated - (time.monotonic() - t0)))
                report_each(batch, on_result)
        log.info("replayed %d results (%d prompt tokens, %d output tokens) in %.2f s", len(results),
                 sum(r.prompt_tokens for r in results), sum(r.output_tokens for r in results), time.monotonic() - t0)
        return results

    def describe(self) -> dict:
        return {
            "backend": self.backend, "model": self.cfg.model, "model_path": str(self.model_path),
            "model_sha256": self.model_sha256, "adapter": None, "adapter_path": None, "adapter_sha256": None,
            "dtype": self.cfg.dtype, "max_model_len": self.cfg.max_model_len,
            "guided_decoding": self.cfg.guided_decoding,
            "enable_lora": False, "load_seconds": self.load_seconds, "versions": versions(), "pid": os.getpid(),
            "replay_decode_step_s": self.decode_step_s, "replay_prefill_s_per_token": self.prefill_s_per_token,
        }
