"""Extraction tasks are data: a YAML file in conf/tasks/ (or anywhere) validated by :class:`Task`.

A new corpus with its own label set is served zero-shot by writing one YAML file; no code changes.
The task name is the file stem and the ``task`` column of every output row.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from notelake.conf.settings import TASKS_DIR, ConfigError, _format_validation_error


class RelationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    definition: str = Field(..., min_length=1, description="one line: what the relation means")
    pairs: list[tuple[str, str]] | None = Field(
        None, description="allowed (head label, tail label) pairs; null = any pair of the task's labels"
    )


class FewShotExample(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field(..., min_length=1)
    answer: dict = Field(..., description="the answer in schema v1 for `text`")


class Task(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., pattern=r"^[a-z][a-z0-9_]*$", description="= YAML file stem = `task` column")
    description: str = Field(..., min_length=1, description="one line naming the kind of text and the goal")
    kind: Literal["cce", "cre"] = Field(..., description="cce: concepts only; cre: concepts and relations")
    concepts: dict[str, str] = Field(..., min_length=1, description="concept label -> one-line definition")
    relations: dict[str, RelationSpec] = Field(default_factory=dict, description="relation label -> spec")
    examples: list[FewShotExample] = Field(default_factory=list, description="optional few-shot examples")
    define_labels: bool = Field(
        True, description="list each label with its definition in the prompt (a zero-shot task needs them); false "
                          "lists the names only, for tasks an adapter was trained on: it learnt the labels from data, "
                          "and the shorter prompt halves training and prefill cost")
    max_tokens: int = Field(512, ge=16, description="answer token budget, sized from the task's answer density")
    max_chunk_chars: int = Field(1500, ge=100, description="longest text span sent in one prompt")

    @model_validator(mode="after")
    def _relations_consistent(self) -> "Task":
        if self.kind == "cre" and not self.relations:
            raise ValueError("kind 'cre' needs at least one relation label")
        if self.kind == "cce" and self.relations:
            raise ValueError("kind 'cce' takes no relations (use kind: cre)")
        for label, spec in self.relations.items():
            for head, tail in spec.pairs or []:
                for end in (head, tail):
                    if end not in self.concepts:
                        raise ValueError(f"relation {label!r} names unknown concept label {end!r}")
        return self

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
