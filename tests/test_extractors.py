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
    assert maccrobat.heads() == {"tagger": str(maccrobat.tagger.path), "pairs": None, "window_chars": 2000}
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


def test_the_engine_tags_a_note_in_the_taggers_windows_beside_its_prompts(engine_pool, shipped):
    """Tag requests (the tagger's own windows) and prompts go to the vLLM engine actor in one call: the first come
    back with the tagger's grounded concepts and no answer, the others with answers; the note's rows are the
    tagger's concepts, the answers' relations anchored on them."""
    from notelake.models.engine import GenerationRequest
    from notelake.udfs.assemble import assemble_note
    from notelake.udfs.chunking import chunk_text
    from notelake.udfs.windows import Window, request_fields, tag_request_fields, tag_windows

    task = load_task("maccrobat")
    heads = describe_extraction(shipped, task).extractors.heads()
    windows = tag_windows(CASE, heads)
    chunks = chunk_text(CASE, 120, 40)  # prompt windows shorter than the tagger's, overlapping, as MACCROBAT's are
    assert len(windows) == 1 and len(chunks) > 1  # the tagger reads the note whole, the prompts in pieces
    tags = [GenerationRequest(**tag_request_fields(0, w, heads)) for w in windows]
    prompts = [GenerationRequest(**request_fields(Window(0, task, c), "grounded", 96)) for c in chunks]
    results = engine_pool.generate([*tags, *prompts])
    tagged, answers = results[:len(tags)], results[len(tags):]
    assert all(r.ok and r.text is None and r.spans for r in tagged)
    assert all(r.ok and isinstance(r.text, str) and r.spans is None for r in answers)
    assert all(label in task.concepts and 0 <= s < e <= len(CASE) for label, s, e in tagged[0].spans)
    res = assemble_note(note_id="n1", text=CASE, task=task, chunks=chunks, outputs=[r.text for r in answers],
                        heads=list(zip(windows, tagged)), lineage={
                            "run_id": "r", "model": "m", "adapter": None, "adapter_sha256": None,
                            "prompt_version": "p", "fingerprint": "f", "extracted_at": None})
    assert len(res.concepts) == len(set(tagged[0].spans)) and {c["grounding_method"] for c in res.concepts} == {
        "tagger"}
    assert all(CASE[c["start"]:c["end"]] == c["text"] for c in res.concepts)
    ids = {c["concept_id"] for c in res.concepts}
    assert all(r["head_concept_id"] in ids and r["tail_concept_id"] in ids for r in res.relations)


def test_an_evaluation_with_the_tagger_scores_the_adapter_alone_from_the_same_answers(engine_pool, shipped):
    """``evaluate_records`` with the task's heads: the scores of the combination, and of the generative answers
    alone from the same run."""
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
        adapter="", max_tokens=96, resamples=0, progress=False, heads=chosen.heads()))
    assert scores["throughput"]["prompts"] >= 1 and scores["cce"]["lenient"]["n_gold"] == 4
    assert scores["generative_alone"]["cce"]["lenient"]["n_gold"] == 4
    assert scores["cce"]["lenient"]["n_pred"] != scores["generative_alone"]["cce"]["lenient"]["n_pred"] or \
        scores["cce"]["lenient"]["f1"] != scores["generative_alone"]["cce"]["lenient"]["f1"]
