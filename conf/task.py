"""Extraction tasks are data: a YAML file in conf/tasks/ (or anywhere) validated by :class:`Task`.

A new corpus with its own label set is served zero-shot by writing one YAML file; no code changes.
The task name is the file stem and the ``task`` column of every output row.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from notelake.conf.settings import TASKS_DIR, ConfigError, _format_validation_error

_LABEL = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class RelationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    definition: str = Field(..., min_length=1, description="one line: what the relation means")
    pairs: list[tuple[str, str]] | None = Field(
        None, description="allowed (head label, tail label) pairs; null = any pair of the task's labels"
    )


class FewShotExample(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field(..., min_length=1)
    answer: str = Field(..., min_length=1, description="the answer to `text` in answer schema v2 (udfs/answer.py)")


class DerivedRelation(BaseModel):
    """A relation the answer does not spell out: added between every (head, tail) concept pair of one event."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    relation: str = Field(..., description="relation label")
    head: str = Field(..., description="concept label of the head")
    tail: str = Field(..., description="concept label of the tail")
    anchor: str | None = Field(None, description="only in events anchored by this label (null = any event)")


class LabelNormalization(BaseModel):
    """Where one concept label's mentions are looked up in the OMOP vocabulary (jobs/linking/). Each list is in
    order of preference: when one normalized mention names several standard concepts, a concept's own name beats
    a synonym, then the earlier domain, then the earlier vocabulary; concepts still tied are ambiguous (concept 0).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    domains: list[str] = Field(..., min_length=1, description="OMOP domain_id(s) of the target standard concepts")
    vocabularies: list[str] = Field(default_factory=list, description="vocabulary_id(s) of the target standard "
                                                                      "concepts; empty = any vocabulary")
    concept_classes: list[str] = Field(default_factory=list, description="concept_class_id(s) of the target "
                                                                         "standard concepts; empty = any class")


class EventSpec(BaseModel):
    """Event tasks (answer schema v2): a line starts with an anchor (a trigger) and lists its arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    anchors: list[str] = Field(..., min_length=1, description="concept labels that head an event line")
    derived: list[DerivedRelation] = Field(default_factory=list, description="relations implied by an event")


class Task(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., pattern=r"^[a-z][a-z0-9_]*$", description="= YAML file stem = `task` column")
    description: str = Field(..., min_length=1, description="one line naming the kind of text and the goal")
    kind: Literal["cce", "cre"] = Field(..., description="cce: concepts only; cre: concepts and relations")
    concepts: dict[str, str] = Field(..., min_length=1, description="concept label -> one-line definition")
    relations: dict[str, RelationSpec] = Field(default_factory=dict, description="relation label -> spec")
    events: EventSpec | None = Field(None, description="event task: one answer line per event (see EventSpec)")
    examples: list[FewShotExample] = Field(default_factory=list, description="optional few-shot examples")
    define_labels: bool = Field(
        True, description="list each label with its definition in the prompt (a zero-shot task needs them); false "
                          "lists the names only, for tasks an adapter was trained on: it learnt the labels from data, "
                          "and the shorter prompt halves training and prefill cost")
    max_tokens: int = Field(512, ge=16, description="answer token budget, sized from the task's answer density")
    max_chunk_chars: int = Field(1500, ge=100, description="longest text span sent in one prompt")
    chunk_overlap_chars: int | None = Field(
        None, ge=0, description="overlap between chunks of a long note for this task; null = job.chunk_overlap_chars")
    max_mention_tokens: dict[str, int] = Field(
        default_factory=dict, description="concept label -> longest mention in word/punctuation tokens the answer "
                                          "grammar admits, learned from training data (`notelake bounds`); a label "
                                          "not listed: udfs.answer.MAX_MENTION_TOKENS")
    max_line_items: int | None = Field(
        None, ge=1, description="most items on one answer line (an event's trigger and arguments, a concept and "
                                "its references), learned from training data (`notelake bounds`); null: "
                                "udfs.answer.MAX_LINE_ITEMS")
    max_lines_per_100_chars: float | None = Field(
        None, gt=0, description="answer lines per 100 characters of a window: an answer holds at most one line more "
                                "than this times the window's length / 100, learned from training data (`notelake "
                                "bounds`: the fewest that loses at most 0.1 % of the training answers' lines); null: "
                                "no bound")
    normalization: dict[str, LabelNormalization] = Field(
        default_factory=dict, description="concept label -> its OMOP target (domains, vocabularies, classes); a "
                                          "label not named here is left unlinked (concept 0, match_type "
                                          "unmapped_label)")
    assertion_labels: list[str] | None = Field(
        None, description="concept labels that take an assertion (negated, speculated, ...): the labels of which "
                          "the training data marks at least 1 % not present (`python -m bench.assertion labels`). "
                          "ConText (job.assertion: context, combined) judges only these; null = every label")

    def overlap(self, default: int) -> int:
        """The chunk overlap this task runs with (its own, else the job's ``default``)."""
        return default if self.chunk_overlap_chars is None else self.chunk_overlap_chars

    @model_validator(mode="after")
    def _relations_consistent(self) -> "Task":
        for label in [*self.concepts, *self.relations]:
            if not _LABEL.match(label):
                raise ValueError(f"label {label!r}: letters, digits, '_' and '-' only, starting with a letter "
                                 "(labels are written verbatim in the answer format)")
        unknown = sorted(set(self.max_mention_tokens) - set(self.concepts))
        if unknown:
            raise ValueError(f"max_mention_tokens names unknown concept label(s) {unknown}")
        if any(n < 1 for n in self.max_mention_tokens.values()):
            raise ValueError("max_mention_tokens: every bound must be >= 1")
        if self.kind == "cre" and not self.relations:
            raise ValueError("kind 'cre' needs at least one relation label")
        if self.kind == "cce" and self.relations:
            raise ValueError("kind 'cce' takes no relations (use kind: cre)")
        for label, spec in self.relations.items():
            for head, tail in spec.pairs or []:
                for end in (head, tail):
                    if end not in self.concepts:
                        raise ValueError(f"relation {label!r} names unknown concept label {end!r}")
        for label in self.normalization:
            if label not in self.concepts:
                raise ValueError(f"normalization: {label!r} is not a concept label")
        for label in self.assertion_labels or []:
            if label not in self.concepts:
                raise ValueError(f"assertion_labels: {label!r} is not a concept label")
        if self.events is not None:
            self._check_events(self.events)
        elif set(self.relations) & set(self.concepts):
            raise ValueError("relation labels that are also concept labels need an event task (events:)")
        return self

    def _check_events(self, events: EventSpec) -> None:
        if self.kind != "cre":
            raise ValueError("events: need kind 'cre'")
        for anchor in events.anchors:
            if anchor not in self.concepts:
                raise ValueError(f"events.anchors: {anchor!r} is not a concept label")
            for label in self.concepts:
                if len(self.argument_relations(anchor, label)) > 1:
                    raise ValueError(f"events: several relations allow {anchor} -> {label}; an argument's relation "
                                     "must follow from its label")
        for d in events.derived:
            if d.relation not in self.relations:
                raise ValueError(f"events.derived: {d.relation!r} is not a relation label")
            for end in (d.head, d.tail, *([d.anchor] if d.anchor else [])):
                if end not in self.concepts:
                    raise ValueError(f"events.derived: {end!r} is not a concept label")

    def argument_relations(self, anchor: str, label: str) -> list[str]:
        """Relation labels (not derived ones) whose pairs allow ``anchor`` -> ``label``."""
        derived = {d.relation for d in self.events.derived} if self.events else set()
        return [r for r, spec in self.relations.items()
                if r not in derived and spec.pairs is not None and (anchor, label) in spec.pairs]

    def allows(self, relation: str, head_label: str, tail_label: str) -> bool:
        spec = self.relations.get(relation)
        if spec is None:
            return False
        return spec.pairs is None or (head_label, tail_label) in spec.pairs


def task_path(name_or_path: str | os.PathLike) -> Path:
    """Resolve a task name (``phee``) to conf/tasks/phee.yaml, or accept a YAML path as is."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        return candidate
    return TASKS_DIR / f"{name_or_path}.yaml"


def load_task(name_or_path: str | os.PathLike) -> Task:
    path = task_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        known = ", ".join(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))
        raise ConfigError(f"task {str(name_or_path)!r} not found ({path}); shipped tasks: {known}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a task file must be a mapping")
    raw.setdefault("name", path.stem)
    if raw["name"] != path.stem:
        raise ConfigError(f"{path}: name {raw['name']!r} must equal the file stem {path.stem!r}")
    try:
        return Task.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(str(path), exc)) from None


def shipped_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
