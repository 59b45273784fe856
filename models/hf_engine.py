"""The transformers fallback engine (``engine.backend: hf``) where vLLM cannot be installed.

Greedy or sampled generation, one request at a time. No guided decoding (``guide`` is ignored;
``describe()['guided_decoding']`` is "off"). LoRA adapters are served through PEFT (loaded on first use,
switched per request); ``engine.merge_adapter`` does not apply. Nothing here logs prompt, note or output text.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from notelake.conf.settings import EngineConfig
from notelake.models.engine import (INSTALL_HINT, AdapterResolver, GenerationRequest, GenerationResult,
                                    ResultCallback, describe_loaded, error_result, exc_category, prompt_too_long)

log = logging.getLogger(__name__)


class HFEngine:
    """A transformers causal LM on the local device (CUDA when present), one request at a time."""

    backend = "hf"
    merged = False

    def __init__(self, cfg: EngineConfig):
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise ImportError(f"the HF engine needs torch and transformers: {INSTALL_HINT} ({exc})") from exc
        from notelake.models.base_model import model_sha256, resolve_model

        t0 = time.monotonic()
        self.cfg = cfg
        self._torch = torch
        self.model_path = resolve_model(cfg.model)
        self.model_sha256 = model_sha256(self.model_path)
        self.adapters = AdapterResolver(cfg, self.model_sha256)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype, "auto")
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_path))
        self.model = AutoModelForCausalLM.from_pretrained(str(self.model_path), dtype=dtype).to(self.device).eval()
        self._peft_names: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self.load_seconds = round(time.monotonic() - t0, 1)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _activate(self, info) -> Any:
        """Select the adapter (or the base model); returns a context manager to run generation in."""
        if info is None:
            if self._peft_names:
                return self.model.disable_adapter()
            return contextlib.nullcontext()
        key = (str(info.path), info.sha256)
        if key not in self._peft_names:
            name = f"a{len(self._peft_names)}"
            if not self._peft_names:
                from peft import PeftModel

                self.model = PeftModel.from_pretrained(self.model, str(info.path), adapter_name=name).eval()
            else:
                self.model.load_adapter(str(info.path), adapter_name=name)
            self._peft_names[key] = name
        self.model.set_adapter(self._peft_names[key])
        return contextlib.nullcontext()

    def generate(self, requests: list[GenerationRequest],
                 on_result: ResultCallback | None = None) -> list[GenerationResult]:
        results = []
        with self._lock:
            for req in requests:
                results.append(self._generate_one(req))
                if on_result is not None:
                    on_result(results[-1])
        return results

    def _generate_one(self, req: GenerationRequest) -> GenerationResult:
        from notelake.models.adapters import AdapterError

        try:
            info = self.adapters.for_request(req)
        except AdapterError as exc:
            return error_result(req.request_id, f"adapter_refused: {exc}")
        try:
            text = self.tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        except Exception as exc:  # noqa: BLE001
            return error_result(req.request_id, f"bad_prompt: {exc_category(exc)}")
        too_long = prompt_too_long(req, len(ids), self.cfg.max_model_len)
        if too_long is not None:
            return too_long
        try:
            return self._decode(req, ids, info)
        except Exception as exc:  # noqa: BLE001
            log.warning("request %s failed in HF generate (%s)", req.request_id, exc_category(exc))
            return error_result(req.request_id, f"engine_error: {exc_category(exc)}", len(ids))

    def _decode(self, req: GenerationRequest, ids: list[int], info) -> GenerationResult:
        """Generate up to ``req.max_tokens`` tokens after the prompt ``ids`` with ``info``'s adapter (or none)."""
        torch = self._torch
        input_ids = torch.tensor([ids], device=self.device)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        gen_kwargs: dict[str, Any] = {"max_new_tokens": req.max_tokens, "pad_token_id": pad_id}
        if self.cfg.temperature > 0:
            torch.manual_seed(self.cfg.seed)
            gen_kwargs.update(do_sample=True, temperature=self.cfg.temperature)
        else:
            gen_kwargs.update(do_sample=False)
        with torch.no_grad(), self._activate(info):
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **gen_kwargs)
        new = out[0][len(ids):].tolist()
        eos = self.tokenizer.eos_token_id
        stopped = eos is not None and eos in new
        if stopped:
            new = new[: new.index(eos) + 1]
        return GenerationResult(
            request_id=req.request_id, text=self.tokenizer.decode(new, skip_special_tokens=True),
            error=None, prompt_tokens=len(ids), output_tokens=len(new),
            finish_reason="stop" if stopped else ("length" if len(new) >= req.max_tokens else "stop"),
        )

    def describe(self) -> dict:
        return describe_loaded(self, guided_decoding="off")  # no guided decoding in the fallback
