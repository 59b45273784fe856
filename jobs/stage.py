"""The executor side of the extraction job: one Arrow batch of notes -> engine -> rows staged as Parquet.

:func:`transform` maps :func:`extract_batches` over a round's notes (``mapInArrow``); each batch is chunked, sent to
the Ray engine actors, parsed and grounded, and its rows are written as Parquet under the round's staging folder.
A partition sends its next batches (``ray.batches_ahead``) before it parses the one in front, so the engines keep
decoding across batch boundaries. Only per-note counts come back to the driver.

Idempotent under Spark retries: every staged file is named after the Spark task attempt that wrote it
(``attempt_tag``), and each summary row carries that tag. The driver commits only the files of the attempts whose
results Spark kept, so a retried task, a speculative copy or a lost executor can leave files behind but never
duplicates rows (:func:`read_staged`).

The rows of a note whose extraction failed (a chunk's generation or parse failed) are not staged: its previous
rows stay until a later attempt succeeds; its error rows and ledger row are.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from notelake.conf import Settings
from notelake.conf.task import Task
from notelake.jobs import storage
from notelake.udfs import schemas

SUMMARY_SCHEMA = pa.schema([
    ("note_id", pa.string()), ("task", pa.string()), ("status", pa.string()), ("attempt_tag", pa.string()), ("note_bucket", pa.int32()),
    ("has_output_before", pa.bool_()), ("in_ledger", pa.bool_()), ("n_chunks", pa.int32()),
    ("n_concepts", pa.int32()), ("n_relations", pa.int32()), ("n_errors", pa.int32()), ("tokens_in", pa.int64()),
    ("tokens_out", pa.int64()),
])
_DDL_TYPES = {pa.string(): "string", pa.int32(): "int", pa.int64(): "bigint", pa.bool_(): "boolean"}
SUMMARY_DDL = ", ".join(f"{f.name} {_DDL_TYPES[f.type]}" for f in SUMMARY_SCHEMA)
#: Spark local property naming a fault to inject (reliability tests): "exit_after_first_staged_batch" kills the
#: Python worker of partition 0's first attempt right after it staged its first batch.
FAILPOINT = "notelake.failpoint"
STAGED_TABLES = ("concepts", "relations", "errors", "ledger")


@dataclass(frozen=True)
class RunContext:
    """Everything the executors need, picklable (no Spark or Ray objects). One pass may serve several tasks: each
    note row names its task, and each task has its own definition and lineage (whose ``run_id`` is the task's run)."""

    run_id: str  # the pass (names its staging folder)
    task_defs: dict  # task name -> Task as JSON
    settings: dict
    gcs_address: str | None
    staging_dir: str
    passthrough: tuple[str, ...]
    lineages: dict = field(default_factory=dict)  # task name -> lineage columns (run_id, model, adapter, fingerprint)
    deadline: float | None = None  # epoch seconds (--max-runtime): no new batch is started after it
    storage_options: dict = field(default_factory=dict, repr=False)  # credentials for staging: never logged

    def task(self, name: str) -> Task:
        return Task.model_validate(self.task_defs[name])


_POOLS: dict = {}


def _executor_pool(ctx: RunContext):
    """One Ray connection and actor-pool handle per Python worker process (workers are reused)."""
    from notelake.models.actor import EnginePool

    key = (ctx.gcs_address, json.dumps(ctx.settings["engine"], sort_keys=True))
    if key not in _POOLS:
        _POOLS[key] = EnginePool.connect(ctx.gcs_address, Settings.model_validate(ctx.settings))
    return _POOLS[key]


def attempt_tag() -> str:
    """The Spark task attempt running this code (stage, partition, attempt), or "driver" outside Spark."""
    from pyspark import TaskContext

    tc = TaskContext.get()
    if tc is None:
        return "driver"
    return f"s{tc.stageId()}-p{tc.partitionId()}-a{tc.attemptNumber()}"


def _staged_name(tag: str, seq: int) -> str:
    return f"{tag}--{seq:06d}.parquet"


def _write_staged(ctx: RunContext, table: str, rows: list[dict], schema: pa.Schema, tag: str, seq: int) -> None:
    if rows:
        storage.write_parquet(schemas.rows_to_table(rows, schema),
                              storage.join(ctx.staging_dir, table, _staged_name(tag, seq)), ctx.storage_options)


def _attempt_of(path: str) -> str:
    return path.rsplit("/", 1)[-1].split("--")[0]


def read_staged(staging_dir: str, table: str, tags: set[str], schema: pa.Schema,
                opts: dict | None = None) -> tuple[pa.Table, int]:
    """(rows of ``table`` staged by the attempts in ``tags``, number of files of other attempts ignored)."""
    fs, found = storage.parquet_files(storage.join(staging_dir, table), opts)
    files = [f for f in found if _attempt_of(f) in tags]
    if not files:
        return schema.empty_table(), len(found)
    return pa.concat_tables(pq.read_table(f, filesystem=fs).cast(schema) for f in files), len(found) - len(files)


def stage_frame(frame, location: str, opts: dict, umask: str, partition_by: str | None = None) -> int:
    """Write a DataFrame as Parquet under ``location`` from the executors, through pyarrow's file systems (Spark
    has no object-store connector here), then delete the files of attempts whose results Spark discarded: what
    is left is exactly one copy of every row, read back by :func:`storage.read_parquet_dir` or
    :func:`storage.read_parquet`. ``partition_by``: rows go to ``<location>/<column>=<value>/`` and the column is
    dropped from the files. Each task writes one file per value (another after every ``_STAGE_FILE_ROWS`` rows),
    not one per Arrow batch: a round is read back as a few large files. Returns the rows staged."""
    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        os.umask(int(umask, 8))  # staged rows hold PHI: same modes as the tables
        tag, rows, seq = attempt_tag(), 0, 0
        buffers: dict[object, list[pa.Table]] = {}

        def flush(value) -> None:
            nonlocal seq
            folder = location if partition_by is None else storage.join(location, f"{partition_by}={value}")
            storage.write_parquet(pa.concat_tables(buffers.pop(value)), storage.join(folder, _staged_name(tag, seq)),
                                  opts)
            seq += 1

        for batch in batches:
            table = pa.Table.from_batches([batch])
            rows += batch.num_rows
            parts = {None: table} if partition_by is None else {
                value: table.filter(pc.equal(table[partition_by], value)).drop_columns([partition_by])
                for value in pc.unique(table[partition_by]).to_pylist()}
            for value, part in parts.items():
                if not part.num_rows:
                    continue
                buffers.setdefault(value, []).append(part)
                if sum(t.num_rows for t in buffers[value]) >= _STAGE_FILE_ROWS:
                    flush(value)
        for value in list(buffers):
            flush(value)
        yield pa.RecordBatch.from_pylist([{"attempt_tag": tag, "rows": rows}], schema=_STAGED_SCHEMA)

    kept = frame.mapInArrow(write, "attempt_tag string, rows bigint").collect()
    tags = {r["attempt_tag"] for r in kept}
    fs, found = storage.parquet_files(location, opts)
    for path in found:
        if _attempt_of(path) not in tags:
            fs.delete_file(path)
    return sum(r["rows"] for r in kept)


#: rows per staged file of :func:`stage_frame` (bounds an executor's buffer; ~20 MB of PHEE-sized notes)
_STAGE_FILE_ROWS = 50_000
_STAGED_SCHEMA = pa.schema([("attempt_tag", pa.string()), ("rows", pa.int64())])


def _ledger_row(lineage: dict, note: dict, task: Task, status: str, n_chunks: int, result) -> dict:
    from notelake.udfs.schemas import utc_now

    return {
        "note_id": note["note_id"], "task": task.name, "note_bucket": note["note_bucket"],
        "text_sha256": note["text_sha256"], "fingerprint": lineage["fingerprint"],
        "passthrough_sha256": note["passthrough_sha256"], "run_id": lineage["run_id"], "status": status,
        "attempts": note["attempt"], "has_output": status == "succeeded" or bool(note["has_output"]),
        "error_type": None, "n_chunks": n_chunks, "n_concepts": len(result.concepts),
        "n_relations": len(result.relations), "n_warnings": result.warnings, "n_ungrounded": result.ungrounded,
        "n_dropped_relations": result.dropped_relations, "n_truncated_chunks": result.truncated_chunks,
        "processed_at": utc_now(),
    }


@dataclass
class PreparedBatch:
    """One Arrow batch of notes, chunked and turned into engine requests (one per chunk, in note order)."""

    notes: list[dict]
    tasks: dict[str, Task]
    chunked: list[list]
    requests: list


def prepare_batch(batch: pa.RecordBatch, ctx: RunContext) -> PreparedBatch:
    """Chunk the notes of one batch (each row names its ``task``) and build one request per chunk."""
    from notelake.models.engine import GenerationRequest
    from notelake.udfs.answer import answer_guide
    from notelake.udfs.chunking import chunk_text
    from notelake.udfs.prompts import build_messages

    engine_cfg = ctx.settings["engine"]
    guided = engine_cfg.get("guided_decoding", "grounded")
    notes = batch.to_pylist()
    tasks = {name: ctx.task(name) for name in {n["task"] for n in notes}}
    chunked = [chunk_text(n["text"], tasks[n["task"]].max_chunk_chars,
                          tasks[n["task"]].overlap(ctx.settings["job"]["chunk_overlap_chars"])) for n in notes]
    requests = []
    for i, (note, chunks) in enumerate(zip(notes, chunked)):
        task = tasks[note["task"]]
        requests += [GenerationRequest(request_id=f"{i}:{c.index}", messages=build_messages(task, c.text),
                                       guide=answer_guide(task, c.text, guided), text=c.text,
                                       max_tokens=engine_cfg.get("max_tokens") or task.max_tokens) for c in chunks]
    return PreparedBatch(notes, tasks, chunked, requests)


def finish_batch(prepared: PreparedBatch, outputs: list, ctx: RunContext, batch_schema: pa.Schema,
                 tag: str = "driver", seq: int = 0) -> pa.RecordBatch:
    """Parse and ground the engine's ``outputs`` (one per request, in order); stage rows; return per-note counts."""
    from notelake.udfs.assemble import assemble_note
    from notelake.udfs.schemas import utc_now

    results = iter(outputs)
    passthrough_schema = pa.schema([batch_schema.field(c) for c in ctx.passthrough])
    concept_rows, relation_rows, error_rows, ledger_rows, summaries = [], [], [], [], []
    for note, chunks in zip(prepared.notes, prepared.chunked):
        outs = [next(results) for _ in chunks]
        task = prepared.tasks[note["task"]]
        lineage = {**ctx.lineages[task.name], "text_sha256": note["text_sha256"], "extracted_at": utc_now(),
                   "attempt": note["attempt"]}
        result = assemble_note(
            note_id=note["note_id"], text=note["text"], task=task, chunks=chunks,
            outputs=[o.text for o in outs], output_errors=[o.error for o in outs],
            truncated=[o.finish_reason == "length" for o in outs], tagged=[o.spans for o in outs],
            tag_relations=[o.relations for o in outs], lineage=lineage,
            passthrough={c: note[c] for c in ctx.passthrough}, note_bucket=note["note_bucket"],
        )
        status = "failed" if result.errors else "succeeded"
        if status == "succeeded":  # a failed note keeps its previous rows until an attempt succeeds
            concept_rows += result.concepts
            relation_rows += result.relations
        error_rows += result.errors
        ledger_rows.append(_ledger_row(ctx.lineages[task.name], note, task, status, len(chunks), result))
        summaries.append({
            "note_id": note["note_id"], "task": task.name, "status": status, "attempt_tag": tag, "note_bucket": note["note_bucket"],
            "has_output_before": bool(note["has_output"]), "in_ledger": bool(note["in_ledger"]),
            "n_chunks": len(chunks), "n_concepts": len(result.concepts), "n_relations": len(result.relations),
            "n_errors": len(result.errors), "tokens_in": sum(o.prompt_tokens for o in outs),
            "tokens_out": sum(o.output_tokens for o in outs),
        })
    _write_staged(ctx, "concepts", concept_rows, schemas.concepts_schema(passthrough_schema), tag, seq)
    _write_staged(ctx, "relations", relation_rows, schemas.relations_schema(passthrough_schema), tag, seq)
    _write_staged(ctx, "errors", error_rows, schemas.ERRORS_SCHEMA, tag, seq)
    _write_staged(ctx, "ledger", ledger_rows, schemas.LEDGER_SCHEMA, tag, seq)
    return pa.RecordBatch.from_pylist(summaries, schema=SUMMARY_SCHEMA)


def extract_batches(batches: Iterable[pa.RecordBatch], ctx: RunContext, pool_factory: Callable[[], Any],
                    tag: str = "driver") -> Iterator[tuple[int, pa.RecordBatch]]:
    """Chunk, prompt, generate, parse and ground a stream of Arrow batches of notes (the prompts of every task go
    to the engines together), stage their rows, and yield ``(seq, per-note counts)`` per batch. Up to
    ``ray.batches_ahead`` batches are sent to the engines before the one in front is parsed, so the engines keep
    decoding while this process parses, grounds and stages, instead of draining at every batch boundary. After
    ``ctx.deadline`` no new batch is sent; those already sent are finished and staged."""
    ahead = ctx.settings["ray"]["batches_ahead"]
    pending: deque = deque()  # (seq, schema, prepared, future of the engine outputs)
    threads = ThreadPoolExecutor(max_workers=ahead + 1, thread_name_prefix="notelake-generate")
    pool = None

    def finish_front() -> tuple[int, pa.RecordBatch]:
        seq, schema, prepared, outputs = pending.popleft()
        return seq, finish_batch(prepared, outputs.result(), ctx, schema, tag, seq)

    try:
        for seq, batch in enumerate(batches):
            if ctx.deadline is not None and time.time() > ctx.deadline:
                break  # the rest of the round waits for the next run: its notes have no summary, no ledger row
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


def transform(selected, ctx: RunContext, partitions: int):
    """Lazy per-note summaries; staging files are written as a side effect when an action runs."""

    def run_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        os.umask(int(ctx.settings["job"]["umask"], 8))  # staged Parquet holds PHI: same modes as the tables
        tc = TaskContext.get()
        fault = tc.getLocalProperty(FAILPOINT) if tc is not None else None
        for seq, summary in extract_batches(batches, ctx, lambda: _executor_pool(ctx), attempt_tag()):
            if fault == "exit_after_first_staged_batch" and tc.partitionId() == 0 and tc.attemptNumber() == 0:
                os._exit(17)  # a lost executor: its staged file stays behind, its results never reach the driver
            yield summary

    return selected.repartition(partitions).mapInArrow(run_partition, SUMMARY_DDL)
