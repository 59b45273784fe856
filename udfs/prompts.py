"""Instruction prompts (Peng et al. 2025 style), one builder for training and inference.

The builder returns chat messages; the base model's tokenizer applies its own chat template
(``tokenizer.apply_chat_template`` in models/), never a hand-written one. The instruction comes first and
the note text last, so every prompt of a task shares one long prefix (vLLM prefix caching).
"""

from __future__ import annotations

import hashlib
import json

from notelake.conf.task import Task
from notelake.udfs.answer import ANSWER_SCHEMA_VERSION, dump_answer

TEMPLATE_VERSION = "t2"
SYSTEM = "You are a clinical information extraction system. You answer with JSON only."

_FORMAT_CCE = (
    'Answer as JSON: {"concepts":[{"label":L,"text":T}]}. T is copied exactly from the text. '
    'Add "occurrence":N when T occurs more than once (N counts from 1), and "assertion" '
    '(negated, speculated or hypothetical) when the concept is not asserted as present. '
    "List concepts in text order."
)
_FORMAT_CRE = _FORMAT_CCE[:-len("List concepts in text order.")] + (
    'Also list "relations":[{"label":R,"head":i,"tail":j}] where i and j index the concepts list from 0. '
    "List concepts in text order."
)


def instruction(task: Task) -> str:
    lines = [f"Task: {task.description}"]
    if task.define_labels:
        lines.append("Extract these concept labels:")
        lines += [f"- {label}: {definition}" for label, definition in task.concepts.items()]
    else:
        lines.append("Concept labels: " + ", ".join(task.concepts) + ".")
    if task.kind == "cre":
        # Allowed head/tail pairs are enforced by the parser; listing them would double the prompt.
        if task.define_labels:
            lines.append("and these relation labels:")
            lines += [f"- {label}: {spec.definition}" for label, spec in task.relations.items()]
        else:
            lines.append("Relation labels: " + ", ".join(task.relations) + ".")
    lines.append(_FORMAT_CRE if task.kind == "cre" else _FORMAT_CCE)
    return "\n".join(lines)


def _user_turn(task_instruction: str, text: str) -> dict[str, str]:
    return {"role": "user", "content": f"{task_instruction}\n\nText:\n{text}"}


def build_messages(task: Task, text: str, answer: dict | None = None) -> list[dict[str, str]]:
    """Chat messages for one text; with ``answer`` (a v1 dict) the assistant turn is appended (training)."""
    task_instruction = instruction(task)
    messages = [{"role": "system", "content": SYSTEM}]
    for example in task.examples:
        messages.append(_user_turn(task_instruction, example.text))
        messages.append({"role": "assistant", "content": dump_answer(example.answer)})
    messages.append(_user_turn(task_instruction, text))
    if answer is not None:
        messages.append({"role": "assistant", "content": dump_answer(answer)})
    return messages


def prompt_version(task: Task) -> str:
    """Hash of the template, the answer schema version and the task definition (recorded on every row)."""
    payload = json.dumps(
        {"template": TEMPLATE_VERSION, "schema": ANSWER_SCHEMA_VERSION, "system": SYSTEM,
         "instruction": instruction(task), "task": task.model_dump(mode="json")},
        sort_keys=True,
    )
    return f"{TEMPLATE_VERSION}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"
