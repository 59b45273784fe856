"""BIO tags on tokenizer tokens <-> concept spans in character offsets (the classification-head baseline, #14).

The tagger labels every token of a text with ``O``, ``B-<label>`` or ``I-<label>``; the tokenizer's offset
mapping ties each token to its characters, so a decoded concept is grounded by construction: its span is cut
from the text itself, never matched afterwards. Pure functions (no torch): the tokenizer's offsets come in as
``(start, end)`` pairs.

The tagger predicts one BIO layer per label (:func:`encode_layers`): PHEE nests its concepts (a Subject holds
its Subject_age, a Treatment its Drug), and one flat layer would lose 39 % of PHEE dev's concepts to overlaps;
one layer per label loses 2.1 % (PHEE) and 0.2 % (MACCROBAT), measured with the base tokenizer. What a layer
cannot hold, and how it is counted (:class:`TagStats`):

* a discontinuous concept: each fragment is tagged as a concept of its own label, so it decodes as several
  contiguous concepts (lost under strict match; lenient match may still credit a fragment);
* overlapping concepts of one label: the one that starts first (the longer on a tie) keeps the tokens; the others
  are lost;
* a span that starts or ends inside a token ("60%" of the token "%,") decodes widened to the token's edges.

Byte-level BPE may split one character into several tokens that share its offsets (multi-byte characters); they
carry one concept's tags like any other tokens. Tokens without characters (special tokens) get no tag (None: no
loss in training).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

OUTSIDE = "O"


def tag_names(labels: Sequence[str]) -> list[str]:
    """The tag set of a label list: ``O`` first, then ``B-`` and ``I-`` of every label in order."""
    return [OUTSIDE] + [f"{prefix}-{label}" for label in labels for prefix in ("B", "I")]


@dataclass
class TagStats:
    concepts: int = 0  # gold concepts seen
    fragments: int = 0  # extra fragments of discontinuous concepts, tagged as concepts of their own
    overlapping: int = 0  # concepts (or fragments) dropped because an earlier one holds their tokens
    untokenized: int = 0  # concepts with no token inside their characters (cannot occur with byte-level BPE)
    unknown_label: int = 0  # concepts whose label the tag set does not have
    lost_ids: list[str] = field(default_factory=list)

    def add(self, other: "TagStats") -> None:
        self.concepts += other.concepts
        self.fragments += other.fragments
        self.overlapping += other.overlapping
        self.untokenized += other.untokenized
        self.unknown_label += other.unknown_label
        self.lost_ids += other.lost_ids


def _overlaps(token: tuple[int, int], start: int, end: int) -> bool:
    return token[0] < end and token[1] > start and token[1] > token[0]


def encode_tags(text: str, offsets: Sequence[tuple[int, int]], concepts: Sequence[dict]) -> tuple[list[str | None], TagStats]:
    """Tags per token for ``concepts`` (``{"label", "spans": [[start, end], ...]}``, character offsets into
    ``text``). A token is inside a fragment when any of its characters is, except characters that are only
    whitespace (byte-level tokens carry their leading space)."""
    stats = TagStats(concepts=len(concepts))
    fragments = []
    for concept in concepts:
        spans = sorted(tuple(s) for s in concept["spans"])
        stats.fragments += len(spans) - 1
        fragments += [(start, -(end - start), end, concept["label"], concept.get("id", "")) for start, end in spans]
    tags: list[str | None] = [None if end <= start else OUTSIDE for start, end in offsets]
    owner: list[int | None] = [None] * len(offsets)
    for k, (start, _, end, label, cid) in enumerate(sorted(fragments)):
        hits = [i for i, tok in enumerate(offsets) if _overlaps(_strip(text, tok), start, end)]
        # whitespace-only tokens between the fragment's words belong to it (an O there would split it)
        inside = [i for i in range(hits[0], hits[-1] + 1) if tags[i] is not None] if hits else []
        if not inside:
            stats.untokenized += 1
            stats.lost_ids.append(cid)
            continue
        if any(owner[i] is not None for i in inside):
            stats.overlapping += 1
            stats.lost_ids.append(cid)
            continue
        first = inside[0]
        for i in inside:
            owner[i] = k
            # tokens sharing the first token's characters (one character split in bytes) continue it
            tags[i] = f"B-{label}" if i == first else f"I-{label}"
    return tags, stats


def _strip(text: str, token: tuple[int, int]) -> tuple[int, int]:
    """A token's characters without leading/trailing whitespace (an all-space token keeps its empty end)."""
    start, end = token
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def decode_tags(text: str, offsets: Sequence[tuple[int, int]], tags: Sequence[str]) -> list[dict]:
    """Concepts from token tags: ``{"label", "start", "end", "text"}`` with ``text == text[start:end]``.

    A ``B-X`` starts a concept; ``I-X`` continues a concept of label X and starts one otherwise (a model may
    skip the B). Tokens that share the previous token's characters continue it whatever their tag. The span runs
    from the first token's first non-space character to the last token's last one."""
    concepts: list[dict] = []
    current: dict | None = None
    previous: tuple[int, int] | None = None
    for token, tag in zip(offsets, tags):
        token = tuple(token)
        start, end = _strip(text, token)
        if token == previous and current is not None:
            continue
        previous = token
        if tag is None or tag == OUTSIDE or end <= start:
            if tag == OUTSIDE or tag is None:
                current = None
            continue
        prefix, label = tag.split("-", 1)
        if prefix == "I" and current is not None and current["label"] == label:
            current["end"] = max(current["end"], end)
            continue
        current = {"label": label, "start": start, "end": end}
        concepts.append(current)
    for concept in concepts:
        concept["text"] = text[concept["start"]:concept["end"]]
    return concepts


#: per label layer: the code of each tag; IGNORE marks tokens without characters (no loss)
LAYER_TAGS = (OUTSIDE, "B", "I")
IGNORE = -100


def encode_layers(text: str, offsets: Sequence[tuple[int, int]], concepts: Sequence[dict],
                  labels: Sequence[str]) -> tuple[list[list[int]], TagStats]:
    """Per token, one code per label (0 = O, 1 = B, 2 = I; IGNORE for tokens without characters): concepts of
    different labels may nest."""
    stats = TagStats()
    layers = []
    for label in labels:
        tags, layer_stats = encode_tags(text, offsets, [c for c in concepts if c["label"] == label])
        stats.add(layer_stats)
        layers.append(tags)
    unknown = [c for c in concepts if c["label"] not in set(labels)]
    stats.concepts += len(unknown)
    stats.unknown_label += len(unknown)
    stats.lost_ids += [c.get("id", "") for c in unknown]
    return [[IGNORE if layer[i] is None else LAYER_TAGS.index(layer[i].split("-", 1)[0]) for layer in layers]
            for i in range(len(offsets))], stats


def decode_layers(text: str, offsets: Sequence[tuple[int, int]], codes: Sequence[Sequence[int]],
                  labels: Sequence[str]) -> list[dict]:
    """Concepts from per-label codes (:func:`encode_layers`), in text order."""
    concepts = []
    for j, label in enumerate(labels):
        tags = [None if row[j] == IGNORE else OUTSIDE if row[j] == 0 else f"{LAYER_TAGS[row[j]]}-{label}"
                for row in codes]
        concepts += decode_tags(text, offsets, tags)
    return sorted(concepts, key=lambda c: (c["start"], c["end"], c["label"]))
