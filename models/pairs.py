"""The relation pair classifier of the classification-head baseline: relations over a tagger's concepts.

For each concept that can head a relation, one forward pass over its window with the head written first
(``udfs/pairs.py``): at the token that ends each candidate tail, one yes/no layer per relation label says whether
the head holds that relation to the tail. Same backbone, LoRA or full fine-tuning, note split, windows and
training machinery as the tagger (``models/tagger.py``: :func:`fit_token_head`), trained on gold concepts (with
``pair_candidates_tagger``: gold plus a tagger's predicted concepts, so it also learns to say no to a false
concept) and applied end to end to the tagger's predicted concepts, so relation F1 is scored end to end (a relation counts
only when both its concepts were found) by the generative rows' scorer.

What it cannot do: relations that no pass offers as a candidate pair (ends in different windows, or outside the
``pair_max_gap_chars`` / ``pair_seen_min_count`` limits: counted in training as ``not_candidates``),
and a discontinuous concept is placed by its first and last character. The causal backbone reads a tail before
any text after it, like the tagger.

Nothing here logs note text: counts, losses and timings only.
"""

from __future__ import annotations

import functools
import gc
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from notelake.conf.settings import ConfigError
from notelake.conf.task import Task, load_task
from notelake.models.tagger import (HeadKind, Tagger, TrainedHead, head_notes, head_report, predicted_items,
                                   train_head, windows)
from notelake.models.training import Example, TrainConfig
from notelake.udfs.pairs import (IGNORE, allowed_relations, candidate_tails, decode_tails, encode_targets, head_prefix,
                                 pass_span, with_predicted, with_seen_pairs)

KIND = "pairs"
YES_NO = 2  # classes per relation layer


def gold_concepts(task: Task, record: dict) -> list[dict]:
    """The record's concepts of the task's labels: id, label, first and last character, text."""
    return [{"id": c["id"], "label": c["label"], "start": min(s for s, _ in c["spans"]),
             "end": max(e for _, e in c["spans"]), "text": c["text"]}
            for c in record["concepts"] if c["label"] in task.concepts]


def window_inputs(tokenizer, head: dict, window_enc) -> tuple[list[int], int]:
    """Token ids of the head line + the window, and the head line's length in tokens."""
    prefix = tokenizer(head_prefix(head["label"], head["text"]), add_special_tokens=False)["input_ids"]
    return list(prefix) + list(window_enc["input_ids"]), len(prefix)


@dataclass(frozen=True)
class PairExamples:
    """The pair classifier's examples of a gold note (its ``HeadKind.note_examples``, models/tagger.py).
    ``predicted``: a tagger's concepts per note id, joined to the gold ones as candidates
    (``udfs.pairs.with_predicted``); ``max_gap``: the tail distance limit of :func:`head_passes`."""

    predicted: dict[str, list[dict]] | None = None
    max_gap: int | None = None

    def __call__(self, tokenizer, task: Task, record: dict, window_chars: int, counts: dict) -> list[Example]:
        """One example per head pass of a gold note (:func:`head_passes`): ids, and per token one code per relation
        (IGNORE but at candidate tails' end tokens)."""
        relations = list(task.relations)
        concepts = gold_concepts(task, record)
        if self.predicted is not None:
            concepts, joined = with_predicted(concepts, self.predicted[record["note_id"]])
            for key, n in joined.items():
                counts[f"{key}_concepts"] = counts.get(f"{key}_concepts", 0) + n
        gold: dict[tuple[str, str], set[str]] = {}
        for r in record.get("relations", []):
            if r["label"] in task.relations:
                gold.setdefault((r["head"], r["tail"]), set()).add(r["label"])
        counts["gold_relations"] = counts.get("gold_relations", 0) + sum(len(v) for v in gold.values())
        covered: set[tuple[str, str]] = set()
        out = []
        encode = token_encoder(tokenizer)
        for p in head_passes(task, [record["text"]], [concepts], window_chars, self.max_gap):
            head = p.head
            codes = [(t["end"], {r: int(r in gold.get((head["id"], t["id"]), ()))
                                 for r in allowed_relations(task, head["label"], t["label"])}) for t in p.tails]
            covered.update((head["id"], t["id"]) for t in p.tails)
            enc = encode(p.text)
            ids, n_prefix = window_inputs(tokenizer, head, enc)
            labels = [[IGNORE] * len(relations)] * n_prefix + encode_targets(enc["offset_mapping"], relations, codes)
            counts["pairs"] = counts.get("pairs", 0) + len(p.tails)
            counts["positive"] = counts.get("positive", 0) + sum(sum(c.values()) for _, c in codes)
            out.append(Example(f"{task.name}:{record['note_id']}#{p.window}:{head['id']}", task.name, ids, labels))
        # gold relations no pass offers as a candidate pair (ends in different windows, too far apart, or a label pair
        # the classifier does not decide): never learnt, never found
        counts["not_candidates"] = counts.get("not_candidates", 0) + sum(
            len(labels) for pair, labels in gold.items() if pair not in covered)
        return out


def token_encoder(tokenizer):
    """The tokenizer with offsets, remembering recent texts: a window's heads share its text when passes read the
    whole window."""
    return functools.lru_cache(maxsize=8)(
        lambda text: tokenizer(text, return_offsets_mapping=True, add_special_tokens=False))


def train_pairs(cfg: TrainConfig, *, dry_run: bool = False) -> dict[str, Any]:
    """Train one pair-classifier config end to end; returns the manifest (or the data plan when ``dry_run``)."""
    predicted, extra_plan = None, {}
    if cfg.pair_candidates_tagger is not None:
        predicted, extra_plan = tagger_concepts(cfg)
    note_examples = PairExamples(predicted, cfg.pair_max_gap_chars)
    derive_task = None
    if cfg.pair_seen_min_count is not None:
        derive_task = functools.partial(with_seen_pairs, min_count=cfg.pair_seen_min_count)
    head = HeadKind(KIND, note_examples, lambda task: list(task.relations), "relations", YES_NO, derive_task)
    return train_head(cfg, head, dry_run=dry_run, extra_plan=extra_plan,
                      extra_manifest={"pair_max_gap_chars": cfg.pair_max_gap_chars})


def tagger_concepts(cfg: TrainConfig) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """``cfg.pair_candidates_tagger``'s concepts on the config's training and validation notes (by note id), and
    the tagger's name, digest and prediction time for the data plan. The tagger is freed before training starts."""
    tagger = Tagger(cfg.pair_candidates_tagger, threads=cfg.threads)
    if tagger.task.name != load_task(cfg.tasks[0]).name:
        raise ConfigError(f"pair_candidates_tagger {cfg.pair_candidates_tagger} tags task {tagger.task.name}, "
                          f"not {cfg.tasks[0]}")
    _, train_notes, val_notes = head_notes(cfg)
    notes = train_notes + val_notes
    concepts, counts = tagger.predict([r["text"] for r in notes])
    info = {"candidates_tagger": tagger.manifest.get("name"), "candidates_tagger_sha256": tagger.manifest.get("sha256"),
            "candidates_tagger_s": round(counts["wall_s"], 1)}
    print(f"candidate concepts: {sum(map(len, concepts)):,} from tagger {info['candidates_tagger']} on "
          f"{len(notes):,} notes in {info['candidates_tagger_s']} s", flush=True)
    del tagger
    gc.collect()
    return {r["note_id"]: found for r, found in zip(notes, concepts)}, info


class HeadPass(NamedTuple):
    """One forward pass of the classifier: a head and its candidate tails over the text the pass reads."""

    text_index: int     # which of the texts
    window: int         # which window of that text
    text: str           # what the pass reads after the head line
    head: dict          # the head concept (offsets into its whole text)
    tails: list[dict]   # copies of the candidate tails, offsets into ``text``
    concept_of: dict    # id(tail copy) -> its concept


def head_passes(task: Task, texts: list[str], concepts: list[list[dict]], window_chars: int,
                max_gap: int | None = None):
    """Yields a :class:`HeadPass` for every concept with candidate tails (``udfs.pairs.candidate_tails``) in its
    window. Concepts per text: label, start, end, text, .... Without ``max_gap`` a pass reads the head's whole
    window; with it, the span from the first to the last character of the head and its tails."""
    for k, (text, found) in enumerate(zip(texts, concepts)):
        for chunk in windows(text, window_chars):
            inside = [c for c in found if chunk.start <= c["start"] and c["end"] <= chunk.end]
            local = [{**c, "start": c["start"] - chunk.start, "end": c["end"] - chunk.start} for c in inside]
            concept_of = {id(w): c for w, c in zip(local, inside)}
            for head, local_head in zip(inside, local):
                tails = candidate_tails(task, local_head, local, max_gap)
                if not tails:
                    continue
                if max_gap is None:
                    yield HeadPass(k, chunk.index, chunk.text, head, tails, concept_of)
                    continue
                lo, hi = pass_span(local_head, tails)
                shifted = [{**t, "start": t["start"] - lo, "end": t["end"] - lo} for t in tails]
                yield HeadPass(k, chunk.index, chunk.text[lo:hi], head, shifted,
                               {id(s): concept_of[id(t)] for s, t in zip(shifted, tails)})


class PairClassifier(TrainedHead):
    """A trained pair-classifier folder: ``predict(texts, concepts)`` -> relations between the given concepts."""

    kind = KIND
    classes = YES_NO

    def __init__(self, folder, threads: int | None = None):
        super().__init__(folder, threads)
        self.max_gap = self.manifest.get("pair_max_gap_chars")

    def predict(self, texts: list[str], concepts: list[list[dict]],
                batch_size: int = 8) -> tuple[list[list[dict]], dict]:
        """Relations per text (``{"label", "head", "tail"}``, head and tail being items of ``concepts``: dicts with
        label, start, end, text, offsets into the text) and counts (passes, tokens, s)."""
        encode = token_encoder(self.tokenizer)
        passes = []  # (the pass, its token offsets, ids, head-line tokens)
        for p in head_passes(self.task, texts, concepts, self.window_chars, self.max_gap):
            enc = encode(p.text)
            ids, n_prefix = window_inputs(self.tokenizer, p.head, enc)
            passes.append((p, enc["offset_mapping"], ids, n_prefix))
        out: list[list[dict]] = [[] for _ in texts]
        t0 = time.monotonic()
        for i, codes in self.decisions([ids for _, _, ids, _ in passes], batch_size):
            p, offsets, _, n_prefix = passes[i]
            for relation, tail in decode_tails(self.task, p.head, p.tails, offsets, codes[n_prefix:]):
                out[p.text_index].append({"label": relation, "head": p.head, "tail": p.concept_of[id(tail)]})
        tokens = sum(len(ids) for _, _, ids, _ in passes)
        return out, {"passes": len(passes), "tokens": tokens, "wall_s": time.monotonic() - t0}


class AllowedPairs:
    """The pair classifier's floor (``jobs.evaluate --pairs allowed``): every candidate pair, with every relation
    its label pair allows: what a classifier that always says yes predicts. No model, no passes. :meth:`like`: the
    candidates of a trained classifier (its task's label pairs, window and largest gap), so the floor shows what
    its decisions add over its candidate limits."""

    def __init__(self, task: Task, window_chars: int, max_gap: int | None = None, name: str = "allowed-pairs"):
        self.task = task
        self.window_chars = window_chars
        self.max_gap = max_gap
        self.manifest = {"name": name, "sha256": None, "kind": "rule"}
        self.folder = None  # a rule: nothing on disk

    @classmethod
    def like(cls, folder) -> "AllowedPairs":
        manifest = PairClassifier.checked_manifest(folder)  # no model loaded: a rule needs its candidates only
        return cls(Task.model_validate(manifest["task_definition"]), int(manifest["tag_window_chars"]),
                   manifest.get("pair_max_gap_chars"), name=f"allowed-pairs-like-{manifest.get('name')}")

    def predict(self, texts: list[str], concepts: list[list[dict]]) -> tuple[list[list[dict]], dict]:
        out: list[list[dict]] = [[] for _ in texts]
        for p in head_passes(self.task, texts, concepts, self.window_chars, self.max_gap):
            out[p.text_index] += [{"label": r, "head": p.head, "tail": p.concept_of[id(t)]} for t in p.tails
                                  for r in allowed_relations(self.task, p.head["label"], t["label"])]
        return out, {"passes": 0, "tokens": 0, "wall_s": 0.0}


def evaluate_end_to_end(tagger: Tagger, pairs: PairClassifier | AllowedPairs, records: list[dict], *, resamples: int = 1000,
                        seed: int = 0) -> dict[str, Any]:
    """Concepts by the tagger, relations by the pair classifier over them, scored end to end by the generative
    rows' scorer (concepts and relations)."""
    from notelake.models.evaluation import Mention, Rel, gold_items, score_notes

    if pairs.task.name != tagger.task.name:
        raise ConfigError(f"tagger task {tagger.task.name} != pair classifier task {pairs.task.name}")
    texts = [r["text"] for r in records]
    concepts, tag_counts = tagger.predict(texts)
    relations, pair_counts = pairs.predict(texts, concepts)

    def mention(c: dict) -> Mention:
        return Mention(c["label"], ((c["start"], c["end"]),))

    scored = []
    for record, found, related in zip(records, concepts, relations):
        pred = predicted_items(record, found)
        pred.relations = [Rel(r["label"], mention(r["head"]), mention(r["tail"])) for r in related]
        scored.append((pred, gold_items(pairs.task, record)))
    scores = score_notes(pairs.task, scored, resamples=resamples, seed=seed)
    wall = tag_counts["wall_s"] + pair_counts["wall_s"]
    return head_report(scores, len(records), tag_counts["windows"] + pair_counts["passes"],
                       tag_counts["tokens"] + pair_counts["tokens"], wall)
