"""The classification-head baseline (models/tagger.py): a few-step tagger run on a toy corpus writes a folder with
a manifest, loads for inference, and every predicted concept is cut from the text by the tokenizer's offsets."""

from __future__ import annotations

import json

import pytest

from notelake.models.training import TrainConfig

TASK_YAML = """\
description: Drugs and their effects in short sentences.
kind: cce
max_tokens: 64
concepts:
  Drug: a drug name
  Effect: an effect of the drug
"""
SENTENCES = [("Lithium caused tremor.", "Lithium", "tremor"), ("Aspirin caused bleeding.", "Aspirin", "bleeding"),
             ("Heparin caused thrombocytopenia.", "Heparin", "thrombocytopenia"),
             ("Amiodarone caused hypothyroidism.", "Amiodarone", "hypothyroidism"),
             ("Metformin caused lactic acidosis.", "Metformin", "lactic acidosis"),
             ("Warfarin caused a hematoma.", "Warfarin", "hematoma")]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("tagger-toy")
    (root / "toy_tags.yaml").write_text(TASK_YAML, encoding="utf-8")
    (root / "data" / "toy_tags").mkdir(parents=True)
    with open(root / "data" / "toy_tags" / "train.jsonl", "w", encoding="utf-8") as fh:
        for i, (text, drug, effect) in enumerate(SENTENCES):
            d, e = text.index(drug), text.index(effect)
            fh.write(json.dumps({"note_id": f"s{i}", "text": text, "concepts": [
                {"id": "T1", "label": "Drug", "spans": [[d, d + len(drug)]], "text": drug},
                {"id": "T2", "label": "Effect", "spans": [[e, e + len(effect)]], "text": effect}]}) + "\n")
    return root


def _cfg(toy, tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(
        objective="tag", tasks=[str(toy / "toy_tags.yaml")], data_dir=toy / "data", output_dir=tmp_path / "tagger",
        checkpoint_dir=tmp_path / "ckpt", steps=12, batch_size=2, grad_accum=1, lora_r=4, lora_alpha=8,
        validation_fraction=0.0, save_every=50, warmup_steps=0, threads=2, learning_rate=5e-3), **kw})


def test_lora_tagger_trains_and_predicts_grounded_concepts(toy, tmp_path, base_model_path):
    from notelake.models import tagger as tagger_mod

    manifest = tagger_mod.train_tagger(_cfg(toy, tmp_path))
    assert manifest["kind"] == "tagger-lora" and manifest["tag_window_chars"] == 2000
    assert manifest["label_sets"] == {"toy_tags": ["Drug", "Effect"]}
    losses = [loss for _, loss in manifest["training"]["loss_curve"]]
    assert len(losses) == 12 and losses[-1] < losses[0]
    model = tagger_mod.Tagger(tmp_path / "tagger")
    texts = ["Propofol caused hypotension.", "Ibuprofen caused 𝛼-rash\x07 and ülcers.", SENTENCES[0][0]]
    predicted, counts = model.predict(texts)
    assert counts["windows"] == 3 and counts["tokens"] > 10
    for text, concepts in zip(texts, predicted):
        for c in concepts:
            assert c["label"] in {"Drug", "Effect"} and text[c["start"]:c["end"]] == c["text"] and c["text"].strip()
    assert {(c["label"], c["text"]) for c in predicted[2]} == {("Drug", "Lithium"), ("Effect", "tremor")}


def test_tagger_config_takes_one_task(toy, tmp_path):
    from notelake.conf.settings import ConfigError
    from notelake.models.tagger import train_tagger

    with pytest.raises(ConfigError, match="one task"):
        train_tagger(_cfg(toy, tmp_path, tasks=["phee", "maccrobat"]), dry_run=True)
