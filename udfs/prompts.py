"""Prompts, one builder for training and inference (Peng et al. 2025 style instruction tuning).

Two kinds of task (``Task.define_labels``):

* a **trained** task (an adapter learnt its labels and the answer format from data): the system turn names the
  task (``Extract phee events.``) and the user turn is the text alone. Measured on PHEE: 47 prompt tokens per
  sentence instead of ~290 with the label list (docs/results.md), so a training budget holds ~5x the examples.
* a **zero-shot** task (a new YAML, no adapter trained on it): the user turn defines every label and the answer
  format, then gives the text.

The builder returns chat messages; the base model's tokenizer applies its own chat template
(``tokenizer.apply_chat_template`` in models/), never a hand-written one.
"""

from __future__ import annotations

import hashlib
import json

from notelake.conf.task import Task
from notelake.udfs.answer import ANSWER_SCHEMA_VERSION, NONE, grammar_signature, reference_relations

TEMPLATE_VERSION = "t3"
SYSTEM_ZERO_SHOT = "You are a clinical information extraction system."


def system_prompt(task: Task) -> str:
    if task.define_labels:
        return SYSTEM_ZERO_SHOT
    return f"Extract {task.name} {'events' if task.events else 'concepts'}."


def instruction(task: Task) -> str:
    """The zero-shot instruction: label definitions and the answer format (a trained task has none)."""
    lines = [f"Task: {task.description}", "Concept labels:"]
    lines += [f"- {label}: {definition}" for label, definition in task.concepts.items()]
    anchors = task.events.anchors if task.events else []
    if anchors:
        lines.append(f"Write one line per event: its trigger first ({', '.join(anchors)}), then its arguments, "
                     "joined by ' | ', e.g. 'Trigger_label: word | Label: mention | Label: mention'.")
        lines.append("Other concepts: one line each, 'Label: mention'.")
    else:
        lines.append("Write one line per concept: 'Label: mention'.")
    references = reference_relations(task)
    if references:
        lines.append("Relations, added to the line of their head concept as ' | RELATION: tail mention':")
        lines += [f"- {label}: {task.relations[label].definition}" for label in references]
    lines.append("Copy each mention exactly from the text, lines in text order. Write '(negated)', '(speculated)' "
                 "or '(hypothetical)' after a label when the concept is not asserted as present. "
                 f"Write '{NONE}' when there is nothing to extract.")
    return "\n".join(lines)


def _user_turn(task: Task, text: str) -> dict[str, str]:
    content = text if not task.define_labels else f"{instruction(task)}\n\nText:\n{text}"
    return {"role": "user", "content": content}


def build_messages(task: Task, text: str, answer: str | None = None) -> list[dict[str, str]]:
    """Chat messages for one text; with ``answer`` (a v2 answer) the assistant turn is appended (training)."""
    messages = [{"role": "system", "content": system_prompt(task)}]
    for example in task.examples:
        messages.append(_user_turn(task, example.text))
        messages.append({"role": "assistant", "content": example.answer})
    messages.append(_user_turn(task, text))
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


#: The task fields a prompt or an answer depends on (budgets and chunking are in the extraction fingerprint; the
#: answer grammar's bounds enter through ``grammar_signature``).
_PROMPT_FIELDS = {"name", "description", "kind", "concepts", "relations", "events", "examples", "define_labels"}


def prompt_version(task: Task) -> str:
    """Hash of the template, the answer schema version, the task definition and the answer grammar's construction
    and bounds (recorded on every row; part of the extraction fingerprint)."""
    payload = json.dumps(
        {"template": TEMPLATE_VERSION, "schema": ANSWER_SCHEMA_VERSION, "system": system_prompt(task),
         "instruction": instruction(task) if task.define_labels else None,
         "task": task.model_dump(mode="json", include=_PROMPT_FIELDS), "grammar": grammar_signature(task)},
        sort_keys=True,
    )
    return f"{TEMPLATE_VERSION}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"
