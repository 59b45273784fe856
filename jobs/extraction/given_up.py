"""``--retry-given-up``: select given-up notes again. A note is given up after ``job.max_attempts`` failed
attempts at one text and fingerprint; once the cause is fixed (a parser release, a larger ``max_tokens``, an
engine that failed them before engine faults were told apart), the operator resets their attempts to 0 in the
ledger, and the run selects them as retries of known failures (attempt 1 again, reported apart from new
failures).

The selection: ``all``; ``error_type=<type>`` (the notes whose last failed attempt left an ``errors`` row of that
type, e.g. ``truncated_output``); or a comma-separated list of note ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from notelake.jobs.warehouse import Warehouse

log = logging.getLogger("notelake.extract")

ERROR_TYPE_PREFIX = "error_type="


@dataclass(frozen=True)
class GivenUpSelection:
    """Which given-up notes to select again: all (no ids, no type), those of ``note_ids``, or those whose last
    attempt failed with ``error_type``."""

    note_ids: tuple[str, ...] = ()
    error_type: str | None = None

    @classmethod
    def parse(cls, text: str) -> "GivenUpSelection":
        """``all``, ``error_type=<type>`` or ``id1,id2,...``; ValueError for an empty selection."""
        text = text.strip()
        if text == "all":
            return cls()
        if text.startswith(ERROR_TYPE_PREFIX):
            error_type = text[len(ERROR_TYPE_PREFIX):].strip()
            if not error_type:
                raise ValueError("--retry-given-up error_type= needs a type (e.g. error_type=truncated_output)")
            return cls(error_type=error_type)
        ids = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
        if not ids:
            raise ValueError("--retry-given-up needs 'all', 'error_type=<type>' or a comma-separated list of note ids")
        return cls(note_ids=ids)

    def describe(self) -> str:
        if self.error_type:
            return f"error type {self.error_type}"
        return f"{len(self.note_ids)} note id(s)" if self.note_ids else "all"


def given_up_notes(warehouse: Warehouse, task: str, max_attempts: int, selection: GivenUpSelection) -> dict[str, int]:
    """``{note_id: note_bucket}`` of ``task``'s given-up ledger rows (failed, ``max_attempts`` attempts or more)
    that ``selection`` names. Reads only those rows' ids (and, by type, the matching errors rows' ids)."""
    import pyarrow.compute as pc
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    def scan(table: str, columns: list[str], where):
        try:
            dataset = DeltaTable(warehouse.path(table), storage_options=warehouse.storage_options).to_pyarrow_dataset()
        except TableNotFoundError:
            return []
        return dataset.to_table(columns=columns, filter=where).to_pylist()

    where = (pc.field("task") == task) & (pc.field("status") == "failed") & (pc.field("attempts") >= max_attempts)
    if selection.note_ids:
        where &= pc.field("note_id").isin(list(selection.note_ids))
    rows = scan("ledger", ["note_id", "note_bucket", "run_id"], where)
    if selection.error_type:
        failed_with = {(r["note_id"], r["run_id"]) for r in scan(
            "errors", ["note_id", "run_id"], (pc.field("task") == task) & (pc.field("stage") != "input")
            & (pc.field("error_type") == selection.error_type))}
        rows = [r for r in rows if (r["note_id"], r["run_id"]) in failed_with]
    return {r["note_id"]: r["note_bucket"] for r in rows}


def reset_given_up(warehouse: Warehouse, tasks: list[str], max_attempts: int, selection: GivenUpSelection,
                   dry_run: bool = False) -> int:
    """Reset the attempts of the given-up notes ``selection`` names, for each of ``tasks``, so this run selects
    them again; a dry run only counts them. Returns the notes reset (or that would be)."""
    total = 0
    for task in tasks:
        notes = given_up_notes(warehouse, task, max_attempts, selection)
        if notes and not dry_run:
            warehouse.reset_attempts(task, notes)
        log.info("task %s: %d given-up note(s) (%s) %s", task, len(notes), selection.describe(),
                 "would be selected again (dry run)" if dry_run else "selected again (attempts reset)")
        total += len(notes)
    return total
