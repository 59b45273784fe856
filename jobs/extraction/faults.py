"""Who pays for a failure: a note pays only for what is about the note. A note whose answers met an engine fault
(``models.engine.ENGINE_FAULTS``: an actor lost, an engine step error, a timeout, after the pool's own retries) is
left for the next run: no ledger row (its attempts do not move, it is never given up for it), no rows replaced,
one ``errors`` row per failed window (stage ``engine``, error_type the fault: ``engine_unavailable``,
``engine_timeout`` or ``engine_error``; a request the engine refused for itself, e.g. ``prompt_too_long``, is the
note's failure, stage ``generate``). A note the run's wall-clock limit cut (``deadline_passed``) is left
for the next run without an error row.
"""

from __future__ import annotations

from typing import Any, Sequence

from notelake.models.engine import DEADLINE, ENGINE_FAULTS, engine_fault

#: outcome statuses of a note left for the next run (no ledger row): its engine failed it / the run's time was up
ENGINE_ERROR = "engine_error"
DEFERRED = "deferred"
#: outcome statuses that write the note's ledger row
LEDGER_OUTCOMES = ("succeeded", "failed")
#: the errors table's stage of an engine fault's rows
ENGINE_STAGE = "engine"
_MAX_MESSAGE = 200


def deferral(outputs: Sequence[Any]) -> str | None:
    """:data:`DEFERRED` when the run's deadline cut any of a note's answers, else :data:`ENGINE_ERROR` when an
    engine fault failed any, else None (the note's own outcome stands)."""
    faults = {engine_fault(o.error) for o in outputs}
    if DEADLINE in faults:
        return DEFERRED
    return ENGINE_ERROR if faults & set(ENGINE_FAULTS) else None


def engine_error_rows(note: dict, run_id: str, chunks: Sequence[Any], outputs: Sequence[Any]) -> list[dict]:
    """The errors rows of a note left for the next run by engine faults: one per window an engine failed."""
    from notelake.udfs.schemas import error_row, utc_now

    now = utc_now()
    return [error_row(run_id=run_id, task=note["task"], stage=ENGINE_STAGE, error_type=engine_fault(o.error),
                      message=o.error[:_MAX_MESSAGE], note_id=note["note_id"], chunk_index=chunk.index,
                      text_sha256=note["text_sha256"], attempt=int(note["attempt"]), created_at=now)
            for chunk, o in zip(chunks, outputs) if engine_fault(o.error) in ENGINE_FAULTS]
