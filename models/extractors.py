"""Which extractor writes a task's concepts and relations, and the engine that runs the choice in one pass.

A task's concepts come from the generative adapter or from a classification-head tagger (``models/tagger.py``),
its relations from the generative answer or from a pair classifier over the tagger's concepts (``models/pairs.py``).
``engine.concepts_from`` / ``engine.relations_from`` set ``auto`` (the default) choose per task from the dev
figures recorded in the models' manifests (``dev_scores``, written by ``notelake evaluate --record-dev-scores``):
a head replaces the generative extractor only when both figures were measured on the same dev slice (its
fingerprint) and the head's is higher. Nothing is chosen without a figure: an adapter with none for the task keeps
its own concepts.

With tagger concepts and generative relations, a note is tagged in the tagger's own windows (the size it was trained
on, no overlap: the task's prompt windows are shorter and overlap, and a causal tagger reads less left context in
them) and prompted in the task's windows as before, in the same pass; the answer's relations are anchored on the
tagger's concepts (``udfs.assemble``: each end goes to the tagger concept its grounded mention overlaps most), the
answer's own mentions are not written. With a pair classifier as well, the note is not prompted at all.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from notelake.conf.settings import ConfigError, EngineConfig
from notelake.models.adapters import AdapterError, AdapterInfo, load_head

log = logging.getLogger(__name__)

#: The classification heads shipped with the package (engine.heads: null).
SHIPPED_HEADS = Path(__file__).resolve().parent / "taggers"
#: The backends that answer prompts, beside which a head can run (REPLAY's made-up answers: the data plane's tests).
GENERATIVE_BACKENDS = ("vllm", "hf", "replay")

CONCEPT_FIGURE, RELATION_FIGURE = "cce_lenient_f1", "cre_lenient_f1"


@dataclass(frozen=True)
class Recorded:
    """A dev figure recorded in a model's manifest and the dev slice it was measured on."""

    value: float
    slice_sha256: str

    @classmethod
    def of(cls, manifest: dict, task: str, figure: str) -> "Recorded | None":
        scores = (manifest.get("dev_scores") or {}).get(task) or {}
        value, slice_sha = scores.get(figure), (scores.get("slice") or {}).get("sha256")
        return cls(float(value), str(slice_sha)) if value is not None and slice_sha else None

    def beats(self, other: "Recorded | None") -> bool:
        """Higher than ``other`` on the same slice (figures from different slices are not compared)."""
        return other is not None and other.slice_sha256 == self.slice_sha256 and self.value > other.value


@dataclass(frozen=True)
class ExtractorChoice:
    """A task's extractors: ``concepts`` generative or tagger, ``relations`` generative or pairs, the heads chosen,
    and the recorded figures the choice compared (``figures``: name -> value, for the runs row)."""

    concepts: str = "generative"
    relations: str = "generative"
    tagger: AdapterInfo | None = None
    pairs: AdapterInfo | None = None
    figures: tuple[tuple[str, float | None], ...] = ()

    @property
    def uses_heads(self) -> bool:
        return self.tagger is not None

    def heads(self) -> dict[str, Any] | None:
        """What the executors need to run the heads (``udfs.windows.tag_windows``): the folders a tag request names
        and the tagger's own window size (it tags a note in the windows it was trained on); None without a head."""
        if not self.uses_heads:
            return None
        return {"tagger": str(self.tagger.path), "pairs": str(self.pairs.path) if self.pairs else None,
                "window_chars": int(self.tagger.manifest["tag_window_chars"])}

    def fingerprint(self) -> dict[str, str | None] | None:
        """What of the choice changes an answer (None with no head: fingerprints without one are unchanged)."""
        if not self.uses_heads:
            return None
        return {"tagger_sha256": self.tagger.sha256, "pairs_sha256": self.pairs.sha256 if self.pairs else None,
                "relations": self.relations, "tag_window_chars": self.heads()["window_chars"]}

    def describe(self) -> dict[str, Any]:
        """The choice for the runs row (``extractors_json``) and the logs: methods, heads, figures compared."""
        return {"concepts": self.concepts, "relations": self.relations,
                "tagger": {"name": self.tagger.name, "sha256": self.tagger.sha256} if self.tagger else None,
                "pairs": {"name": self.pairs.name, "sha256": self.pairs.sha256} if self.pairs else None,
                "figures": dict(self.figures)}


def heads_of(folder: Path, task: str, base_sha: str, kind: str) -> list[AdapterInfo]:
    """The heads of ``kind`` (tagger, pairs) in ``folder`` trained on ``task`` over this base model."""
    found = []
    for sub in sorted(p for p in folder.iterdir() if (p / "manifest.json").is_file()) if folder.is_dir() else ():
        try:
            found.append(load_head(sub, base_sha, task, kind=kind))
        except AdapterError:  # another task's head, another kind, another base model
            continue
    return found


def _best(heads: list[AdapterInfo], task: str, figure: str) -> tuple[AdapterInfo | None, Recorded | None]:
    """The head with the highest recorded ``figure`` (a head without one ranks last)."""
    if not heads:
        return None, None
    ranked = max(heads, key=lambda h: (Recorded.of(h.manifest, task, figure) or Recorded(-1.0, "")).value)
    return ranked, Recorded.of(ranked.manifest, task, figure)


def choose_extractors(engine: EngineConfig, task: str, adapter: AdapterInfo | None, base_sha: str) -> ExtractorChoice:
    """The extractors of ``task`` under ``engine`` (module docstring); ConfigError when a setting asks for a head the
    task has none of. The tagger backend keeps its own extractor."""
    if engine.backend not in GENERATIVE_BACKENDS or engine.concepts_from == "generative":
        if engine.relations_from == "pairs" and engine.backend in GENERATIVE_BACKENDS:
            raise ConfigError("engine.relations_from: pairs classifies relations over a tagger's concepts: set "
                              "engine.concepts_from to tagger or auto")
        return ExtractorChoice()
    folder = Path(engine.heads).expanduser() if engine.heads else SHIPPED_HEADS
    tagger, tagger_figure = _best(heads_of(folder, task, base_sha, "tagger"), task, CONCEPT_FIGURE)
    own = Recorded.of(adapter.manifest, task, CONCEPT_FIGURE) if adapter else None
    figures = [("adapter_" + CONCEPT_FIGURE, own.value if own else None),
               ("tagger_" + CONCEPT_FIGURE, tagger_figure.value if tagger_figure else None)]
    if engine.concepts_from == "tagger" and tagger is None:
        raise ConfigError(f"engine.concepts_from: tagger, but {folder} holds no tagger of task {task} over this "
                          "base model (train one: conf/train/tagger-*.yaml)")
    if tagger is None or (engine.concepts_from == "auto" and not (tagger_figure and tagger_figure.beats(own))):
        if engine.relations_from == "pairs":
            raise ConfigError(f"engine.relations_from: pairs, but task {task}'s concepts stay generative (no tagger "
                              "chosen): a pair classifier needs a tagger's concepts")
        return ExtractorChoice(figures=tuple(figures))
    pairs = None
    if engine.relations_from != "generative":
        candidate, pairs_figure = _best(heads_of(folder, task, base_sha, "pairs"), task, RELATION_FIGURE)
        own_relations = Recorded.of(adapter.manifest, task, RELATION_FIGURE) if adapter else None
        figures += [("adapter_" + RELATION_FIGURE, own_relations.value if own_relations else None),
                    ("pairs_" + RELATION_FIGURE, pairs_figure.value if pairs_figure else None)]
        if engine.relations_from == "pairs" and candidate is None:
            raise ConfigError(f"engine.relations_from: pairs, but {folder} holds no pair classifier of task {task}")
        if engine.relations_from == "pairs" or (pairs_figure and pairs_figure.beats(own_relations)):
            pairs = candidate
    return ExtractorChoice(concepts="tagger", relations="pairs" if pairs else "generative", tagger=tagger,
                           pairs=pairs, figures=tuple(figures))


class HeadsEngine:
    """A generative engine with classification heads beside it. A request naming a ``tagger`` is not a prompt: its
    text is tagged, the result carries the tagger's concepts as ``spans`` (and, naming ``pairs`` too, the pair
    classifier's relations as ``relations``), no answer. Heads are loaded on their first request and kept;
    everything else is the wrapped engine's."""

    def __init__(self, inner, cfg: EngineConfig):
        self.inner, self.cfg = inner, cfg
        self._heads: dict[tuple[str, str | None], Any] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def _head(self, tagger: str, pairs: str | None):
        from notelake.models.tagger import TaggerEngine

        with self._lock:
            key = (tagger, pairs)
            if key not in self._heads:
                self._heads[key] = TaggerEngine(self.cfg.model_copy(
                    update={"backend": "tagger", "adapter": tagger, "pairs": pairs}))
            return self._heads[key]

    def generate(self, requests: list, on_result=None) -> list:
        """Every request's result in request order: a request naming a tagger is tagged (one batched pass per
        head), every other one goes to the generative engine, each result reported as it finishes."""
        from notelake.models.engine import report_each

        results: dict[str, Any] = {}
        for (tagger, pairs), group in _grouped(r for r in requests if r.tagger).items():
            for result in report_each(self._head(tagger, pairs).generate(group), on_result):
                results[result.request_id] = result
        ask = [r for r in requests if not r.tagger]
        if ask:
            results.update((res.request_id, res) for res in self.inner.generate(ask, on_result=on_result))
        return [results[r.request_id] for r in requests]


def _grouped(requests) -> dict[tuple[str, str | None], list]:
    groups: dict[tuple[str, str | None], list] = {}
    for r in requests:
        groups.setdefault((r.tagger, r.pairs), []).append(r)
    return groups
