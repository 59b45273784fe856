"""Files staged before a commit: Parquet under the pass's staging folder, each named after the Spark task attempt
that wrote it, so exactly one copy of every row is read back.

A retried task, a speculative copy or a lost executor can leave files behind: the driver keeps only the files of
the attempts whose results Spark returned (:func:`read_staged`, :func:`stage_frame`), so a rerun attempt never
duplicates rows. Staged rows are note-derived PHI: they are written under ``job.umask`` and the pass deletes its
staging folder when it ends.
"""

from __future__ import annotations

import os
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from notelake.jobs import storage

#: rows per file :func:`stage_frame` writes (bounds an executor's buffer; ~20 MB of PHEE-sized notes)
STAGE_FILE_ROWS = 50_000
_STAGED_SCHEMA = pa.schema([("attempt_tag", pa.string()), ("rows", pa.int64())])


def attempt_tag() -> str:
    """The Spark task attempt running this code (stage, partition, attempt), or "driver" outside Spark."""
    from pyspark import TaskContext

    tc = TaskContext.get()
    if tc is None:
        return "driver"
    return f"s{tc.stageId()}-p{tc.partitionId()}-a{tc.attemptNumber()}"


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
