"""Running an evaluation: the real extraction path on a gold JSONL slice, scored by :mod:`.metrics`.

Path (the same functions the nightly job uses): ``udfs.chunking.chunk_text`` -> ``udfs.windows.extract_windows``
(no model call for a window without prose, a cut window extracted again in smaller pieces; prompts by
``udfs.prompts.build_messages``, guided decoding by ``udfs.answer.answer_guide``) -> an engine's ``generate``
(``models.engine``) -> ``udfs.assemble.assemble_note`` (parse + ground) -> ``models.assertion.assign_assertions``
(``EvalOptions.assertion``, the job's ``job.assertion``). Besides the scores: invalid-output rate (parse failures /
prompts), engine-error rate, the windows answered without a model call or split, and throughput (prompts/s, output
tokens/s).

Never logs or reports note text or model output text: only ids, labels, offsets and counts.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from notelake.conf.task import Task
from notelake.models.evaluation.metrics import NoteItems, gold_items, predicted_items, score_notes

# generate(requests) -> results aligned with requests (models.engine.GenerationResult-like objects)
GenerateFn = Callable[[list], list]


def read_gold(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def select_slice(records: list[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """A fixed dev subsample: the first ``limit`` notes of a seeded shuffle of the notes sorted by note_id."""
    order = sorted(records, key=lambda r: r["note_id"])
    random.Random(f"dev-slice:{seed}").shuffle(order)
    return order[:limit] if limit else order


def slice_fingerprint(records: list[dict]) -> str:
    return hashlib.sha256("\n".join(r["note_id"] for r in records).encode()).hexdigest()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    """How :func:`evaluate_records` runs the extraction path and scores it."""

    adapter: str | None = None  # adapter folder on every request; None = the engine's default, "" = the base model
    max_tokens: int | None = None  # answer budget per prompt; None = the task's max_tokens
    guided_decoding: str = "grounded"  # udfs.answer.answer_guide mode
    chunk_overlap_chars: int = 200
    lineage: dict | None = None  # lineage of the assembled rows (model, adapter and their hashes)
    batch_size: int = 64  # requests per generate call
    resamples: int = 1000  # bootstrap resamples of the confidence intervals (0 = none)
    seed: int = 0  # bootstrap seed
    progress: bool = True  # a progress line per generate call
    assertion: str = "combined"  # who sets the concepts' assertions (job.assertion: model, context, combined)
    heads: dict | None = None  # the task's heads (models.extractors.ExtractorChoice.heads): a tagger's concepts


@dataclass
class EvalTally:
    """What an evaluation produced besides the scores: prompts, tokens, errors, parser counts and wall time."""

    prompts: int = 0
    parse_failures: int = 0
    engine_errors: int = 0
    truncated: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0
    warnings: int = 0
    ungrounded: int = 0
    dropped_relations: int = 0
    windows_no_prose: int = 0
    windows_split: int = 0
    error_types: Counter = field(default_factory=Counter)

    def add_note(self, windows, assembled) -> None:
        """Count one note's windows and answers (``udfs.windows.NoteWindows``) and its ``assemble_note`` result."""
        self.windows_no_prose += windows.no_prose
        self.windows_split += windows.split
        for o in windows.outputs:
            self.prompt_tokens += int(getattr(o, "prompt_tokens", 0) or 0)
            self.output_tokens += int(getattr(o, "output_tokens", 0) or 0)
            if getattr(o, "finish_reason", None) == "length":
                self.truncated += 1
        self.warnings += assembled.warnings
        self.ungrounded += assembled.ungrounded
        self.dropped_relations += assembled.dropped_relations
        for e in assembled.errors:
            if e.get("stage") == "parse":
                self.parse_failures += 1
            else:
                self.engine_errors += 1
            self.error_types[str(e.get("error_type"))] += 1

    def scores(self, notes: int) -> dict[str, Any]:
        """The score keys that come from the tally: error rates and types, parser counts, throughput."""
        wall = self.wall_s
        return {
            "invalid_output_rate": round(self.parse_failures / self.prompts, 4) if self.prompts else None,
            "engine_error_rate": round(self.engine_errors / self.prompts, 4) if self.prompts else None,
            "error_types": dict(self.error_types),
            "windows": {"no_prose": self.windows_no_prose, "split": self.windows_split},
            "parser": {"warnings": self.warnings, "ungrounded_mentions": self.ungrounded,
                       "dropped_relations": self.dropped_relations},
            "throughput": {
                "prompts": self.prompts, "notes": notes, "wall_s": round(wall, 1),
                "prompts_per_s": round(self.prompts / wall, 3) if wall else None,
                "notes_per_s": round(notes / wall, 3) if wall else None,
                "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "output_tokens_per_s": round(self.output_tokens / wall, 2) if wall else None,
                "truncated_outputs": self.truncated,
            },
        }


def evaluate_records(task: Task, records: list[dict], generate: GenerateFn,
                     options: EvalOptions = EvalOptions()) -> dict[str, Any]:
    """Chunk -> windows -> prompt -> generate -> assemble -> assert -> score for ``records`` (gold JSONL rows): the
    scores of :func:`.metrics.score_notes` plus the tally's (:meth:`EvalTally.scores`)."""
    from notelake.udfs.chunking import chunk_text
    from notelake.udfs.windows import extract_windows

    chunked = [chunk_text(r["text"], task.max_chunk_chars, options.chunk_overlap_chars) for r in records]
    tally = EvalTally()

    def generate_windows(windows: list) -> list:
        requests = window_requests(windows, options)
        tally.prompts += len(requests)
        results, seconds = generate_in_batches(task.name, requests, generate, options)
        tally.wall_s += seconds
        return results

    heads = [None] * len(records)
    if options.heads:
        heads, seconds = tag_records(records, generate, options)
        tally.wall_s += seconds
        if options.heads.get("pairs"):  # concepts and relations from the heads: no prompt
            chunked = [[] for _ in records]
    notes = extract_windows([task] * len(records), chunked, generate_windows)
    lineage = eval_lineage(task, options.lineage)
    pairs, alone = [], []
    for record, windows, tagged in zip(records, notes, heads):
        predicted, assembled = assemble_outputs(task, record, windows, lineage, options.assertion, tagged)
        tally.add_note(windows, assembled)
        pairs.append((predicted, gold_items(task, record)))
        if options.heads and not options.heads.get("pairs"):
            alone.append((assemble_outputs(task, record, windows, lineage, options.assertion)[0], pairs[-1][1]))
    scores = score_notes(task, pairs, resamples=options.resamples, seed=options.seed)
    scores.update(tally.scores(len(records)))
    if alone:  # the same answers without the heads: the generative extractor alone, on the same run
        generative = score_notes(task, alone, resamples=options.resamples, seed=options.seed)
        scores["generative_alone"] = {k: generative[k] for k in ("cce", "cre") if k in generative}
    return scores


def window_requests(windows: list, options: EvalOptions) -> list:
    """The job's generation request of each window (``udfs.windows.request_fields``), with ``options.adapter``."""
    from notelake.models.engine import GenerationRequest
    from notelake.udfs.windows import request_fields

    adapter = {} if options.adapter is None else {"adapter": options.adapter}
    return [GenerationRequest(**request_fields(w, options.guided_decoding, options.max_tokens), **adapter)
            for w in windows]


def tag_records(records: list[dict], generate: GenerateFn, options: EvalOptions) -> tuple[list[list], float]:
    """Each record tagged in its tagger's own windows (``options.heads``): per record, (window, result) pairs;
    and the wall seconds."""
    from notelake.models.engine import GenerationRequest
    from notelake.udfs.windows import tag_request_fields, tag_windows

    windows = [(k, w) for k, r in enumerate(records) for w in tag_windows(r["text"], options.heads)]
    requests = [GenerationRequest(**tag_request_fields(k, w, options.heads)) for k, w in windows]
    results, seconds = generate_in_batches("tag", requests, generate, options)
    tagged: list[list] = [[] for _ in records]
    for (k, window), result in zip(windows, results):
        tagged[k].append((window, result))
    return tagged, seconds


def generate_in_batches(label: str, requests: list, generate: GenerateFn, options: EvalOptions) -> tuple[list, float]:
    """``generate`` over ``requests`` in calls of ``options.batch_size``: (results in request order, wall s)."""
    results: list = []
    t0 = time.time()
    for b in range(0, len(requests), options.batch_size):
        results += list(generate(requests[b:b + options.batch_size]))
        if options.progress:
            done = len(results)
            el = time.time() - t0
            out_tok = sum(int(getattr(r, "output_tokens", 0) or 0) for r in results)
            eta = el / done * (len(requests) - done)
            print(f"[eval {label}] {done}/{len(requests)} prompts | {out_tok / el:.1f} out tok/s | "
                  f"elapsed {el:.0f}s | ETA {eta:.0f}s", flush=True)
    if len(results) != len(requests):
        raise RuntimeError(f"engine returned {len(results)} results for {len(requests)} prompts")
    return results, time.time() - t0


def eval_lineage(task: Task, given: dict | None) -> dict[str, Any]:
    """Lineage of the assembled rows: an evaluation run's id and the task's prompt version, then ``given``."""
    from notelake.udfs.prompts import prompt_version

    return {
        "run_id": f"eval-{uuid.uuid4().hex[:12]}", "model": "eval", "model_sha256": None,
        "adapter": None, "adapter_sha256": None, "prompt_version": prompt_version(task), "fingerprint": "eval",
        "extracted_at": datetime.now(timezone.utc), **(given or {}),
    }


def assemble_outputs(task: Task, record: dict, windows, lineage: dict, assertion: str = "combined",
                     heads: list | None = None) -> tuple[NoteItems, Any]:
    """One note's windows and answers (``udfs.windows.NoteWindows``) parsed and grounded by ``assemble_note``, with
    the note's tag windows and results ``heads`` where a tagger writes its concepts, its concepts' assertions set
    by ``assertion`` (as the job sets them): (predicted items, its result)."""
    from notelake.models.assertion import assign_assertions
    from notelake.udfs.assemble import assemble_note

    assembled = assemble_note(note_id=record["note_id"], text=record["text"], task=task, lineage=lineage,
                              heads=heads, **windows.assemble_inputs())
    assembled.concepts = assign_assertions(record["text"], assembled.concepts, assertion, task.assertion_labels)
    return predicted_items(record["note_id"], assembled.concepts, assembled.relations), assembled
