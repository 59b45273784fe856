"""Files staged before a commit: Parquet under the pass's staging folder, each named after the Spark task attempt
that wrote it (its ``taskAttemptId``, unique in the application: ``attemptNumber`` starts at 0 again when a stage
is resubmitted), so exactly one copy of every row is read back.

A retried task, a speculative copy or a lost executor can leave files behind: the driver keeps only the files of
the attempts whose results Spark returned (:func:`read_staged`, :func:`stage_frame`), so a rerun attempt never
duplicates rows, and :func:`refuse_duplicate_notes` refuses a round whose rows still name a note twice. Side paths
(rejections, refreshes) stage their rows in rounds as the extraction does (:func:`stage_rounds`), so the driver
reads and commits one round's buckets at a time. Staged rows are note-derived PHI: they are written under
``job.umask`` and the pass deletes its staging folder when it ends.
"""

from __future__ import annotations

import math
import os
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from notelake.jobs import storage
from notelake.jobs.warehouse import OutputWriteError

#: rows per file :func:`stage_frame` writes (bounds an executor's buffer; ~20 MB of PHEE-sized notes)
STAGE_FILE_ROWS = 50_000
_STAGED_SCHEMA = pa.schema([("attempt_tag", pa.string()), ("rows", pa.int64())])


class DuplicateStagedRowsError(OutputWriteError):
    """A round's staged rows hold a (note_id, task) twice: two attempts' copies, nothing of the round is committed."""


def attempt_tag() -> str:
    """The Spark task attempt running this code (stage, partition, task attempt id), or "driver" outside Spark.
    The task attempt id is unique in the application, also across stage attempts."""
    from pyspark import TaskContext

    tc = TaskContext.get()
    if tc is None:
        return "driver"
    return f"s{tc.stageId()}-p{tc.partitionId()}-t{tc.taskAttemptId()}"


def staged_file_name(tag: str, seq: int) -> str:
    """The name of an attempt's ``seq``-th staged file in a folder."""
    return f"{tag}--{seq:06d}.parquet"


def attempt_of(path: str) -> str:
    """The attempt tag a staged file's name carries."""
    return path.rsplit("/", 1)[-1].split("--")[0]


def read_staged(staging_dir: str, table: str, tags: set[str], schema: pa.Schema,
                opts: dict | None = None) -> tuple[pa.Table, int]:
    """(rows of ``table`` staged by the attempts in ``tags``, number of files of other attempts ignored)."""
    fs, found = storage.parquet_files(storage.join(staging_dir, table), opts)
    files = [f for f in found if attempt_of(f) in tags]
    if not files:
        return schema.empty_table(), len(found)
    return pa.concat_tables(pq.read_table(f, filesystem=fs).cast(schema) for f in files), len(found) - len(files)


def stage_frame(frame, location: str, opts: dict, umask: str, partition_by: str | None = None) -> int:
    """Write a DataFrame as Parquet under ``location`` from the executors, through pyarrow's file systems (Spark
    has no object-store connector here), then delete the files of attempts whose results Spark discarded: what
    is left is exactly one copy of every row, read back by :func:`storage.read_parquet_dir` or
    :func:`storage.read_parquet`. ``partition_by``: rows go to ``<location>/<column>=<value>/`` and the column is
    dropped from the files. Each task writes one file per value (another after every :data:`STAGE_FILE_ROWS`
    rows), not one per Arrow batch, so a round is read back as a few large files. Returns the rows staged."""
    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        os.umask(int(umask, 8))  # staged rows hold PHI: same modes as the tables
        tag, rows, seq = attempt_tag(), 0, 0
        buffers: dict[object, list[pa.Table]] = {}

        def flush(value) -> None:
            nonlocal seq
            folder = location if partition_by is None else storage.join(location, f"{partition_by}={value}")
            storage.write_parquet(pa.concat_tables(buffers.pop(value)),
                                  storage.join(folder, staged_file_name(tag, seq)), opts)
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
                if sum(t.num_rows for t in buffers[value]) >= STAGE_FILE_ROWS:
                    flush(value)
        for value in list(buffers):
            flush(value)
        yield pa.RecordBatch.from_pylist([{"attempt_tag": tag, "rows": rows}], schema=_STAGED_SCHEMA)

    kept = frame.mapInArrow(write, "attempt_tag string, rows bigint").collect()
    tags = {r["attempt_tag"] for r in kept}
    fs, found = storage.parquet_files(location, opts)
    for path in found:
        if attempt_of(path) not in tags:
            fs.delete_file(path)
    return sum(r["rows"] for r in kept)


def assign_rounds(frame, n_rows: int, round_notes: int, buckets: int):
    """(``frame`` with a ``_round`` column, number of rounds) for ``n_rows`` notes in rounds of about
    ``round_notes``. A round holds whole buckets when there are fewer rounds than buckets, else a slice of one
    bucket: either way its commits touch only its buckets' files. Rows without a bucket (a null note id) go to
    round 0."""
    from pyspark.sql import functions as F

    n_rounds = max(1, math.ceil(n_rows / round_notes))
    if n_rounds <= buckets:
        return frame.withColumn("_round", F.coalesce(F.pmod(F.col("note_bucket"), F.lit(n_rounds)), F.lit(0))), n_rounds
    per_bucket = math.ceil(n_rounds / buckets)
    slice_ = F.pmod(F.xxhash64("note_id"), F.lit(per_bucket))
    return (frame.withColumn("_round", F.coalesce(F.col("note_bucket") * per_bucket + slice_, F.lit(0))),
            buckets * per_bucket)


def stage_rounds(frame, n_rows: int, location: str, round_notes: int, buckets: int, opts: dict,
                 umask: str) -> list[str]:
    """Stage ``frame`` (a ``note_bucket`` column; about ``n_rows`` rows) under ``location`` in rounds
    (:func:`assign_rounds`), once; returns the rounds' folders in order, each read back on its own.
    (Seven parameters: the round layout and the staging location are the caller's, as in :func:`stage_frame`.)"""
    with_rounds, _ = assign_rounds(frame, n_rows, round_notes, buckets)
    stage_frame(with_rounds, location, opts, umask, partition_by="_round")
    rounds = sorted(int(name.split("=", 1)[1]) for name in storage.list_dirs(location, opts)
                    if name.startswith("_round="))
    return [storage.join(location, f"_round={index}") for index in rounds]


def refuse_duplicate_notes(ledger: pa.Table, outcomes: list[dict]) -> None:
    """:class:`DuplicateStagedRowsError` when the round's staged ledger rows or its outcomes (the attempts Spark
    returned) name a (note_id, task) twice: two attempts' rows were kept, and committing them would duplicate the
    notes' rows."""
    from collections import Counter

    twice: set[tuple[str, str]] = set()
    for keys in (zip(ledger["note_id"].to_pylist(), ledger["task"].to_pylist()),
                 ((r["note_id"], r["task"]) for r in outcomes)):
        twice.update(key for key, n in Counter(keys).items() if n > 1)
    if twice:
        sample = ", ".join(f"{task}/{note}" for note, task in sorted(twice)[:5])
        raise DuplicateStagedRowsError(
            f"the round's staged rows hold {len(twice)} note(s) twice ({sample}): two Spark task attempts' rows "
            "were kept; nothing of the round was committed")
