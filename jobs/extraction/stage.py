"""The executor side of the extraction: one Arrow batch of notes -> engines -> rows staged as Parquet.

:func:`transform` maps :func:`extract_batches` over a round's notes (``mapInArrow``); each batch is chunked, sent to
the Ray engine actors, parsed and grounded, and its rows are written as Parquet under the round's staging folder.
A partition sends its next batches (``ray.batches_ahead``) before it parses the one in front, so the engines keep
decoding across batch boundaries. Only per-note outcomes (status and counts) come back to the driver.

Idempotent under Spark retries: every staged file is named after the Spark task attempt that wrote it, and each
outcome row carries that ``attempt_tag``; the driver commits only the files of the attempts whose results Spark
kept (:mod:`.staging`).

Each batch's windows go through :func:`udfs.windows.extract_windows` (no model call for a window without prose, a
cut window extracted again in smaller pieces), each note is assembled from its windows, and its concepts' assertions
are set by ``job.assertion`` (:func:`models.assertion.assign_assertions`).

The rows of a note whose extraction failed (a chunk's generation or parse failed) are not staged: its previous
rows stay until a later attempt succeeds; its error rows and ledger row are. An exception while one note is
prepared, extracted, assembled or asserted fails that note alone (:func:`note_exception_row`: its type and where it
was raised, never its message unless ``job.log_phi``): the other notes of the batch land, and the Spark task does
not fail over one note.
"""

from __future__ import annotations

import os
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from notelake.conf import Settings
from notelake.conf.task import Task
from notelake.jobs import storage
from notelake.jobs.extraction.commit import ledger_row
from notelake.jobs.extraction.faults import LEDGER_OUTCOMES, deferral, engine_error_rows
from notelake.jobs.extraction.identity import Lineage
from notelake.jobs.extraction.staging import attempt_tag, staged_file_name
from notelake.udfs import schemas
from notelake.udfs.assemble import NoteResult

#: one row per note a batch extracted: what the driver needs to commit the round and count it
OUTCOME_SCHEMA = pa.schema([
    ("note_id", pa.string()), ("task", pa.string()), ("status", pa.string()), ("attempt_tag", pa.string()),
    ("note_bucket", pa.int32()), ("has_output_before", pa.bool_()), ("in_ledger", pa.bool_()),
    ("n_chunks", pa.int32()), ("n_concepts", pa.int32()), ("n_relations", pa.int32()), ("n_errors", pa.int32()),
    ("tokens_in", pa.int64()), ("tokens_out", pa.int64()), ("n_no_prose", pa.int32()), ("n_split", pa.int32()),
    ("retry", pa.bool_()),
])
_DDL_TYPES = {pa.string(): "string", pa.int32(): "int", pa.int64(): "bigint", pa.bool_(): "boolean"}
OUTCOME_DDL = ", ".join(f"{f.name} {_DDL_TYPES[f.type]}" for f in OUTCOME_SCHEMA)
#: Spark local property naming a fault to inject (reliability tests): "exit_after_first_staged_batch" kills the
#: Python worker of partition 0's first attempt right after it staged its first batch.
FAILPOINT = "notelake.failpoint"


@dataclass(frozen=True)
class StageContext:
    """Everything the executors need, picklable (no Spark or Ray objects; Settings and Task are pydantic models).
    One pass may serve several tasks: each note row names its task, and each task has its own definition and
    lineage (whose ``run_id`` is the task's run)."""

    settings: Settings
    tasks: dict[str, Task]
    lineages: dict[str, Lineage]
    staging_dir: str
    passthrough: tuple[str, ...]
    gcs_address: str | None = None
    deadline: float | None = None  # epoch seconds (--max-runtime): no new batch is started, no engine waited for
    engine_owner: str | None = None  # the pass owning the engine actors (ray.engine_scope: pass)
    engine_actor_ids: tuple[str, ...] = ()  # the actors the driver saw ready: a worker's handles to others are stale
    heads: dict[str, dict] = field(default_factory=dict)  # task -> its heads (models.extractors.ExtractorChoice.heads)
    storage_options: dict = field(default_factory=dict, repr=False)  # credentials for staging: never logged


_POOLS: dict = {}
#: the checkout whose code runs (error rows name code locations relative to it)
_CODE_ROOT = Path(__file__).resolve().parents[2]


def _executor_pool(ctx: StageContext):
    """One Ray connection and actor-pool handle per Python worker process (workers are reused across passes). The
    handle is kept while the driver's pool is made of the same actors: actors killed and created again under the
    same names (a new pool, another namespace) are new actors, and a handle to the old ones only finds them dead."""
    from notelake.models.actor import EnginePool

    key = (ctx.gcs_address, ctx.settings.ray.namespace, ctx.settings.engine.model_dump_json(), ctx.engine_owner,
           ctx.engine_actor_ids)
    if key not in _POOLS:
        _POOLS.clear()  # one pool at a time: handles to the actors of earlier pools are of no more use
        # the driver saw the actors ready before the round: one not found now has died (an engine fault)
        _POOLS[key] = EnginePool.connect(ctx.gcs_address, ctx.settings, ctx.engine_owner, timeout_s=10,
                                         missing_dead=True)
    return _POOLS[key].with_deadline(ctx.deadline)


def _write_staged(ctx: StageContext, table: str, rows: list[dict], schema: pa.Schema, file_name: str) -> None:
    if rows:
        storage.write_parquet(schemas.rows_to_table(rows, schema), storage.join(ctx.staging_dir, table, file_name),
                              ctx.storage_options)


@dataclass
class PreparedBatch:
    """One Arrow batch of notes, chunked (``chunked[k]``: note k's windows; empty for a note that failed) and, once
    extracted, each note's windows and answers (``windows[k]``, None for a note that failed). ``failures``: note
    index -> (step, exception) of the notes that raised."""

    notes: list[dict]
    chunked: list[list]
    failures: dict[int, tuple[str, Exception]] = field(default_factory=dict)
    windows: list = field(default_factory=list)
    # the first pass's requests by (note, start, end), built before the batch goes to the engine thread
    requests: dict[tuple[int, int, int], Any] = field(default_factory=dict)
    # a task with heads (models/extractors.py): note k's tag windows and their requests, then their results
    tag_requests: dict[int, list[tuple[Any, Any]]] = field(default_factory=dict)
    heads: dict[int, list[tuple[Any, Any]]] = field(default_factory=dict)


def prepare_batch(batch: pa.RecordBatch, ctx: StageContext) -> PreparedBatch:
    """Chunk the notes of one batch (each row names its ``task``) and build the requests of their windows' prose
    (the first pass of ``extract_windows``) here, in the partition's thread, so that the engine thread of the
    batch only sends them: its engine call then overlaps the parsing of the batch before, as one send did before
    windows were re-extracted. A note whose chunking or requests raise is failed alone."""
    from notelake.models.engine import GenerationRequest
    from notelake.udfs.chunking import chunk_text, prose_pieces
    from notelake.udfs.windows import Window, request_fields, tag_request_fields, tag_windows

    overlap, engine = ctx.settings.job.chunk_overlap_chars, ctx.settings.engine
    prepared = PreparedBatch(batch.to_pylist(), [])
    for k, note in enumerate(prepared.notes):
        task, heads = ctx.tasks[note["task"]], ctx.heads.get(note["task"])
        prepared.chunked.append([])
        try:
            if heads:
                prepared.tag_requests[k] = [(w, GenerationRequest(**tag_request_fields(k, w, heads)))
                                            for w in tag_windows(note["text"], heads)]
                if heads.get("pairs"):  # concepts and relations from the heads: no prompt
                    continue
            prepared.chunked[k] = chunk_text(note["text"], task.max_chunk_chars, task.overlap(overlap))
            for piece in (piece for chunk in prepared.chunked[k] for piece in prose_pieces(chunk)):
                prepared.requests[(k, piece.start, piece.end)] = GenerationRequest(
                    **request_fields(Window(k, task, piece), engine.guided_decoding, engine.max_tokens))
        except Exception as exc:  # noqa: BLE001 - one note's fault (module docstring)
            prepared.chunked[k] = []
            prepared.failures[k] = ("prepare", exc)
    return prepared


def tag_prepared(prepared: PreparedBatch, generate_requests: Callable[[list], list]) -> None:
    """The tag windows of the batch's notes (``prepared.heads``), in one ``generate_requests`` call; an exception
    of it propagates: the engines' fault."""
    live = [(k, window, request) for k, pairs in prepared.tag_requests.items() if k not in prepared.failures
            for window, request in pairs]
    results = generate_requests([request for _, _, request in live]) if live else []
    for (k, window, _), result in zip(live, results):
        prepared.heads.setdefault(k, []).append((window, result))


def extract_prepared(prepared: PreparedBatch, generate_requests: Callable[[list], list],
                     ctx: StageContext) -> PreparedBatch:
    """Every note's windows and answers (``prepared.windows``) through ``udfs.windows.extract_windows``: one
    ``generate_requests`` call (the engine pool's) for the batch's first pass and one per round of re-extraction.
    A note whose windows raise outside the engine is failed alone: the batch is then extracted note by note to
    find it (a rare, slower path). An exception of ``generate_requests`` propagates: the engines' fault."""
    from notelake.udfs.windows import extract_windows

    tag_prepared(prepared, generate_requests)
    generate = _WindowRequests(prepared, generate_requests, ctx)
    live = [k for k in range(len(prepared.notes)) if k not in prepared.failures]
    try:
        found = extract_windows([ctx.tasks[prepared.notes[k]["task"]] for k in live],
                                [prepared.chunked[k] for k in live], generate.over(live))
    except Exception:  # noqa: BLE001 - one note's fault, unless the engines raised
        if generate.engine_raised:
            raise
        found = []
        for k in live:
            try:
                found += extract_windows([ctx.tasks[prepared.notes[k]["task"]]], [prepared.chunked[k]],
                                         generate.over([k]))
            except Exception as exc:  # noqa: BLE001
                if generate.engine_raised:
                    raise
                prepared.failures.setdefault(k, ("extract", exc))
                found.append(None)
    prepared.windows = [None] * len(prepared.notes)
    for k, note_windows in zip(live, found):
        if k not in prepared.failures:
            prepared.windows[k] = note_windows
    return prepared


class _WindowRequests:
    """``extract_windows``'s ``generate`` over the engine pool: each window's request built under its note's guard
    (a note whose request raises is failed and its windows answered by an error, never sent)."""

    def __init__(self, prepared: PreparedBatch, generate_requests: Callable[[list], list], ctx: StageContext):
        self.prepared, self.generate_requests = prepared, generate_requests
        self.guided, self.max_tokens = ctx.settings.engine.guided_decoding, ctx.settings.engine.max_tokens
        self.engine_raised = False

    def over(self, notes: list[int]) -> Callable[[list], list]:
        """``generate`` for ``extract_windows`` called on the notes ``notes`` (batch indexes) in that order."""
        return lambda windows: self.generate([(notes[w.note], w) for w in windows])

    def generate(self, windows: list) -> list:
        from notelake.models.engine import GenerationRequest, error_result
        from notelake.udfs.windows import request_fields

        requests: list = []
        for note, window in windows:
            built = self.prepared.requests.pop((note, window.chunk.start, window.chunk.end), None)
            try:
                requests.append(built or GenerationRequest(**request_fields(window, self.guided, self.max_tokens)))
            except Exception as exc:  # noqa: BLE001 - one note's fault
                self.prepared.failures.setdefault(note, ("prepare", exc))
                requests.append(None)
        sent = [r for r in requests if r is not None]
        try:
            answers = iter(self.generate_requests(sent) if sent else [])
        except BaseException:
            self.engine_raised = True
            raise
        return [next(answers) if r is not None else error_result("unsent", "note failed") for r in requests]


def note_exception_row(ctx: StageContext, note: dict, step: str, exc: Exception) -> dict:
    """The error row of a note that raised in ``step``: stage ``step``, error_type ``exception``, a message naming
    the exception's type and where it was raised (file:line, function; the innermost notelake frame beside it);
    the exception's own message only with ``job.log_phi`` (it may quote note text)."""
    from notelake.udfs.schemas import error_row

    message = f"{type(exc).__name__} at {exception_location(exc)}"
    if ctx.settings.job.log_phi:
        message += f": {exc}"
    return error_row(run_id=ctx.lineages[note["task"]].run_id, task=note["task"], stage=step, error_type="exception",
                     message=message[:1000], note_id=note["note_id"], text_sha256=note["text_sha256"],
                     attempt=int(note["attempt"]))


def exception_location(exc: BaseException) -> str:
    """Where ``exc`` was raised, ``path:line (function)`` (paths relative to this checkout, or to site-packages),
    and the innermost frame of this project's code that led there when that is another frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown"
    ours = [f for f in frames if _is_ours(Path(f.filename).resolve())]
    raised = _frame_location(frames[-1])
    return raised if not ours or ours[-1] is frames[-1] else f"{raised}, from {_frame_location(ours[-1])}"


def _is_ours(path: Path) -> bool:
    return path.is_relative_to(_CODE_ROOT) and not any(part.endswith("-packages") for part in path.parts)


def _frame_location(frame: traceback.FrameSummary) -> str:
    path = Path(frame.filename).resolve()
    if _is_ours(path):
        shown = path.relative_to(_CODE_ROOT).as_posix()
    else:  # a library's frame from its package folder on (no user or host paths), else the file's name
        shown = path.as_posix().rsplit("-packages/", 1)[1] if "-packages/" in path.as_posix() else path.name
    return f"{shown}:{frame.lineno} ({frame.name})"


def assemble_one(prepared: PreparedBatch, k: int, ctx: StageContext) -> NoteResult:
    """Note ``k``'s rows from its windows' answers (their assertions the extractor's markers)."""
    from notelake.udfs.assemble import assemble_note
    from notelake.udfs.schemas import utc_now

    note, windows = prepared.notes[k], prepared.windows[k]
    task, lineage = ctx.tasks[note["task"]], ctx.lineages[note["task"]]
    return assemble_note(
        note_id=note["note_id"], text=note["text"], task=task, **windows.assemble_inputs(), heads=prepared.heads.get(k),
        lineage={**lineage.columns(), "text_sha256": note["text_sha256"], "extracted_at": utc_now(),
                 "attempt": note["attempt"]},
        passthrough={c: note[c] for c in ctx.passthrough}, note_bucket=note["note_bucket"],
    )


def finish_batch(prepared: PreparedBatch, ctx: StageContext, batch_schema: pa.Schema, tag: str = "driver",
                 seq: int = 0) -> pa.RecordBatch:
    """Assemble the extracted notes of ``prepared`` (:func:`extract_prepared`), stage their rows as attempt
    ``tag``'s ``seq``-th files and return the notes' outcomes (:data:`OUTCOME_SCHEMA`)."""
    from notelake.models.assertion import assign_assertions
    from notelake.udfs.schemas import utc_now

    staged: dict[str, list[dict]] = {"concepts": [], "relations": [], "errors": [], "ledger": []}
    outcomes = []
    for k, note in enumerate(prepared.notes):
        windows = prepared.windows[k]
        deferred = None if windows is None or k in prepared.failures else deferral(windows.outputs)
        if deferred is not None:  # the engines' fault or the run's time, not the note's: left for the next run
            result = NoteResult(n_chunks=len(windows.chunks), errors=engine_error_rows(
                note, ctx.lineages[note["task"]].run_id, windows.chunks, windows.outputs))
        elif k not in prepared.failures:
            step = "assemble"
            try:
                result = assemble_one(prepared, k, ctx)
                step = "assertion"
                result.concepts = assign_assertions(note["text"], result.concepts, ctx.settings.job.assertion,
                                                    ctx.tasks[note["task"]].assertion_labels)
            except ImportError:  # the executor's environment, not the note: fail the task, charge no note
                raise
            except Exception as exc:  # noqa: BLE001 - one note's fault (module docstring)
                prepared.failures[k] = (step, exc)
        if k in prepared.failures:
            result = NoteResult(n_chunks=len(prepared.chunked[k]),
                                errors=[note_exception_row(ctx, note, *prepared.failures[k])])
        status = deferred or ("failed" if result.errors else "succeeded")
        if status == "succeeded":  # a failed note keeps its previous rows until an attempt succeeds
            staged["concepts"] += result.concepts
            staged["relations"] += result.relations
        staged["errors"] += result.errors
        if status in LEDGER_OUTCOMES:  # a note left for the next run keeps its ledger row and attempts
            staged["ledger"].append(ledger_row(ctx.lineages[note["task"]], note["task"], note, status, result,
                                               utc_now()))
        outs = windows.outputs if windows is not None else []
        outcomes.append({
            "note_id": note["note_id"], "task": note["task"], "status": status, "attempt_tag": tag,
            "note_bucket": note["note_bucket"], "has_output_before": bool(note["has_output"]),
            "in_ledger": bool(note["in_ledger"]), "n_chunks": result.n_chunks, "n_concepts": len(result.concepts),
            "n_relations": len(result.relations), "n_errors": len(result.errors),
            "tokens_in": sum(o.prompt_tokens for o in outs), "tokens_out": sum(o.output_tokens for o in outs),
            "n_no_prose": windows.no_prose if windows is not None else 0,
            "n_split": windows.split if windows is not None else 0, "retry": note.get("action") == "retry",
        })
    passthrough_schema = pa.schema([batch_schema.field(c) for c in ctx.passthrough])
    table_schemas = {"concepts": schemas.concepts_schema(passthrough_schema),
                     "relations": schemas.relations_schema(passthrough_schema),
                     "errors": schemas.ERRORS_SCHEMA, "ledger": schemas.LEDGER_SCHEMA}
    for table, rows in staged.items():
        _write_staged(ctx, table, rows, table_schemas[table], staged_file_name(tag, seq))
    return pa.RecordBatch.from_pylist(outcomes, schema=OUTCOME_SCHEMA)


def extract_batches(batches: Iterable[pa.RecordBatch], ctx: StageContext, pool_factory: Callable[[], Any],
                    tag: str = "driver") -> Iterator[tuple[int, pa.RecordBatch]]:
    """Chunk, prompt, generate, parse and ground a stream of Arrow batches of notes (the prompts of every task go
    to the engines together), stage their rows, and yield ``(seq, note outcomes)`` per batch. Up to
    ``ray.batches_ahead`` batches are sent to the engines before the one in front is parsed, so the engines keep
    decoding while this process parses, grounds and stages, instead of draining at every batch boundary. After
    ``ctx.deadline`` no new batch is sent; those already sent are finished and staged."""
    ahead = ctx.settings.ray.batches_ahead
    pending: deque = deque()  # (seq, schema, future of the extracted batch)
    threads = ThreadPoolExecutor(max_workers=ahead + 1, thread_name_prefix="notelake-generate")
    pool = None

    def finish_front() -> tuple[int, pa.RecordBatch]:
        seq, schema, extracted = pending.popleft()
        return seq, finish_batch(extracted.result(), ctx, schema, tag, seq)

    try:
        for seq, batch in enumerate(batches):
            if ctx.deadline is not None and time.time() > ctx.deadline:
                break  # the rest of the round waits for the next run: its notes have no outcome, no ledger row
            if batch.num_rows == 0:
                continue
            pool = pool or pool_factory()
            prepared = prepare_batch(batch, ctx)
            pending.append((seq, batch.schema, threads.submit(extract_prepared, prepared, pool.generate, ctx)))
            while len(pending) > ahead:
                yield finish_front()
        while pending:
            yield finish_front()
    finally:  # closed early (a failed task): batches still in the engines are dropped, never staged
        threads.shutdown(wait=False, cancel_futures=True)


def transform(selected, ctx: StageContext, partitions: int):
    """The round's note outcomes, lazily: the rows are staged as a side effect when an action runs."""

    def run_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        os.umask(int(ctx.settings.job.umask, 8))  # staged Parquet holds PHI: same modes as the tables
        tc = TaskContext.get()
        fault = tc.getLocalProperty(FAILPOINT) if tc is not None else None
        for _, outcomes in extract_batches(batches, ctx, lambda: _executor_pool(ctx), attempt_tag()):
            if fault == "exit_after_first_staged_batch" and tc.partitionId() == 0 and tc.attemptNumber() == 0:
                os._exit(17)  # a lost executor: its staged file stays behind, its results never reach the driver
            yield outcomes

    return selected.repartition(partitions).mapInArrow(run_partition, OUTCOME_DDL)
