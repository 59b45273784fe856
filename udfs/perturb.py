"""Label-set perturbation for instruction tuning that transfers to unseen label sets.

A model trained only on its tasks' fixed label names learns the names, not the definitions: given a new YAML it
answers ``none``. Training examples whose prompt carries a perturbed label set -- a sampled subset of the labels in
shuffled order, some renamed to another spelling or to a neutral code, every label with its one-line definition
(GoLLIE / InstructUIE style) -- can only be answered by reading the definitions. :func:`perturb_example` turns one
gold example into such an example: a zero-shot :class:`Task` (``define_labels: true``) and the gold record relabelled
to match, rendered by the same ``gold_answer`` as every other example.

Only what an answer spells out is renamed: concept labels and the relation labels written as reference items.
Event-argument relations and derived relations follow from the concept labels and keep their names.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from notelake.conf.task import Task
from notelake.udfs.answer import reference_relations

#: neutral codes a renamed label may get: the name then says nothing, only the definition does
_CODE_STEMS = ("TYPE", "CLASS", "CAT", "KIND", "L", "E")


@dataclass(frozen=True)
class PerturbSpec:
    """How one example's label set is perturbed."""

    keep_prob: float = 0.6  # each label (anchors excepted) stays in the prompt with this probability
    max_labels: int = 12  # labels per prompt at most (bounds the prompt's length)
    rename_prob: float = 0.5  # a kept label is renamed with this probability
    code_prob: float = 0.5  # a renamed label becomes a neutral code (else another spelling of its name)


def _respelled(label: str, rng: random.Random) -> str:
    """Another spelling of a label's words: the shapes new task files use (``sign_symptom``, ``SignSymptom``)."""
    words = [w for w in label.replace("-", "_").split("_") if w]
    shapes = ["_".join(w.lower() for w in words), "".join(w.capitalize() for w in words),
              "-".join(w.lower() for w in words), "_".join(w.upper() for w in words)]
    options = [s for s in shapes if s != label] or [f"{label}_x"]
    return rng.choice(options)


def _renames(labels: list[str], rng: random.Random, spec: PerturbSpec, taken: set[str]) -> dict[str, str]:
    """old label -> new label for ``labels`` (most keep their name); new names collide with nothing in ``taken``."""
    out: dict[str, str] = {}
    used = set(taken)
    for label in labels:
        new = label
        if rng.random() < spec.rename_prob:
            new = (f"{rng.choice(_CODE_STEMS)}{rng.randint(1, 99)}" if rng.random() < spec.code_prob
                   else _respelled(label, rng))
        while new != label and new in used:
            new = f"{new}_{rng.randint(1, 9)}"
        used.add(new)
        out[label] = new
    return out


def _kept_labels(task: Task, rng: random.Random, spec: PerturbSpec, present: set[str]) -> list[str]:
    anchors = list(task.events.anchors) if task.events else []
    others = [label for label in task.concepts if label not in anchors and rng.random() < spec.keep_prob]
    rng.shuffle(others)
    others = others[:max(0, spec.max_labels - len(anchors))]
    # a prompt whose labels the text never holds teaches "none": keep at least one label the gold answer uses
    if present and not present & set(anchors + others):
        if len(anchors) + len(others) >= spec.max_labels and others:
            others.pop()
        others.append(rng.choice(sorted(present)))
    kept = anchors + others
    rng.shuffle(kept)
    return kept


def perturb_task(task: Task, rng: random.Random, spec: PerturbSpec,
                 present: set[str] = frozenset()) -> tuple[Task, dict[str, str], dict[str, str]]:
    """(zero-shot task over a perturbed label set, concept renames, reference-relation renames).

    ``present``: the concept labels of the example's gold answer; at least one of them stays in the label set.
    """
    kept = _kept_labels(task, rng, spec, present)
    concept_names = _renames(kept, rng, spec, taken=set(task.concepts) | set(task.relations))
    references = set(reference_relations(task))
    relations = {}
    for label, relation in task.relations.items():
        pairs = None if relation.pairs is None else [
            [concept_names[h], concept_names[t]] for h, t in relation.pairs if h in concept_names and t in concept_names]
        if pairs == []:
            continue
        relations[label] = {"definition": relation.definition, "pairs": pairs}
    relation_names = _renames([r for r in relations if r in references], rng, spec,
                              taken=set(concept_names.values()) | set(relations))
    events = None
    if task.events:
        derived = [{"relation": d.relation, "head": concept_names[d.head], "tail": concept_names[d.tail],
                    "anchor": concept_names[d.anchor] if d.anchor else None}
                   for d in task.events.derived
                   if d.relation in relations and d.head in concept_names and d.tail in concept_names
                   and (d.anchor is None or d.anchor in concept_names)]
        events = {"anchors": [concept_names[a] for a in task.events.anchors], "derived": derived}
    renamed_relations = {relation_names.get(label, label): spec_ for label, spec_ in relations.items()}
    perturbed = Task.model_validate({
        "name": task.name, "description": task.description, "kind": "cre" if renamed_relations else "cce",
        "concepts": {concept_names[label]: task.concepts[label] for label in kept},
        "relations": renamed_relations, "events": events, "define_labels": True,
        "max_tokens": task.max_tokens, "max_chunk_chars": task.max_chunk_chars,
        "chunk_overlap_chars": task.chunk_overlap_chars,
    })
    return perturbed, concept_names, relation_names


def relabel_record(record: dict, concept_names: dict[str, str], relation_names: dict[str, str]) -> dict:
    """The gold record with its concepts and reference relations renamed; concepts of dropped labels (and the
    relations touching them) removed. Event-argument relations keep their labels (the answer never names them)."""
    concepts = [{**c, "label": concept_names[c["label"]]} for c in record["concepts"] if c["label"] in concept_names]
    kept = {c["id"] for c in concepts}
    relations = [{**r, "label": relation_names.get(r["label"], r["label"])} for r in record.get("relations", [])
                 if r["head"] in kept and r["tail"] in kept]
    return {**record, "concepts": concepts, "relations": relations}


def window_labels(record: dict, window: tuple[int, int] | None = None) -> set[str]:
    """Concept labels of the gold concepts lying wholly inside ``window`` (the whole text when None)."""
    lo, hi = window or (0, len(record["text"]))
    return {c["label"] for c in record["concepts"] if c["spans"][0][0] >= lo and c["spans"][-1][1] <= hi}


def perturb_example(task: Task, record: dict, rng: random.Random, spec: PerturbSpec,
                    window: tuple[int, int] | None = None) -> tuple[Task, dict]:
    """(perturbed zero-shot task, relabelled record) for one training example over ``record``'s ``window``."""
    perturbed, concept_names, relation_names = perturb_task(task, rng, spec, window_labels(record, window))
    return perturbed, relabel_record(record, concept_names, relation_names)
