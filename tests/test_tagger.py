"""The classification-head baseline (models/tagger.py): a few-step tagger run on a toy corpus writes a folder with
a manifest, loads for inference, and every predicted concept is cut from the text by the tokenizer's offsets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from notelake.models.training import TrainConfig

REPO = Path(__file__).resolve().parents[1]

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


@pytest.fixture(scope="module")
def toy_tagger(toy, tmp_path_factory, base_model_path):
    from notelake.models.tagger import train_tagger

    out = tmp_path_factory.mktemp("toy-tagger")
    return out / "tagger", train_tagger(_cfg(toy, out))


def test_lora_tagger_trains_and_predicts_grounded_concepts(toy_tagger):
    from notelake.models.tagger import Tagger

    folder, manifest = toy_tagger
    assert manifest["kind"] == "tagger-lora" and manifest["tag_window_chars"] == 2000
    assert manifest["label_sets"] == {"toy_tags": ["Drug", "Effect"]}
    losses = [loss for _, loss in manifest["training"]["loss_curve"]]
    assert len(losses) == 12 and losses[-1] < losses[0]
    model = Tagger(folder)
    texts = ["Propofol caused hypotension.", "Ibuprofen caused 𝛼-rash\x07 and ülcers.", SENTENCES[0][0]]
    predicted, counts = model.predict(texts)
    assert counts["windows"] == 3 and counts["tokens"] > 10
    for text, concepts in zip(texts, predicted):
        for c in concepts:
            assert c["label"] in {"Drug", "Effect"} and text[c["start"]:c["end"]] == c["text"] and c["text"].strip()
    assert {(c["label"], c["text"]) for c in predicted[2]} == {("Drug", "Lithium"), ("Effect", "tremor")}


def test_job_runs_the_tagger_backend(toy, toy_tagger, tmp_path, spark, settings):
    """engine.backend: tagger in the nightly job: same Delta rows, spans from the tokenizer's offsets."""
    from jobkit import offsets_exact, table, write_notes

    from notelake.jobs.extraction import job
    from notelake.jobs.extraction.report import ExitCode

    folder, _ = toy_tagger
    notes = [{"note_id": f"n{i}", "text": text, "patient_id": "p", "note_date": "2026-01-01", "note_type": "x"}
             for i, (text, _, _) in enumerate(SENTENCES[:3])]
    src = write_notes(tmp_path / "notes", notes)
    cfg = settings.with_overrides(engine={"backend": "tagger", "adapter": str(folder)},
                                  job={"task": str(toy / "toy_tags.yaml"), "max_error_rate": 0.0})
    assert job.run(cfg, src, str(tmp_path / "wh"), spark=spark) == ExitCode.OK
    run = table(tmp_path / "wh", "runs").to_pylist()[0]
    assert (run["status"], run["succeeded"], run["adapter"]) == ("succeeded", 3, "tagger")
    concepts = table(tmp_path / "wh", "concepts").to_pylist()
    texts = {n["note_id"]: n["text"] for n in notes}
    assert {(c["note_id"], c["label"], c["text"]) for c in concepts} >= {("n0", "Drug", "Lithium"),
                                                                         ("n0", "Effect", "tremor")}
    for c in concepts:
        assert c["grounded"] and c["grounding_method"] == "tagger" and offsets_exact(c, texts[c["note_id"]])
    wrong = settings.with_overrides(engine={"backend": "tagger", "adapter": str(folder)}, job={"task": "phee"})
    with pytest.raises(Exception, match="no zero-shot mode"):
        job.run(wrong, src, str(tmp_path / "wh2"), spark=spark)


def test_logged_loss_is_a_mean_whatever_the_accumulation(toy, tmp_path, base_model_path):
    """One step over the same 4 windows, as one batch of 4 or as 4 accumulated batches of 1: the logged loss is a
    mean either way (near ln 3 for a fresh O/B/I head). Trainer used to take the head's per-batch mean for a loss
    already divided over the accumulated batch, and logged (and stepped on) the sum: 4x here."""
    from notelake.models.tagger import train_tagger

    first_loss = {}
    for batch, accum in ((4, 1), (1, 4)):
        manifest = train_tagger(_cfg(toy, tmp_path / f"b{batch}", steps=1, batch_size=batch, grad_accum=accum,
                                     max_examples=4))
        first_loss[batch] = manifest["training"]["loss_curve"][0][1]
    assert 0.5 < first_loss[1] / first_loss[4] < 2, first_loss


def test_tagger_config_takes_one_task(toy, tmp_path):
    from notelake.conf.settings import ConfigError
    from notelake.models.tagger import train_tagger

    with pytest.raises(ConfigError, match="one task"):
        train_tagger(_cfg(toy, tmp_path, tasks=["phee", "maccrobat"]), dry_run=True)


def test_evaluate_cli_scores_a_tagger(toy, toy_tagger, tmp_path):
    """`jobs.evaluate --tagger`: the generative runs' scorer and report files; a task the tagger was not trained on
    is a configuration error (exit 2)."""
    from notelake.jobs import evaluate

    folder, _ = toy_tagger
    gold = toy / "data" / "toy_tags" / "train.jsonl"
    out = tmp_path / "eval"
    argv = ["--task", str(toy / "toy_tags.yaml"), "--gold", str(gold), "--tagger", str(folder), "--resamples", "50"]
    assert evaluate.main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    lenient = report["scores"]["cce"]["lenient"]
    assert report["engine"]["backend"] == "tagger" and lenient["n_gold"] == 2 * len(SENTENCES)
    assert lenient["f1"] > 0.5 and report["scores"]["grounding_rate"] == 1.0 and "cre" not in report["scores"]
    assert report["scores"]["throughput"]["notes"] == len(SENTENCES)
    assert "CCE lenient" in (out / "report.md").read_text(encoding="utf-8")
    assert evaluate.main(["--task", "phee", "--gold", str(gold), "--tagger", str(folder), "--out",
                          str(tmp_path / "wrong")]) == 2


def test_shipped_tagger_gate(base_model_path):
    """The shipped MACCROBAT tagger on the dev slice its manifest records: concept lenient F1 >= recorded - 2 x SE."""
    from notelake.models.evaluation import read_gold, select_slice
    from notelake.models.tagger import Tagger, evaluate_tagger
    from notelake.models.training import default_data_dir

    folder = REPO / "models" / "taggers" / "tagger-maccrobat"
    recorded = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["dev_scores"]["maccrobat"]
    gold = default_data_dir() / "maccrobat" / "dev.jsonl"
    if not gold.is_file():
        pytest.skip(f"gold data not present: {gold}")
    records = select_slice(read_gold(gold), recorded["slice"]["limit"], recorded["slice"]["seed"])
    assert sum(len(r["concepts"]) for r in records) == recorded["n_gold_concepts"]
    scores = evaluate_tagger(Tagger(folder), records, resamples=200)
    floor = recorded["cce_lenient_f1"] - 2 * recorded["cce_lenient_se"]
    assert scores["cce"]["lenient"]["f1"] >= floor, (scores["cce"]["lenient"]["f1"], floor)


# ------------------------------------------------------------------ the relation pair classifier (models/pairs.py)
PAIR_TASK_YAML = """\
description: Drugs and the effects they caused in short sentences.
kind: cre
max_tokens: 64
concepts:
  Drug: a drug name
  Effect: an effect
relations:
  caused: {definition: the drug caused the effect, pairs: [[Drug, Effect]]}
"""
# each sentence: a drug, the effect it caused, and an effect it did not cause
PAIR_SENTENCES = [("Lithium caused tremor, but the rash was old.", "Lithium", "tremor", "rash"),
                  ("Aspirin caused bleeding, but the cough was old.", "Aspirin", "bleeding", "cough"),
                  ("Heparin caused thrombocytopenia, but the fever was old.", "Heparin", "thrombocytopenia", "fever"),
                  ("Amiodarone caused hypothyroidism, but the pain was old.", "Amiodarone", "hypothyroidism", "pain"),
                  ("Metformin caused acidosis, but the edema was old.", "Metformin", "acidosis", "edema"),
                  ("Warfarin caused a hematoma, but the anemia was old.", "Warfarin", "hematoma", "anemia")]


@pytest.fixture(scope="module")
def toy_pairs(tmp_path_factory, base_model_path):
    from notelake.models.pairs import train_pairs

    root = tmp_path_factory.mktemp("pairs-toy")
    (root / "toy_pairs.yaml").write_text(PAIR_TASK_YAML, encoding="utf-8")
    (root / "data" / "toy_pairs").mkdir(parents=True)
    with open(root / "data" / "toy_pairs" / "train.jsonl", "w", encoding="utf-8") as fh:
        for i, (text, drug, caused, other) in enumerate(PAIR_SENTENCES):
            spans = {word: [[text.index(word), text.index(word) + len(word)]] for word in (drug, caused, other)}
            fh.write(json.dumps({"note_id": f"s{i}", "text": text, "concepts": [
                {"id": "T1", "label": "Drug", "spans": spans[drug], "text": drug},
                {"id": "T2", "label": "Effect", "spans": spans[caused], "text": caused},
                {"id": "T3", "label": "Effect", "spans": spans[other], "text": other}],
                "relations": [{"id": "R1", "label": "caused", "head": "T1", "tail": "T2"}]}) + "\n")
    cfg = TrainConfig(objective="pair", tasks=[str(root / "toy_pairs.yaml")], data_dir=root / "data",
                      output_dir=root / "pairs", checkpoint_dir=root / "ckpt", steps=16, batch_size=2, grad_accum=1,
                      lora_r=4, lora_alpha=8, validation_fraction=0.0, save_every=50, warmup_steps=0, threads=2,
                      learning_rate=5e-3, class_weighting="balanced")
    return root, train_pairs(cfg)


def test_pair_classifier_trains_and_decides_the_candidate_pairs(toy_pairs):
    """One example per head: the Drug with its two candidate Effects (one caused, one not); after training, each
    relation it predicts joins two of the given concepts in an allowed direction, and it learns the toy rule."""
    from notelake.models.pairs import PairClassifier, gold_concepts

    root, manifest = toy_pairs
    assert manifest["kind"] == "pairs-lora" and manifest["label_sets"] == {"toy_pairs": ["caused"]}
    plan = manifest["training"]["data"]
    assert (plan["examples_train"], plan["pairs_train"], plan["positive_train"]) == (6, 12, 6)
    assert plan["not_candidates_train"] == 0 and plan["gold_relations_train"] == 6
    assert plan["class_weights"] == [1.0, 1.0]  # balanced weighting on 6 "no" and 6 "yes" pairs
    losses = [loss for _, loss in manifest["training"]["loss_curve"]]
    assert len(losses) == 16 and losses[-1] < losses[0] / 2
    model = PairClassifier(root / "pairs")
    records = [json.loads(line) for line in (root / "data" / "toy_pairs" / "train.jsonl").read_text().splitlines()]
    concepts = [gold_concepts(model.task, r) for r in records]
    predicted, counts = model.predict([r["text"] for r in records], concepts)
    assert counts["passes"] == len(records)  # one forward pass per head (each sentence's one Drug)
    for found, related in zip(concepts, predicted):
        for rel in related:
            assert rel["label"] == "caused" and rel["head"] in found and rel["tail"] in found
            assert (rel["head"]["label"], rel["tail"]["label"]) == ("Drug", "Effect")
    got = {(r["head"]["text"], r["tail"]["text"]) for related in predicted for r in related}
    assert got == {(drug, caused) for _, drug, caused, _ in PAIR_SENTENCES}


@pytest.fixture(scope="module")
def toy_pair_tagger(toy, toy_pairs, tmp_path_factory):
    """A tagger of the pair classifier's toy task (Drug, Effect)."""
    from notelake.models.tagger import train_tagger

    root, _ = toy_pairs
    out = tmp_path_factory.mktemp("pair-tagger")
    train_tagger(TrainConfig(**{**_cfg(toy, out).model_dump(), "tasks": [str(root / "toy_pairs.yaml")],
                                "data_dir": root / "data", "output_dir": out / "tagger", "steps": 16}))
    return out / "tagger"


def test_job_writes_tagger_concepts_and_pair_relations(toy_pairs, toy_pair_tagger, tmp_path, spark, settings):
    """engine.backend tagger + engine.pairs in the nightly job: relation rows between the tagger's concept rows;
    the pair classifier is part of the extraction fingerprint; engine.pairs without the tagger backend is refused."""
    from jobkit import table, write_notes

    from notelake.conf.settings import Settings
    from notelake.conf.task import load_task
    from notelake.jobs.extraction import job
    from notelake.jobs.extraction.identity import describe_extraction
    from notelake.jobs.extraction.report import ExitCode

    root, _ = toy_pairs
    notes = [{"note_id": f"n{i}", "text": text, "patient_id": "p", "note_date": "2026-01-01", "note_type": "x"}
             for i, (text, *_) in enumerate(PAIR_SENTENCES[:3])]
    src = write_notes(tmp_path / "notes", notes)
    task = str(root / "toy_pairs.yaml")
    tagger_only = settings.with_overrides(engine={"backend": "tagger", "adapter": str(toy_pair_tagger)},
                                          job={"task": task, "max_error_rate": 0.0})
    cfg = tagger_only.with_overrides(engine={"pairs": str(root / "pairs")})
    assert job.run(cfg, src, str(tmp_path / "wh"), spark=spark) == ExitCode.OK
    concepts = {c["concept_id"]: c for c in table(tmp_path / "wh", "concepts").to_pylist()}
    relations = table(tmp_path / "wh", "relations").to_pylist()
    assert relations and all(r["label"] == "caused" for r in relations)
    for r in relations:
        head, tail = concepts[r["head_concept_id"]], concepts[r["tail_concept_id"]]
        assert (head["label"], tail["label"]) == ("Drug", "Effect") == (r["head_label"], r["tail_label"])
        assert head["note_id"] == tail["note_id"] == r["note_id"] and (head["text"], tail["text"]) == (
            r["head_text"], r["tail_text"])
    found = {(r["note_id"], r["head_text"], r["tail_text"]) for r in relations}
    assert found == {(f"n{i}", drug, caused) for i, (_, drug, caused, _) in enumerate(PAIR_SENTENCES[:3])}
    assert describe_extraction(cfg, load_task(task)).fingerprint != \
        describe_extraction(tagger_only, load_task(task)).fingerprint
    with pytest.raises(ValueError, match="engine.backend must be tagger"):
        Settings.model_validate({**settings.model_dump(), "engine": {**settings.engine.model_dump(),
                                                                     "pairs": str(root / "pairs")}})


def test_evaluate_cli_scores_tagger_and_pairs_end_to_end(toy, toy_tagger, toy_pairs, toy_pair_tagger, tmp_path):
    """`jobs.evaluate --tagger T --pairs P`: relations over the tagger's predicted concepts, scored end to end by the
    generative runs' scorer; a tagger of another task is a configuration error (exit 2), --pairs without --tagger a
    usage error."""
    from notelake.jobs import evaluate

    root, _ = toy_pairs
    task, gold = root / "toy_pairs.yaml", root / "data" / "toy_pairs" / "train.jsonl"
    out = tmp_path / "eval"
    argv = ["--task", str(task), "--gold", str(gold), "--tagger", str(toy_pair_tagger), "--pairs",
            str(root / "pairs"), "--resamples", "50"]
    assert evaluate.main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    scores = report["scores"]
    assert scores["cce"]["lenient"]["n_gold"] == 3 * len(PAIR_SENTENCES)
    assert scores["cre"]["lenient"]["n_gold"] == report["slice"]["n_gold_relations"] == len(PAIR_SENTENCES)
    assert scores["cre"]["lenient"]["f1"] > 0.5 and report["pairs"]["kind"] == "pairs-lora"
    assert scores["throughput"]["prompts"] > len(PAIR_SENTENCES)  # tagger windows + pair passes
    folder, _ = toy_tagger  # trained on toy_tags: not the pair classifier's task
    assert evaluate.main([*argv[:4], "--tagger", str(folder), "--pairs", str(root / "pairs"),
                          "--out", str(tmp_path / "wrong-task")]) == 2
    assert evaluate.main([*argv[:4], "--pairs", str(root / "pairs"), "--out", str(tmp_path / "no-tagger")]) == 2


def test_allowed_pairs_floor_predicts_every_pair_the_schema_allows(tmp_path):
    """`--pairs allowed`: every candidate pair in a window with every relation its label pair allows: here each
    sentence's Drug -> both Effects (the caused one and the other), never Effect -> Drug or Drug -> Drug."""
    from notelake.conf.task import load_task
    from notelake.models.pairs import AllowedPairs

    (tmp_path / "toy_pairs.yaml").write_text(PAIR_TASK_YAML, encoding="utf-8")
    task = load_task(str(tmp_path / "toy_pairs.yaml"))
    texts, concepts = [], []
    for text, *words in PAIR_SENTENCES[:2]:
        texts.append(text)
        concepts.append([{"label": label, "start": text.index(w), "end": text.index(w) + len(w), "text": w}
                         for label, w in zip(("Drug", "Effect", "Effect"), words)])
    predicted, counts = AllowedPairs(task, window_chars=2000).predict(texts, concepts)
    assert counts["passes"] == 0
    got = [{(r["label"], r["head"]["text"], r["tail"]["text"]) for r in related} for related in predicted]
    assert got == [{("caused", drug, caused), ("caused", drug, other)} for _, drug, caused, other in PAIR_SENTENCES[:2]]


def test_pair_classifier_keeps_the_candidate_limits_it_was_trained_with(toy_pairs, toy_pair_tagger, tmp_path):
    """On a task whose relation holds between any labels (MACCROBAT's case), pair_seen_min_count keeps the label
    pairs seen in training (Drug -> Effect) and pair_max_gap_chars drops the far Effect and shortens each pass; both
    land in the manifest and limit the classifier and its floor (`--pairs allowed:FOLDER`) at inference."""
    from notelake.conf.settings import ConfigError
    from notelake.jobs import evaluate
    from notelake.models.pairs import AllowedPairs, PairClassifier, gold_concepts, train_pairs

    root, _ = toy_pairs
    task = tmp_path / "toy_pairs.yaml"  # same task name, relation open to any label pair
    task.write_text(PAIR_TASK_YAML.replace(", pairs: [[Drug, Effect]]", ""), encoding="utf-8")
    cfg = dict(objective="pair", tasks=[str(task)], data_dir=root / "data", output_dir=tmp_path / "pairs",
               checkpoint_dir=tmp_path / "ckpt", steps=2, batch_size=2, lora_r=4, lora_alpha=8,
               validation_fraction=0.0, save_every=50, warmup_steps=0, threads=2)
    plans = [train_pairs(TrainConfig(**cfg, **limits), dry_run=True)["plan"] for limits in (
        {}, {"pair_seen_min_count": 1}, {"pair_seen_min_count": 1, "pair_max_gap_chars": 20})]
    n = len(PAIR_SENTENCES)
    assert [p["pairs_train"] for p in plans] == [6 * n, 2 * n, n]  # any pair; Drug -> both Effects; the near one
    assert [p["positive_train"] for p in plans] == [n, n, n] and plans[2]["not_candidates_train"] == 0
    assert plans[1]["seen_label_pairs"] == 1 and plans[2]["tokens_train"] < plans[1]["tokens_train"]

    manifest = train_pairs(TrainConfig(**cfg, pair_seen_min_count=1, pair_max_gap_chars=20))
    assert manifest["pair_max_gap_chars"] == 20
    model = PairClassifier(tmp_path / "pairs")
    assert model.max_gap == 20 and model.task.relations["caused"].pairs == [("Drug", "Effect")]
    records = [json.loads(line) for line in (root / "data" / "toy_pairs" / "train.jsonl").read_text().splitlines()]
    texts, concepts = [r["text"] for r in records], [gold_concepts(model.task, r) for r in records]
    predicted, counts = model.predict(texts, concepts)
    assert counts["passes"] == n and all(
        (r["head"]["label"], r["tail"]["label"]) == ("Drug", "Effect") for related in predicted for r in related)
    floor, _ = AllowedPairs.like(tmp_path / "pairs").predict(texts, concepts)
    with pytest.raises(ConfigError, match="not a pairs folder"):
        AllowedPairs.like(toy_pair_tagger)
    assert [{(r["head"]["text"], r["tail"]["text"]) for r in related} for related in floor] == [
        {(drug, caused)} for _, drug, caused, _ in PAIR_SENTENCES]
    out = tmp_path / "eval"
    assert evaluate.main(["--task", str(task), "--gold", str(root / "data" / "toy_pairs" / "train.jsonl"),
                          "--tagger", str(toy_pair_tagger), "--pairs", f"allowed:{tmp_path / 'pairs'}",
                          "--resamples", "20", "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["pairs"]["name"] == "allowed-pairs-like-pairs"
    with pytest.raises(ValueError, match="pair_max_gap_chars is for the pair classifier"):
        TrainConfig(**{**cfg, "objective": "tag"}, pair_max_gap_chars=20)


def test_balanced_class_weights_make_a_rare_class_count_as_much_as_a_common_one():
    """The pair classifier's PHEE codes are ~95 % "yes": balanced weights lift "no" so that both classes carry the
    same total loss, and the weighted loss of a confident "yes" on a "no" pair grows by that weight."""
    import torch

    from notelake.models.tagger import balanced_class_weights, layered_loss
    from notelake.models.training import Example

    ignore = -100
    examples = [Example("t:a#0", "t", [1, 2, 3], [[1], [ignore], [1]]),
                Example("t:b#0", "t", [1, 2, 3, 4], [[1], [1], [0], [ignore]])]  # 4 yes, 1 no, 2 ignored
    weights = balanced_class_weights(examples, 2)
    assert weights == [2.5, 0.625]
    assert weights[0] * 1 == weights[1] * 4
    assert balanced_class_weights(examples[:1], 2) == [0.0, 0.5]  # a class never seen gets no weight

    # a confident "yes" on a "no" pair and on a "yes" pair: the weighted mean lifts the miss on the rare class
    logits = torch.tensor([[[-4.0, 4.0], [-4.0, 4.0]]])
    codes = torch.tensor([[[0], [1]]])
    per_token = torch.nn.functional.cross_entropy(logits[0], codes[0, :, 0], reduction="none")
    assert layered_loss(logits, codes).item() == pytest.approx(per_token.mean().item())
    expected = (2.5 * per_token[0] + 0.625 * per_token[1]) / (2.5 + 0.625)
    weighted = layered_loss(logits, codes, weight=torch.tensor(weights))
    assert weighted.item() == pytest.approx(expected.item()) and weighted > 1.5 * per_token.mean()


def test_pair_classifier_trains_on_a_taggers_concepts_too(toy_pairs, toy_pair_tagger, tmp_path):
    """pair_candidates_tagger: the tagger's concepts on the training notes join the gold ones as candidates; the
    data plan counts them (as the pure join counts the same predictions) and names the tagger; the pairs grow by
    the joined concepts' pairs. A tagger of another task, or the field on a tagger run, is refused."""
    from notelake.conf.settings import ConfigError
    from notelake.models.pairs import gold_concepts, train_pairs
    from notelake.models.tagger import Tagger
    from notelake.udfs.pairs import with_predicted

    root, gold_only = toy_pairs
    cfg = TrainConfig(objective="pair", tasks=[str(root / "toy_pairs.yaml")], data_dir=root / "data",
                      output_dir=tmp_path / "pairs", checkpoint_dir=tmp_path / "ckpt", steps=2, batch_size=2,
                      lora_r=4, lora_alpha=8, validation_fraction=0.0, save_every=50, warmup_steps=0, threads=2,
                      pair_candidates_tagger=toy_pair_tagger)
    plan = train_pairs(cfg, dry_run=True)["plan"]
    tagger = Tagger(toy_pair_tagger)
    records = [json.loads(line) for line in (root / "data" / "toy_pairs" / "train.jsonl").read_text().splitlines()]
    predicted, _ = tagger.predict([r["text"] for r in records])
    expected = {"predicted": 0, "exact": 0, "stand_in": 0, "false": 0}
    for record, found in zip(records, predicted):
        for key, n in with_predicted(gold_concepts(tagger.task, record), found)[1].items():
            expected[key] += n
    assert {k: plan[f"{k}_concepts_train"] for k in expected} == expected and expected["predicted"] > 0
    assert plan["candidates_tagger"] == tagger.manifest["name"] and plan["candidates_tagger_sha256"]
    gold_plan = gold_only["training"]["data"]
    assert plan["gold_relations_train"] == gold_plan["gold_relations_train"]
    assert plan["pairs_train"] >= gold_plan["pairs_train"] and plan["positive_train"] >= gold_plan["positive_train"]
    manifest = train_pairs(cfg)
    assert manifest["training"]["data"]["candidates_tagger_sha256"] == plan["candidates_tagger_sha256"]
    other_task = TrainConfig(**{**cfg.model_dump(), "pair_candidates_tagger": toy_pair_tagger,
                                "tasks": ["phee"], "output_dir": tmp_path / "other"})
    with pytest.raises(ConfigError, match="tags task"):
        train_pairs(other_task, dry_run=True)
    with pytest.raises(ValueError, match="pair_candidates_tagger"):
        TrainConfig(tasks=["phee"], objective="tag", output_dir=tmp_path / "t", pair_candidates_tagger=toy_pair_tagger)


def test_class_weighting_is_for_classification_heads(tmp_path):
    with pytest.raises(ValueError, match="class_weighting"):
        TrainConfig(tasks=["phee"], output_dir=tmp_path / "a", class_weighting="balanced")
    assert TrainConfig(tasks=["phee"], objective="pair", output_dir=tmp_path / "b",
                       class_weighting="balanced").class_weighting == "balanced"
