"""Typed, validated configuration: one pydantic model per stage, loaded from a YAML per environment.

``load_settings("conf/local.yaml")`` returns a :class:`Settings`; a bad file raises :class:`ConfigError`
whose message names the offending field (e.g. ``engine.dtype: Input should be 'float32', ...``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

CONF_DIR = Path(__file__).resolve().parent
TASKS_DIR = CONF_DIR / "tasks"


def notelake_home() -> Path:
    """Cache root for base models and other rebuilt artefacts (``NOTELAKE_HOME``, default ~/.cache/notelake)."""
    return Path(os.environ.get("NOTELAKE_HOME", Path.home() / ".cache" / "notelake")).expanduser()


class ConfigError(ValueError):
    """A configuration file could not be read or validated; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: vLLM engine arguments that schedule, place or speed up the work and leave what each answer computes as it is
#: (speculative decoding verifies every drafted token against the model): changing them does not re-extract.
#: Every other ``engine.vllm_args`` entry (quantization, kv_cache_dtype, hf_overrides, ...) is fingerprinted.
SCHEDULING_VLLM_ARGS = frozenset({
    "max_num_seqs", "max_num_batched_tokens", "max_num_partial_prefills", "enable_chunked_prefill",
    "async_scheduling", "scheduling_policy", "gpu_memory_utilization", "kv_cache_memory_bytes", "swap_space",
    "cpu_offload_gb", "block_size", "enable_prefix_caching", "enforce_eager", "compilation_config",
    "max_seq_len_to_capture", "speculative_config", "disable_log_stats", "tensor_parallel_size",
    "pipeline_parallel_size", "distributed_executor_backend", "max_parallel_loading_workers",
})


class EngineConfig(_Strict):
    """One vLLM engine (one per GPU, one on CPU)."""

    backend: Literal["vllm", "hf", "replay", "tagger"] = Field(
        "vllm", description="vllm (default) or the HF-transformers fallback; tagger = the classification-head "
                            "baseline (engine.adapter = a folder trained with objective: tag; concepts only, grounded "
                            "by the tokenizer's offsets); replay = made-up answers after a simulated latency, for "
                            "data-plane benchmarks only, never quality (models/replay.py)")
    model: str = Field("smollm2-135m-instruct", description="base model: a folder or a name under NOTELAKE_HOME/models")
    pairs: str | None = Field(None, description="tagger backend only: a relation pair classifier folder (training "
                                                "objective: pair) run over the tagger's concepts; null = concepts only")
    adapter: str | None = Field(None, description="LoRA adapter folder (with manifest.json); null = base model")
    concepts_from: Literal["auto", "generative", "tagger"] = Field(
        "auto", description="vllm, hf and replay backends: who writes a task's concepts. auto = per task, the "
                            "extractor whose dev figure recorded in its manifest is higher on the same dev slice: engine.adapter, or "
                            "a tagger under engine.heads (the generative answer's relations then anchored on the "
                            "tagger's concepts, models/extractors.py); generative = engine.adapter only; tagger = "
                            "the best recorded tagger of the task (a task without one is refused)")
    relations_from: Literal["auto", "generative", "pairs"] = Field(
        "auto", description="where concepts come from a tagger: its relations from the generative answer or from a "
                            "pair classifier under engine.heads (auto = the higher recorded dev figure)")
    heads: str | None = Field(None, description="folder of trained classification heads (taggers, pair classifiers) "
                                                "the choice reads; null = the shipped models/taggers")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field("float32", description="float32 on CPU, bfloat16 on GPU")
    max_model_len: int = Field(4096, ge=256, description="context window the engine reserves per sequence")
    gpu_memory_utilization: float = Field(0.25, gt=0, le=0.95, description="KV-cache fraction (CPU: of host memory)")
    max_num_seqs: int = Field(32, ge=1, description="sequences decoded together (continuous batching)")
    enable_lora: bool = Field(True, description="serve LoRA adapters through LoRARequest")
    max_lora_rank: int = Field(16, ge=1, description="largest adapter rank the engine accepts")
    max_loras: int = Field(2, ge=1, description="adapters resident at once")
    merge_adapter: bool = Field(
        False, description="vLLM backend: serve engine.adapter merged into the base weights (built once, cached "
                           "under NOTELAKE_HOME/merged): no per-token LoRA work, but no other adapter on that engine")
    guided_decoding: Literal["grounded", "labels", "off"] = Field(
        "grounded", description="structured outputs over the answer grammar: grounded = labels as enums and every "
                                "mention one of the chunk's own word n-grams (grounded by construction); labels = "
                                "labels as enums, free mentions; off = free generation (docs/quality.md A/B)")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    max_tokens: int | None = Field(None, ge=1, description="answer budget; null = the task's own max_tokens")
    seed: int = Field(0, description="sampling seed")
    enforce_eager: bool = Field(True, description="skip graph capture (faster start on CPU)")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine spans (vLLM tensor parallelism; > 1 "
                                                           "runs vLLM's own Ray workers, one per GPU)")
    cpu_reserved_cores: int | None = Field(
        None, ge=0, description="vllm-cpu only: cores kept off the model for vLLM's scheduler "
                                "(VLLM_CPU_NUM_OF_RESERVED_CPU); null = vLLM's default (1). 0 on a small box gives "
                                "the model every core (docs/benchmarks.md)")
    vllm_args: dict[str, Any] = Field(
        default_factory=dict, description="vLLM backend: further engine arguments (vLLM EngineArgs names, e.g. "
                                          "max_num_batched_tokens, speculative_config), applied after the ones above; "
                                          "an unknown name stops the engine's start with a ConfigError. Measured on "
                                          "CPU: docs/benchmarks.md 'Engine arguments tried'. Those that can change an "
                                          "answer (all but SCHEDULING_VLLM_ARGS) are part of the extraction "
                                          "fingerprint: setting one re-extracts")

    @property
    def answer_args(self) -> dict[str, Any]:
        """The ``vllm_args`` entries that can change an answer (the extraction fingerprint's share of them)."""
        return {name: value for name, value in self.vllm_args.items() if name not in SCHEDULING_VLLM_ARGS}


class RayConfig(_Strict):
    address: str | None = Field(
        None, description="an existing Ray cluster: 'auto' (this node belongs to it) or its GCS address host:port; "
                          "null = start a local Ray. Spark executors must run on the cluster's nodes")
    namespace: str = Field("notelake", description="namespace for the named engine actors")
    num_actors: int = Field(1, ge=1, description="engine actors (one per GPU)")
    num_gpus_per_actor: float = Field(0, ge=0, description="GPUs per engine actor (1 on GPU machines)")
    num_cpus_per_actor: float = Field(1, gt=0, description="CPUs reserved per engine actor")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a locally started Ray (null = all)")
    max_restarts: int = Field(2, ge=0, description="times Ray restarts a dead engine actor")
    max_task_retries: int = Field(2, ge=0, description="times a batch in flight on a dead actor is retried")
    batch_size: int = Field(16, ge=1, description="prompts per actor call")
    max_in_flight: int = Field(2, ge=1, description="calls in flight per actor (keeps continuous batching full)")
    batches_ahead: int = Field(1, ge=0, description="Arrow batches a Spark partition sends to the engines before it "
                                                    "parses the one in front (0 = one batch at a time): the engines "
                                                    "keep decoding across batch boundaries")
    call_timeout_s: float = Field(
        600, gt=0, description="an engine call is given up as engine_timeout when its actor has finished no request "
                               "for this long while the call waited (a hung or stopped engine; a busy one that "
                               "keeps finishing requests is waited for). The actor is then restarted and the call "
                               "sent again (ray.call_retries); never a hang")
    call_retries: int = Field(2, ge=0, description="times a batch is sent again after an engine fault (actor lost, "
                                                   "engine step error, timeout), to another actor when there is one. "
                                                   "A note whose batch still fails is left for the next run: an "
                                                   "engine fault never counts as the note's attempt")
    restart_after_failures: int = Field(3, ge=1, description="an engine actor whose engine fails this many calls in "
                                                             "a row restarts itself (Ray restarts it at most "
                                                             "ray.max_restarts times)")
    engine_scope: Literal["pass", "cluster"] = Field(
        "pass", description="who owns the job's engine actors: pass = each pass starts its own (named after the "
                            "pass) and stops them when it ends, so two jobs on one Ray cluster never share or kill "
                            "each other's; cluster = actors named after the engine config only, created detached "
                            "(they outlive every driver) and shared on purpose by every job with that config")

    @field_validator("address")
    @classmethod
    def _no_ray_client(cls, address: str | None) -> str | None:
        # A Ray Client (ray://) connection gives Spark executors no GCS address to join, and each executor would
        # need a client session of its own: the executors must run on the Ray cluster's nodes.
        if address and address.startswith("ray://"):
            raise ValueError("Ray Client addresses (ray://) are not supported: run the Spark executors on the Ray "
                             "cluster's nodes and set 'auto' or the head's GCS address host:6379 (README, cluster "
                             "mode)")
        return address


class SparkConfig(_Strict):
    master: str = Field("local[2]", description="Spark master URL")
    shuffle_partitions: int = Field(4, ge=1, description="spark.sql.shuffle.partitions")
    arrow_batch_size: int = Field(64, ge=1, description="notes per Arrow batch handed to Ray")
    extra: dict[str, str] = Field(default_factory=dict, description="extra spark.* settings")


#: input.passthrough_columns when unset: each copied when the input has it, silently skipped when it does not
DEFAULT_PASSTHROUGH = ("patient_id", "note_date", "note_type")


class InputConfig(_Strict):
    format: Literal["auto", "delta", "parquet", "table", "jsonl"] = Field("auto", description="how --input is read")
    note_id_column: str = Field("note_id", description="column holding the note id")
    text_column: str = Field("text", description="column holding the note text")
    passthrough_columns: list[str] | None = Field(
        None, description="input columns copied onto every output row; each one named must be in the input (else "
                          "exit 2 naming it), and one added later becomes a new column of the output tables (older "
                          "rows null until refreshed). null = the optional defaults patient_id, note_date, "
                          "note_type, each copied when the input has it",
    )
    updated_at_column: str | None = Field(
        None, description="watermark column (timestamp or date) of input.watermark column: a run reads the rows "
                          "updated at or after the last complete run's high-water mark (for the same task and "
                          "fingerprint) less input.watermark_lookback_s, and rows without one; the mark is the "
                          "latest value read, at most the run's start. A date column re-reads the mark's whole "
                          "day. null = every row")
    watermark: Literal["column", "delta_version"] = Field(
        "column", description="what tells a run which rows changed: column = input.updated_at_column; "
                              "delta_version = the Delta input's table version (no column): an unmoved version "
                              "reads nothing but retries, a moved one reads the notes its change data feed names "
                              "(when delta.enableChangeDataFeed was on since the last complete run's version), "
                              "else every note, the ledger skipping the unchanged")
    watermark_lookback_s: float = Field(
        86400, ge=0, description="input.watermark column: seconds re-read below the high-water mark, for rows "
                                 "committed after a run with an earlier updated_at (CDC lag, long upstream "
                                 "transactions, event-time stamps); a row committed later than this after its "
                                 "updated_at can be missed. Re-read notes that did not change cost no model call")
    max_text_chars: int = Field(200_000, ge=1, description="longer notes are rejected to the errors table")

    @model_validator(mode="after")
    def _one_watermark(self) -> "InputConfig":
        if self.watermark == "delta_version" and self.updated_at_column:
            raise ValueError("input.watermark delta_version selects changed rows by the table's version: unset "
                             "input.updated_at_column (or set input.watermark: column)")
        return self


class JobConfig(_Strict):
    task: str = Field("phee", description="task name (conf/tasks/<name>.yaml) or a task YAML path; several, "
                                          "comma-separated (phee,maccrobat), run in one pass: the input is read "
                                          "and hashed once and every task's prompts share the engines")
    round_notes: int = Field(2000, ge=1, description="notes extracted and committed per round (bounds memory, limits rework)")
    max_error_rate: float = Field(0.2, ge=0, le=1, description="fail the run (exit 1) when (newly failed + newly "
                                                                "rejected) / (notes attempted for the first time + "
                                                                "newly rejected) exceeds this, from "
                                                                "job.min_errors_for_rate such errors; retries of known "
                                                                "failures are reported apart and not counted")
    min_errors_for_rate: int = Field(5, ge=1, description="the error-rate brakes (job.max_error_rate, "
                                                          "job.max_engine_error_rate) need at least this many errors "
                                                          "of their kind: a few failing notes on a quiet night do not "
                                                          "fail the run")
    max_engine_error_rate: float = Field(
        0.1, ge=0, le=1, description="stop the run after the round in which notes left for the next run by engine "
                                     "faults / notes sent to the engines passes this (from job.min_errors_for_rate "
                                     "such notes): exit 6, what succeeded is committed")
    max_attempts: int = Field(3, ge=1, description="extraction attempts per note text and fingerprint; a note that "
                                                   "failed this often is reported as given up, not retried")
    note_buckets: int = Field(64, ge=1, le=4096, description="hash buckets of note ids partitioning the output "
                                                             "tables (with task); fixed when an output is created")
    chunk_overlap_chars: int = Field(200, ge=0, description="overlap between chunks of a long note")
    assertion: Literal["model", "context", "combined"] = Field(
        "combined", description="who sets a concept's assertion (present, negated, speculated, hypothetical): "
                                "model = the extractor's marker; context = ConText (medspaCy's rules) over the "
                                "concept's offsets; combined = negation from ConText, speculation and hypothesis "
                                "from the model. ConText judges only the task's assertion_labels "
                                "(models/assertion.py)")
    warn_no_concept_share: float | None = Field(
        0.5, ge=0, le=1, description="warn (log line and the runs row's warnings_json) when at least this share of "
                                     "a run's succeeded notes got no concept: a label set the model does not "
                                     "answer fails silently otherwise; null = never")
    log_phi: bool = Field(False, description="debug only: full tracebacks (which may quote note text) in logs; "
                                             "warns at start. Off: logs carry ids, counts, types and rates only")
    output_root: str | None = Field(None, description="when set, --output must resolve (symlinks followed) inside "
                                                      "this directory; the job writes nothing outside --output")
    umask: str = Field("077", pattern=r"^0?[0-7]{3}$", description="octal umask for everything the job writes "
                                                                  "(077: files 0600, folders 0700: PHI)")
    lock_timeout_s: float = Field(0, ge=0, description="wait this long for another run on the same --output to "
                                                       "finish, then exit 3 (0 = fail at once)")
    lease_ttl_s: float = Field(120, gt=0, description="object-store outputs: the run's lease on --output expires this "
                                                      "long after its last renewal (renewed every quarter of it); a "
                                                      "killed run keeps the next one out this long at most")
    propagate_deletes: bool = Field(
        False, description="remove the output rows of notes no longer in the input (one extra scan of the id "
                           "column). Only for a full note table: never with an input that holds changed rows only")
    max_delete_fraction: float = Field(
        0.2, ge=0, le=1, description="--propagate-deletes brake: a run that would delete more than this fraction of "
                                     "a task's ledger notes stops before writing anything (exit 2, the count "
                                     "printed); an empty input never deletes. Raise it for one run to confirm a "
                                     "real mass deletion")
    max_runtime_s: float | None = Field(None, gt=0, description="submit no new work after this many seconds (a "
                                                                "backfill in nightly slices), and stop waiting for "
                                                                "the engines then: what finished is committed, the "
                                                                "rest waits for the next run")
    stop_grace_s: float = Field(120, gt=0, description="job.max_runtime_s as a hard limit: a round still running "
                                                       "this long after it is cancelled, uncommitted (exit 7); "
                                                       "earlier rounds stay committed")
    progress_interval_s: float = Field(30, gt=0, description="a progress line (notes, prompts/s, output tok/s, "
                                                             "failures, ETA) every this many seconds")

    @field_validator("task")
    @classmethod
    def _task_list(cls, task: str) -> str:
        names = [t.strip() for t in task.split(",")]
        if not all(names):
            raise ValueError(f"empty task name in {task!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"task named twice in {task!r}")
        return ",".join(names)

    @property
    def tasks(self) -> list[str]:
        """The tasks of the run, in the order given."""
        return self.task.split(",")


class StorageConfig(_Strict):
    """Object-store access for input, output and staging URIs (s3://, gs://, abfss://, file://, plain paths)."""

    options: dict[str, SecretStr] = Field(
        default_factory=dict, description="delta-rs storage options (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...); "
                                          "keys missing here are taken from the environment. Never logged")
    staging: str | None = Field(
        None, description="where executors stage rows before a round commits (a location every executor and the "
                          "driver reach); null = <output>/_staging. Outputs sharing it stage under their own "
                          "subfolder (<staging>/<output's last path part>-<hash of its URI>)")

    def revealed_options(self) -> dict[str, str]:
        """The configured options in clear (for the storage clients only: never log or persist them)."""
        return {k: v.get_secret_value() for k, v in self.options.items()}


class OmopConfig(_Strict):
    """Concept normalization to the site's OMOP vocabulary and the OMOP CDM output (jobs/linking/)."""

    link: Literal["auto", "on", "off"] = Field(
        "auto", description="the extraction job links the pass's concepts after its rounds (jobs/linking/): "
                            "auto = when a vocabulary is at <output>/vocabulary, else skipped; on = always; no "
                            "vocabulary under on, or none where omop.vocabulary says: exit 2 with the extraction "
                            "committed. off = never (`notelake link` links on request whatever this says)")
    publish: Literal["auto", "on", "off"] = Field(
        "auto", description="the extraction job then publishes the OMOP tables (jobs/omop/: note_nlp, "
                            "note_nlp_relation, derived rows): auto = when it linked in the same run; on = always "
                            "(mentions without a link get concept 0); off = never (`notelake omop` on request)")
    vocabulary: str | None = Field(None, description="where the vocabulary's Delta tables are (concept, "
                                                     "concept_synonym, concept_relationship, concept_ancestor, "
                                                     "vocabulary): a path or URI; null = <output>/vocabulary "
                                                     "(written by `notelake vocab load`)")
    fuzzy_scorer: Literal["ratio", "token_sort_ratio"] = Field(
        "token_sort_ratio", description="rapidfuzz scorer of the fuzzy step, on normalized strings (token_sort: "
                                        "word order ignored)")
    fuzzy_threshold: float = Field(0.9, ge=0, le=1, description="a fuzzy match is accepted only at or above this "
                                                                "similarity (0..1)")
    fuzzy_margin: float = Field(0.05, ge=0, le=1, description="... and only this far above the best score of any "
                                                              "other concept (else: ambiguous, concept 0)")
    fuzzy_min_chars: int = Field(4, ge=1, description="normalized mentions shorter than this are matched exactly "
                                                      "only (a short string is one edit from many terms)")
    link_rows_per_pass: int = Field(
        500_000, ge=1, description="concept rows linked per Spark pass and commit: whole note buckets are taken "
                                   "until the next would pass this (bounds the driver's memory: only link rows, "
                                   "no text, come back to it)")
    # -- the OMOP CDM output (jobs/omop/: note_nlp, note_nlp_relation, NLP-derived domain rows)
    term_exists_speculated: Literal["Y", "N"] = Field(
        "N", description="note_nlp.term_exists of a speculated mention ('possible', 'may have'). Present -> Y, "
                         "negated and hypothetical -> N always. N (default) counts only asserted facts; the CDM's "
                         "own text leaves moderate uncertainty as Y (only very low certainty makes it false)")
    domain_tables: bool = Field(False, description="also write NLP-derived drug_exposure and condition_occurrence "
                                                   "rows (type concept 'NLP') for linked, asserted-present mentions")
    person_id_column: str = Field("person_id", description="pass-through column holding the OMOP person_id "
                                                           "(integer) of a note: the person of its derived rows")
    note_date_column: str = Field("note_date", description="pass-through column holding the note's date: the "
                                                           "start and end date of its derived rows")
    note_id_column: str | None = Field(
        None, description="where the OMOP NOTE.note_id (integer) of a note comes from: a pass-through column, or "
                          "'note_id' when the input's own note id is that integer; null = the note_crosswalk table "
                          "assigns each source note id a BIGINT once")
    publish_buckets_per_pass: int = Field(16, ge=1, description="note buckets published per Spark pass and commit "
                                                                "(bounds the driver's work per pass)")


class Settings(_Strict):
    environment: str = Field("local", description="name of this environment")
    engine: EngineConfig = EngineConfig()
    ray: RayConfig = RayConfig()
    spark: SparkConfig = SparkConfig()
    input: InputConfig = InputConfig()
    job: JobConfig = JobConfig()
    storage: StorageConfig = StorageConfig()
    omop: OmopConfig = OmopConfig()

    @model_validator(mode="after")
    def _adapter_needs_lora(self) -> "Settings":
        # a tagger folder is not served through LoRARequest
        if self.engine.adapter and not self.engine.enable_lora and self.engine.backend != "tagger":
            raise ValueError("engine.adapter is set but engine.enable_lora is false")
        if self.engine.pairs and self.engine.backend != "tagger":
            raise ValueError("engine.pairs (a relation pair classifier) runs over a tagger's concepts: "
                             "engine.backend must be tagger")
        return self

    def with_overrides(self, **sections: dict[str, Any]) -> "Settings":
        """A copy with some fields replaced, re-validated: ``s.with_overrides(engine={"adapter": None})``."""
        data = self.model_dump()
        for section, values in sections.items():
            data[section] = {**data[section], **values}
        return Settings.model_validate(data)


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    """Load and validate a YAML settings file (default: conf/local.yaml shipped with the package)."""
    path = Path(path) if path else CONF_DIR / "local.yaml"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"configuration file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(str(path), exc)) from None
    adapter = settings.engine.adapter
    if adapter and not Path(adapter).is_absolute() and (CONF_DIR.parent / adapter).is_dir():
        # Adapters shipped in the repository are named relative to its root, wherever the job is started.
        settings = settings.with_overrides(engine={"adapter": str(CONF_DIR.parent / adapter)})
    return settings
