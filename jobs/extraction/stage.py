"""The executor side of the extraction: one Arrow batch of notes -> engines -> rows staged as Parquet.

:func:`transform` maps :func:`extract_batches` over a round's notes (``mapInArrow``); each batch is chunked, sent to
the Ray engine actors, parsed and grounded, and its rows are written as Parquet under the round's staging folder.
A partition sends its next batches (``ray.batches_ahead``) before it parses the one in front, so the engines keep
decoding across batch boundaries. Only per-note outcomes (status and counts) come back to the driver.

Idempotent under Spark retries: every staged file is named after the Spark task attempt that wrote it, and each
outcome row carries that ``attempt_tag``; the driver commits only the files of the attempts whose results Spark
kept (:mod:`.staging`).

The rows of a note whose extraction failed (a chunk's generation or parse failed) are not staged: its previous
rows stay until a later attempt succeeds; its error rows and ledger row are.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from notelake.conf import Settings
from notelake.conf.task import Task
from notelake.jobs import storage
from notelake.jobs.extraction.commit import ledger_row
from notelake.jobs.extraction.identity import Lineage
from notelake.jobs.extraction.staging import attempt_tag, staged_file_name
from notelake.udfs import schemas

#: one row per note a batch extracted: what the driver needs to commit the round and count it
OUTCOME_SCHEMA = pa.schema([
    ("note_id", pa.string()), ("task", pa.string()), ("status", pa.string()), ("attempt_tag", pa.string()),
    ("note_bucket", pa.int32()), ("has_output_before", pa.bool_()), ("in_ledger", pa.bool_()),
    ("n_chunks", pa.int32()), ("n_concepts", pa.int32()), ("n_relations", pa.int32()), ("n_errors", pa.int32()),
    ("tokens_in", pa.int64()), ("tokens_out", pa.int64()),
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
    deadline: float | None = None  # epoch seconds (--max-runtime): no new batch is started after it
    storage_options: dict = field(default_factory=dict, repr=False)  # credentials for staging: never logged


_POOLS: dict = {}


def _executor_pool(ctx: StageContext):
    """One Ray connection and actor-pool handle per Python worker process (workers are reused)."""
    from notelake.models.actor import EnginePool

    key = (ctx.gcs_address, ctx.settings.engine.model_dump_json())
    if key not in _POOLS:
        _POOLS[key] = EnginePool.connect(ctx.gcs_address, ctx.settings)
    return _POOLS[key]


def _write_staged(ctx: StageContext, table: str, rows: list[dict], schema: pa.Schema, file_name: str) -> None:
    if rows:
        storage.write_parquet(schemas.rows_to_table(rows, schema), storage.join(ctx.staging_dir, table, file_name),
                              ctx.storage_options)


@dataclass
class PreparedBatch:
    """One Arrow batch of notes, chunked and turned into engine requests (one per chunk, in note order)."""

    notes: list[dict]
    chunked: list[list]
    requests: list


def prepare_batch(batch: pa.RecordBatch, ctx: StageContext) -> PreparedBatch:
    """Chunk the notes of one batch (each row names its ``task``) and build one request per chunk."""
    from notelake.models.engine import GenerationRequest
    from notelake.udfs.answer import answer_guide
    from notelake.udfs.chunking import chunk_text
    from notelake.udfs.prompts import build_messages

    engine, overlap = ctx.settings.engine, ctx.settings.job.chunk_overlap_chars
    notes = batch.to_pylist()
    chunked = [chunk_text(n["text"], ctx.tasks[n["task"]].max_chunk_chars, ctx.tasks[n["task"]].overlap(overlap))
               for n in notes]
    requests = []
    for i, (note, chunks) in enumerate(zip(notes, chunked)):
        task = ctx.tasks[note["task"]]
        requests += [GenerationRequest(request_id=f"{i}:{c.index}", messages=build_messages(task, c.text),
                                       guide=answer_guide(task, c.text, engine.guided_decoding), text=c.text,
                                       max_tokens=engine.max_tokens or task.max_tokens) for c in chunks]
    return PreparedBatch(notes, chunked, requests)


def finish_batch(prepared: PreparedBatch, outputs: list, ctx: StageContext, batch_schema: pa.Schema,
                 tag: str = "driver", seq: int = 0) -> pa.RecordBatch:
    """Parse and ground the engine's ``outputs`` (one per request, in order), stage the rows as attempt ``tag``'s
    ``seq``-th files and return the notes' outcomes (:data:`OUTCOME_SCHEMA`)."""
    from notelake.udfs.assemble import assemble_note
    from notelake.udfs.schemas import utc_now

    results = iter(outputs)
    staged: dict[str, list[dict]] = {"concepts": [], "relations": [], "errors": [], "ledger": []}
    outcomes = []
    for note, chunks in zip(prepared.notes, prepared.chunked):
        outs = [next(results) for _ in chunks]
        task, lineage = ctx.tasks[note["task"]], ctx.lineages[note["task"]]
        result = assemble_note(
            note_id=note["note_id"], text=note["text"], task=task, chunks=chunks,
            outputs=[o.text for o in outs], output_errors=[o.error for o in outs],
            truncated=[o.finish_reason == "length" for o in outs], tagged=[o.spans for o in outs],
            tag_relations=[o.relations for o in outs],
            lineage={**lineage.columns(), "text_sha256": note["text_sha256"], "extracted_at": utc_now(),
                     "attempt": note["attempt"]},
            passthrough={c: note[c] for c in ctx.passthrough}, note_bucket=note["note_bucket"],
        )
        status = "failed" if result.errors else "succeeded"
        if status == "succeeded":  # a failed note keeps its previous rows until an attempt succeeds
            staged["concepts"] += result.concepts
            staged["relations"] += result.relations
        staged["errors"] += result.errors
        staged["ledger"].append(ledger_row(lineage, task.name, note, status, result, utc_now()))
        outcomes.append({
            "note_id": note["note_id"], "task": task.name, "status": status, "attempt_tag": tag,
            "note_bucket": note["note_bucket"], "has_output_before": bool(note["has_output"]),
            "in_ledger": bool(note["in_ledger"]), "n_chunks": len(chunks), "n_concepts": len(result.concepts),
            "n_relations": len(result.relations), "n_errors": len(result.errors),
            "tokens_in": sum(o.prompt_tokens for o in outs), "tokens_out": sum(o.output_tokens for o in outs),
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
    pending: deque = deque()  # (seq, schema, prepared, future of the engine outputs)
    threads = ThreadPoolExecutor(max_workers=ahead + 1, thread_name_prefix="notelake-generate")
    pool = None

    def finish_front() -> tuple[int, pa.RecordBatch]:
        seq, schema, prepared, outputs = pending.popleft()
        return seq, finish_batch(prepared, outputs.result(), ctx, schema, tag, seq)

    try:
        for seq, batch in enumerate(batches):
            if ctx.deadline is not None and time.time() > ctx.deadline:
                break  # the rest of the round waits for the next run: its notes have no outcome, no ledger row
            if batch.num_rows == 0:
                continue
            pool = pool or pool_factory()
            prepared = prepare_batch(batch, ctx)
            pending.append((seq, batch.schema, prepared, threads.submit(pool.generate, prepared.requests)))
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
