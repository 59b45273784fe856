"""Stable identifiers: text hashes (equal to Spark's ``sha2(col, 256)``), concept/relation ids, fingerprints.

Every id is a hex SHA-256 of a canonical JSON rendering, so it is deterministic across processes, machines
and Python versions (``json.dumps`` with ASCII escapes and compact separators).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

ID_HEX_CHARS = 32


def _utf8(text: str) -> bytes:
    # surrogatepass: a lone surrogate (invalid UTF-8, which Spark cannot hold either) must not crash a batch.
    return text.encode("utf-8", "surrogatepass")


def sha256_text(text: str) -> str:
    """Hex SHA-256 of the UTF-8 bytes of ``text`` (equals Spark SQL ``sha2(col, 256)`` on the same string)."""
    return hashlib.sha256(_utf8(text)).hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"), sort_keys=True, allow_nan=False)


def _short_hash(value: Any) -> str:
    return hashlib.sha256(_canonical(value).encode("ascii")).hexdigest()[:ID_HEX_CHARS]


# one parameter per field of the row's identity (the hash input)
def concept_id(note_id: str, task: str, label: str, start: int | None, end: int | None, text: str, ordinal: int) -> str:
    """Id of one concept row: hash of (note_id, task, label, start, end, text, ordinal); start/end may be None."""
    return _short_hash([note_id, task, label, start, end, text, ordinal])


def relation_id(note_id: str, task: str, label: str, head_concept_id: str, tail_concept_id: str) -> str:
    """Id of one relation row: hash of (note_id, task, label, head concept id, tail concept id)."""
    return _short_hash([note_id, task, label, head_concept_id, tail_concept_id])


def note_bucket(note_id: str, buckets: int) -> int:
    """The output-table bucket of a note: the first 32 bits of sha256(note_id) modulo ``buckets`` (the job computes
    the same in Spark: ``pmod(conv(substring(sha2(note_id, 256), 1, 8), 16, 10), buckets)``)."""
    return int(hashlib.sha256(_utf8(note_id)).hexdigest()[:8], 16) % buckets


def fingerprint(  # one parameter per input that changes answers (the hash input)
    model_sha256: str,
    adapter_sha256: str | None,
    prompt_version: str,
    sampling: dict,
    chunking: dict,
    parser_version: str,
    backend: str,
    assertion: dict | None = None,
) -> str:
    """Extraction fingerprint: what the output of a note depends on besides its text (32 hex chars).

    A change of model, adapter, prompt, sampling, chunking, parser, engine backend (rows written by the
    ``replay`` or ``hf`` engine are never taken for vLLM's) or of who sets the concepts' assertions (``assertion``,
    None: the extractor's markers as they came) changes it, so the ledger re-selects every note; anything else
    (cluster size, batch size, ...) does not.
    """
    identity = {
        "backend": backend,
        "model_sha256": model_sha256,
        "adapter_sha256": adapter_sha256,
        "prompt_version": prompt_version,
        "sampling": sampling,
        "chunking": chunking,
        "parser_version": parser_version,
    }
    if assertion is not None:  # absent: fingerprints of the extractor's own markers keep their value
        identity["assertion"] = assertion
    return _short_hash(identity)


def link_fingerprint(linker: dict, target: dict | None, vocabulary_versions: dict[str, str | None]) -> str:
    """Link fingerprint of one label: what its concept links depend on besides the mention (32 hex chars).

    ``linker`` holds the linker's and the normalizer's versions and its matching settings, ``target`` the label's
    normalization section of the task YAML (None: unmapped), ``vocabulary_versions`` every vocabulary's version.
    Independent of the extraction fingerprint: a vocabulary release re-links stored concepts, it never re-extracts.
    """
    return _short_hash({"linker": linker, "target": target, "vocabulary_versions": vocabulary_versions})

