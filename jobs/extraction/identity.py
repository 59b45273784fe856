"""What extracts a task's notes: the model, the adapter, the prompt version, and the extraction fingerprint that
keys the ledger (a note is extracted again when its text or this fingerprint changes)."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from notelake.conf import ConfigError, Settings
from notelake.conf.task import Task
from notelake.models.assertion import assertion_fingerprint
from notelake.models.extractors import ExtractorChoice, choose_extractors
from notelake.udfs.hashing import fingerprint as extraction_fingerprint
from notelake.udfs.parsing import PARSER_VERSION
from notelake.udfs.prompts import prompt_version
from notelake.udfs.windows import MAX_SPLIT_ROUNDS, MIN_WINDOW_CHARS

#: How the job's windows are answered (udfs/windows.py): no model call for a window without prose, a cut window
#: extracted again in pieces down to ``min_window_chars``, at most ``max_split_rounds`` rounds. A change of these
#: rules changes answers: bump ``recovery`` or change a bound.
WINDOW_RECOVERY = {"recovery": "prose-split-1", "min_window_chars": MIN_WINDOW_CHARS,
                   "max_split_rounds": MAX_SPLIT_ROUNDS}

log = logging.getLogger("notelake.extract")

SHIPPED_ADAPTER = Path(__file__).resolve().parents[2] / "models" / "adapters" / "notelake-mt"


@dataclass(frozen=True)
class Lineage:
    """The lineage columns every output row of a task's run carries (``run_id`` is the task's run)."""

    run_id: str
    model: str
    adapter: str | None
    adapter_sha256: str | None
    prompt_version: str
    fingerprint: str

    def columns(self) -> dict:
        """The columns by name (the row assembler's ``lineage``)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ExtractionIdentity:
    """The model and adapter a task runs on, its prompt version, and the extraction fingerprint over all that
    changes an answer (weights, prompt, sampling, chunking and window recovery, parser, backend, assertion method)."""

    model: str
    model_sha256: str
    adapter: str | None
    adapter_sha256: str | None
    prompt_version: str
    fingerprint: str
    extractors: ExtractorChoice = ExtractorChoice()  # who writes the concepts and relations (models/extractors.py)

    def lineage(self, run_id: str) -> Lineage:
        """The lineage of run ``run_id`` under this identity."""
        return Lineage(run_id=run_id, model=self.model, adapter=self.adapter, adapter_sha256=self.adapter_sha256,
                       prompt_version=self.prompt_version, fingerprint=self.fingerprint)


def describe_extraction(settings: Settings, task: Task) -> ExtractionIdentity:
    """The identity ``task`` is extracted under with ``settings``; raises ConfigError (no model, a tagger without
    its head, job.assertion context or combined without medSpaCy) and the adapters' errors (wrong base model, wrong
    task)."""
    from notelake.models.adapters import AdapterError, load_adapter, load_head
    from notelake.models.base_model import model_sha256, resolve_model

    try:
        model_path = resolve_model(settings.engine.model)
    except FileNotFoundError as exc:
        raise ConfigError(f"engine.model: {exc}") from None
    base_sha = model_sha256(model_path)
    pairs = None
    if settings.engine.backend == "tagger":
        if not settings.engine.adapter:
            raise ConfigError("engine.backend tagger needs engine.adapter: a tagger folder (objective: tag)")
        adapter = load_head(settings.engine.adapter, base_sha, task.name)
        if settings.engine.pairs:
            pairs = load_head(settings.engine.pairs, base_sha, task.name, kind="pairs")
    else:
        adapter = load_adapter(settings.engine.adapter, base_sha, task.name) if settings.engine.adapter else None
    if adapter is None and not task.define_labels:
        warn_trained_task_without_adapter(task)
    try:
        extractors = choose_extractors(settings.engine, task.name, adapter, base_sha)
    except AdapterError as exc:
        raise ConfigError(f"engine.heads: {exc}") from None
    if extractors.uses_heads:
        log.info("task %s: concepts from %s, relations from %s (recorded dev figures %s)", task.name,
                 extractors.tagger.name, extractors.pairs.name if extractors.pairs else "the generative answer",
                 json.dumps(dict(extractors.figures)))
    version = prompt_version(task)
    sampling = {"temperature": settings.engine.temperature, "max_tokens": settings.engine.max_tokens or task.max_tokens,
                "guided_decoding": settings.engine.guided_decoding, "seed": settings.engine.seed}
    if pairs is not None:  # the relations' classifier (absent otherwise: fingerprints without one are unchanged)
        sampling["pairs_sha256"] = pairs.sha256
    if extractors.fingerprint() is not None:  # a head's concepts (absent otherwise: fingerprints are unchanged)
        sampling["extractors"] = extractors.fingerprint()
    if settings.engine.backend == "vllm" and settings.engine.answer_args:  # e.g. quantization (absent: unchanged)
        sampling["vllm_args"] = settings.engine.answer_args
    chunking = {"max_chunk_chars": task.max_chunk_chars, "overlap": task.overlap(settings.job.chunk_overlap_chars),
                "windows": WINDOW_RECOVERY}
    adapter_sha = adapter.sha256 if adapter else None
    assertion = assertion_fingerprint(settings.job.assertion, task.assertion_labels)
    if assertion is not None and assertion["medspacy"] is None:  # else every note would fail on the executors
        raise ConfigError(f"job.assertion {settings.job.assertion} needs medSpaCy (ConText): `make install`, or "
                          "pip install 'notelake[assertion]' then pip install --no-deps medspacy==1.3.1; or set "
                          "job.assertion: model")
    return ExtractionIdentity(
        model=settings.engine.model, model_sha256=base_sha, adapter=adapter.name if adapter else None,
        adapter_sha256=adapter_sha, prompt_version=version, extractors=extractors,
        fingerprint=extraction_fingerprint(base_sha, adapter_sha, version, sampling, chunking, PARSER_VERSION,
                                           settings.engine.backend, assertion))


def warn_trained_task_without_adapter(task: Task) -> None:
    """A trained task's prompt has no label definitions: without its adapter the base model cannot do it."""
    try:
        shipped = json.loads((SHIPPED_ADAPTER / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        shipped = {}
    scores = (shipped.get("dev_scores") or {}).get(task.name) or {}
    expected = f" (the shipped adapter scores {scores['cce_lenient_f1']:.2f} lenient F1 on {task.name} dev)" \
        if "cce_lenient_f1" in scores else ""
    log.warning("task %s was trained into an adapter (define_labels: false) but engine.adapter is not set: the base "
                "model runs it zero-shot without label definitions and extracts next to nothing%s. Set "
                "engine.adapter: models/adapters/notelake-mt", task.name, expected)


def job_engine_settings(settings: Settings) -> Settings:
    """The engine the job needs. Every prompt of a job goes to the engine's own adapter (``engine.adapter``), never
    to a per-request one, so an engine with no adapter to serve is started without LoRA support: vLLM runs its
    LoRA kernels on every request of a LoRA-enabled engine, base-model requests included (the cost is measured in
    docs/benchmarks.md). A merged adapter already runs without LoRA (models/engine.py)."""
    engine = settings.engine
    if engine.backend == "vllm" and engine.enable_lora and not engine.adapter:
        return settings.with_overrides(engine={"enable_lora": False})
    return settings
