"""The extractor of each task, chosen from the figures recorded with the shipped models (models/extractors.py)."""

import json
import shutil

import pytest

from notelake.conf import ConfigError, load_settings
from notelake.conf.task import load_task
from notelake.jobs.extraction.identity import describe_extraction
from notelake.models.extractors import SHIPPED_HEADS, Recorded


@pytest.fixture(scope="module")
def shipped():
    return load_settings(None).with_overrides(engine={"adapter": "models/adapters/notelake-mt"})


def test_auto_takes_the_tagger_where_it_measured_better_and_keeps_the_adapter_elsewhere(shipped):
    maccrobat = describe_extraction(shipped, load_task("maccrobat")).extractors
    assert (maccrobat.concepts, maccrobat.relations, maccrobat.tagger.name) == (
        "tagger", "generative", "tagger-maccrobat-lora-e3")
    figures = dict(maccrobat.figures)
    assert figures["tagger_cce_lenient_f1"] > figures["adapter_cce_lenient_f1"]
    assert maccrobat.request_fields() == {"tagger": str(maccrobat.tagger.path), "pairs": None}
    phee = describe_extraction(shipped, load_task("phee")).extractors
    assert (phee.concepts, phee.uses_heads) == ("generative", False)  # no PHEE tagger shipped


def test_the_choice_is_in_the_fingerprint_and_one_setting_overrides_it(shipped):
    task = load_task("maccrobat")
    auto = describe_extraction(shipped, task)
    generative = describe_extraction(shipped.with_overrides(engine={"concepts_from": "generative"}), task)
    assert not generative.extractors.uses_heads and generative.fingerprint != auto.fingerprint
    phee = load_task("phee")  # nothing chosen: the fingerprint is the one without the setting
    assert describe_extraction(shipped, phee).fingerprint == describe_extraction(
        shipped.with_overrides(engine={"concepts_from": "generative"}), phee).fingerprint


def test_a_head_the_task_lacks_is_refused_by_name(shipped):
    with pytest.raises(ConfigError, match="no tagger of task phee"):
        describe_extraction(shipped.with_overrides(engine={"concepts_from": "tagger"}), load_task("phee"))
    with pytest.raises(ConfigError, match="no pair classifier of task maccrobat"):
        describe_extraction(shipped.with_overrides(engine={"relations_from": "pairs"}), load_task("maccrobat"))


def test_figures_of_different_slices_are_not_compared(shipped, tmp_path):
    """A tagger measured on another dev slice than the adapter is not preferred, however high its figure."""
    heads = tmp_path / "heads"
    shutil.copytree(SHIPPED_HEADS / "tagger-maccrobat", heads / "tagger-maccrobat")
    moved = shipped.with_overrides(engine={"heads": str(heads)})
    assert describe_extraction(moved, load_task("maccrobat")).extractors.uses_heads  # same slice: chosen
    manifest_path = heads / "tagger-maccrobat" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["dev_scores"]["maccrobat"]["slice"]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    other = describe_extraction(moved, load_task("maccrobat"))
    assert not other.extractors.uses_heads
    assert not Recorded(0.9, "a").beats(Recorded(0.5, "b")) and Recorded(0.9, "a").beats(Recorded(0.5, "a"))


CASE = ("A 45-year-old woman presented with severe abdominal pain and fever for three days. "
        "Computed tomography showed a 5 cm mass in the left lobe of the liver. She denied nausea.")


def test_one_engine_call_gives_the_answer_and_the_taggers_concepts(engine_pool, shipped):
    """A request naming the task's tagger comes back from the vLLM engine actor with the generated answer and the
    tagger's grounded concepts; its rows are the tagger's concepts, the answer's relations anchored on them."""
    from notelake.models.engine import GenerationRequest
    from notelake.udfs.assemble import assemble_note
    from notelake.udfs.chunking import chunk_text
    from notelake.udfs.windows import Window, request_fields

    task = load_task("maccrobat")
    chosen = describe_extraction(shipped, task).extractors
    chunks = chunk_text(CASE, task.max_chunk_chars)
    heads = {task.name: chosen.request_fields()}
    requests = [GenerationRequest(**request_fields(Window(0, task, c), "grounded", 96, heads)) for c in chunks]
    plain = GenerationRequest(**request_fields(Window(1, task, chunks[0]), "grounded", 96))
    *results, untagged = engine_pool.generate([*requests, plain])
    assert all(r.ok and isinstance(r.text, str) and r.spans for r in results)
    assert untagged.ok and untagged.spans is None  # a request naming no head is the engine's alone
    for result, chunk in zip(results, chunks):
        assert all(label in task.concepts and 0 <= s < e <= len(chunk.text) for label, s, e in result.spans)
    res = assemble_note(note_id="n1", text=CASE, task=task, chunks=chunks, outputs=[r.text for r in results],
                        tagged=[r.spans for r in results], lineage={
                            "run_id": "r", "model": "m", "adapter": None, "adapter_sha256": None,
                            "prompt_version": "p", "fingerprint": "f", "extracted_at": None})
    assert res.concepts and {c["grounding_method"] for c in res.concepts} == {"tagger"}
    assert all(CASE[c["start"]:c["end"]] == c["text"] for c in res.concepts)
    ids = {c["concept_id"] for c in res.concepts}
    assert all(r["head_concept_id"] in ids and r["tail_concept_id"] in ids for r in res.relations)


def test_an_evaluation_with_the_tagger_scores_the_adapter_alone_from_the_same_answers(engine_pool, shipped):
    """``evaluate_records`` with the task's heads: the scores of the combination, and of the generative answers
    alone from the same run (one engine call per window)."""
    from notelake.models.evaluation import EvalOptions, evaluate_records

    def concept(cid: str, label: str, word: str) -> dict:
        start = CASE.index(word)
        return {"id": cid, "label": label, "spans": [[start, start + len(word)]]}

    record = {"note_id": "case-1", "text": CASE, "relations": [], "concepts": [
        concept("T1", "Sign_symptom", "abdominal pain"), concept("T2", "Sign_symptom", "fever"),
        concept("T3", "Sign_symptom", "mass"), concept("T4", "Biological_structure", "liver")]}
    task = load_task("maccrobat")
    chosen = describe_extraction(shipped, task).extractors
    scores = evaluate_records(task, [record], engine_pool.generate, EvalOptions(
        adapter="", max_tokens=96, resamples=0, progress=False, heads=chosen.request_fields()))
    assert scores["throughput"]["prompts"] >= 1 and scores["cce"]["lenient"]["n_gold"] == 4
    assert scores["generative_alone"]["cce"]["lenient"]["n_gold"] == 4
    assert scores["cce"]["lenient"]["n_pred"] != scores["generative_alone"]["cce"]["lenient"]["n_pred"] or \
        scores["cce"]["lenient"]["f1"] != scores["generative_alone"]["cce"]["lenient"]["f1"]
