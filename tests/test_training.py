"""Training: a few-step LoRA run writes an adapter with a valid manifest and a finite loss; resume and the token
budget work; full fine-tuning runs one step. A tiny task (2 labels, short instruction) keeps each run to seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from notelake.conf.settings import ConfigError
from notelake.models.training import (TrainConfig, build_datasets, checkpoint_to_resume, encode_example,
                                      load_train_config, split_notes)
from notelake.udfs import answer, prompts

TASK_YAML = """\
description: Drugs and their effects in short sentences.
kind: cre
max_tokens: 64
max_chunk_chars: 120
concepts:
  Drug: a drug name
  Effect: an effect of the drug
relations:
  causes: {definition: drug causes effect, pairs: [[Drug, Effect]]}
"""

SENTENCES = [
    ("Lithium caused tremor.", "Lithium", "tremor"),
    ("Aspirin caused bleeding.", "Aspirin", "bleeding"),
    ("Heparin caused thrombocytopenia.", "Heparin", "thrombocytopenia"),
    ("Amiodarone caused hypothyroidism.", "Amiodarone", "hypothyroidism"),
    ("Metformin caused lactic acidosis.", "Metformin", "lactic acidosis"),
    ("Warfarin caused a hematoma.", "Warfarin", "hematoma"),
]


def _record(i: int, text: str, drug: str, effect: str) -> dict:
    d0, e0 = text.index(drug), text.index(effect)
    return {"note_id": f"s{i}", "corpus": "toy", "text": text,
            "concepts": [{"id": "T1", "label": "Drug", "spans": [[d0, d0 + len(drug)]], "text": drug},
                         {"id": "T2", "label": "Effect", "spans": [[e0, e0 + len(effect)]], "text": effect}],
            "relations": [{"id": "R1", "label": "causes", "head": "T1", "tail": "T2"}]}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    task_path = root / "toy_ade.yaml"
    task_path.write_text(TASK_YAML, encoding="utf-8")
    data = root / "data" / "toy_ade"
    data.mkdir(parents=True)
    long_text = " ".join(s for s, _, _ in SENTENCES)  # > max_chunk_chars: chunked into several examples
    recs = [_record(i, *s) for i, s in enumerate(SENTENCES)]
    long_rec = {"note_id": "long", "corpus": "toy", "text": long_text, "concepts": [], "relations": []}
    for i, (_, drug, effect) in enumerate(SENTENCES):
        d0, e0 = long_text.index(drug), long_text.index(effect)
        long_rec["concepts"] += [{"id": f"D{i}", "label": "Drug", "spans": [[d0, d0 + len(drug)]], "text": drug},
                                 {"id": f"E{i}", "label": "Effect", "spans": [[e0, e0 + len(effect)]], "text": effect}]
        long_rec["relations"].append({"id": f"R{i}", "label": "causes", "head": f"D{i}", "tail": f"E{i}"})
    with open(data / "train.jsonl", "w", encoding="utf-8") as fh:
        for r in recs + [long_rec]:
            fh.write(json.dumps(r) + "\n")
    return {"task": str(task_path), "data_dir": root / "data", "root": root}


def _cfg(toy, tmp_path, **kw) -> TrainConfig:
    base = dict(tasks=[toy["task"]], data_dir=toy["data_dir"], output_dir=tmp_path / "adapter",
                checkpoint_dir=tmp_path / "ckpt", steps=2, batch_size=1, grad_accum=1, max_length=512,
                lora_r=4, lora_alpha=8, validation_fraction=0.2, max_validation_examples=2, save_every=1,
                warmup_steps=0, threads=2, learning_rate=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(Exception):
        TrainConfig(tasks=["phee"], output_dir=tmp_path, bogus=1)
    with pytest.raises(Exception):
        TrainConfig(tasks=["phee"], output_dir=tmp_path, mode="qlora")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [phee]\noutput_dir: x\nsteps: 0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="steps"):
        load_train_config(bad)


def test_shipped_train_configs_validate():
    for path in sorted((Path(__file__).resolve().parents[1] / "conf" / "train").glob("*.yaml")):
        cfg = load_train_config(path)
        assert cfg.lora_r <= 16, f"{path.name}: the engine serves LoRA rank <= 16"


def test_split_is_seeded_nested_and_disjoint(toy, tmp_path):
    recs = [{"note_id": f"n{i:03d}"} for i in range(100)]
    small = split_notes(recs, _cfg(toy, tmp_path, data_fraction=0.1))
    big = split_notes(recs, _cfg(toy, tmp_path, data_fraction=0.5))
    assert small[1] == big[1]  # validation independent of the fraction
    assert [r["note_id"] for r in big[0][: len(small[0])]] == [r["note_id"] for r in small[0]]
    assert not {r["note_id"] for r in big[0]} & {r["note_id"] for r in big[1]}
    assert len(small[1]) == 20 and len(small[0]) == 8 and len(big[0]) == 40
    few = split_notes(recs, _cfg(toy, tmp_path, task_max_notes={"heldout": 5}), "heldout")
    assert [r["note_id"] for r in few[0]] == [r["note_id"] for r in big[0][:5]] and few[1] == big[1]
    assert len(split_notes(recs, _cfg(toy, tmp_path, task_max_notes={"heldout": 5}), "other")[0]) == 80


def test_loss_mask_covers_only_the_answer(base_model_path):
    from transformers import AutoTokenizer

    from notelake.conf.task import load_task

    tok = AutoTokenizer.from_pretrained(base_model_path)
    task = load_task("phee")
    answer_text = "ADE_trigger: caused | Drug: Lithium | Effect: tremor"
    ids, labels = encode_example(tok, task, "Lithium caused tremor.", answer_text)
    answer = [t for t in labels if t != -100]
    assert 0 < len(answer) < 30 and len(ids) < 60  # trained-task prompt: "Extract phee events." + the text
    assert labels[: len(ids) - len(answer)] == [-100] * (len(ids) - len(answer))
    assert answer_text in tok.decode(answer)


def test_chunked_examples_and_fingerprint(toy, tmp_path, base_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_path)
    cfg = _cfg(toy, tmp_path, validation_fraction=0.0)
    train, val, stats = build_datasets(cfg, tok)
    ids = [e.id for e in train]
    assert any(i.startswith("toy_ade:long#1") for i in ids), "long note chunked into several examples"
    assert not val and stats["toy_ade"].examples_train == len(train)


def test_label_perturbation_mixes_in_defined_label_sets(toy, tmp_path, base_model_path):
    from transformers import AutoTokenizer

    from notelake.models.training.config import LabelPerturbation

    tok = AutoTokenizer.from_pretrained(base_model_path)
    plain, _, _ = build_datasets(_cfg(toy, tmp_path, validation_fraction=0.0), tok)
    mixed, _, stats = build_datasets(_cfg(toy, tmp_path, validation_fraction=0.0, label_perturbation=LabelPerturbation(
        fraction=0.5, keep_prob=1.0, rename_prob=1.0, code_prob=1.0)), tok)
    perturbed = [e for e in mixed if e.id.endswith("~z")]
    assert 0 < len(perturbed) < len(mixed) and stats["toy_ade"].examples_perturbed == len(perturbed)
    by_id = {e.id: e for e in plain}
    for example in mixed:  # the other windows are exactly the unperturbed examples
        if example not in perturbed:
            assert example == by_id[example.id]
    rendered = tok.decode(perturbed[0].input_ids)
    assert "a drug name" in rendered and "an effect of the drug" in rendered  # definitions in the prompt
    answer = tok.decode([t for t in perturbed[0].labels if t != -100])
    assert "Drug:" not in answer and "Effect:" not in answer  # every label renamed to a neutral code

def test_lora_few_steps_writes_adapter_with_manifest(toy, tmp_path, base_model_path):
    from notelake.models.adapters import load_adapter
    from notelake.models.base_model import model_sha256
    from notelake.models.training import train

    cfg = _cfg(toy, tmp_path, token_budget=100_000)
    manifest = train(cfg)
    out = Path(cfg.output_dir)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    info = load_adapter(out, model_sha256(base_model_path), "toy_ade")
    assert info.rank == 4 and info.tasks == ["toy_ade"]
    t = manifest["training"]
    assert math.isfinite(t["final_train_loss"]) and t["final_train_loss"] > 0
    assert t["optimizer_steps"] == 2 and t["tokens_processed"] > 0 and t["peak_rss_mb"] > 0
    assert t["trainable_params"] < t["total_params"] / 10
    assert manifest["label_sets"] == {"toy_ade": ["Drug", "Effect"]}
    assert manifest["prompt_versions"]["toy_ade"].startswith(prompts.TEMPLATE_VERSION + "-")
    assert len(manifest["data_fingerprint"]) == 64 and manifest["answer_schema"] == answer.ANSWER_SCHEMA_VERSION

    # resume: the same config with more steps continues from the last checkpoint
    manifest2 = train(cfg.model_copy(update={"steps": 3}))
    assert manifest2["training"]["resumed_from"] == "checkpoint-2"
    assert manifest2["training"]["optimizer_steps"] == 3

    # a run cut off at a deadline: the adapter is written from a checkpoint
    from notelake.models.training import export_checkpoint

    exported = export_checkpoint(cfg.model_copy(update={"output_dir": tmp_path / "exported"}),
                                 Path(cfg.checkpoint_dir) / "checkpoint-2", note="test")
    assert exported["training"]["exported_from"] == "checkpoint-2"
    assert exported["training"]["optimizer_steps"] == 2 and exported["training"]["trainable_params"] > 0
    load_adapter(tmp_path / "exported", model_sha256(base_model_path), "toy_ade")

    # the same checkpoint folder for a different run (another mode) is refused before the model loads, naming why
    with pytest.raises(ConfigError, match=r"different run \(differs in: mode\)"):
        train(cfg.model_copy(update={"mode": "full", "steps": 4}))
    # --no-resume starts over there: the old run's checkpoints go, so no later resume picks them up
    assert checkpoint_to_resume(cfg.model_copy(update={"resume": False}), []) is None
    assert not list(Path(cfg.checkpoint_dir).glob("checkpoint-*"))


def test_token_budget_stops_the_run(toy, tmp_path, base_model_path):
    from notelake.models.training import train

    cfg = _cfg(toy, tmp_path, steps=50, token_budget=600, validation_fraction=0.0, resume=False)
    t = train(cfg)["training"]
    assert t["stopped_by"] == "token_budget"
    assert t["tokens_processed"] <= 600 and t["optimizer_steps"] < 50


def test_init_adapter_continues_a_trained_adapter(toy, tmp_path, base_model_path, tiny_adapter):
    """Few-shot adaptation: training starts from the given adapter's weights (its rank, not lora_r), and the
    result keeps the tasks that adapter knew."""
    from safetensors.torch import load_file

    from notelake.models.training import train

    cfg = _cfg(toy, tmp_path, init_adapter=tiny_adapter, steps=1, validation_fraction=0.0, learning_rate=1e-4)
    manifest = train(cfg)
    t = manifest["training"]
    assert t["init_adapter"]["name"] == "tiny-test" and t["optimizer_steps"] == 1
    assert manifest["tasks"] == ["phee", "toy_ade"] and set(manifest["label_sets"]) == {"phee", "toy_ade"}
    assert json.loads((Path(cfg.output_dir) / "adapter_config.json").read_text())["r"] == 8  # tiny's rank
    before, after = load_file(str(tiny_adapter / "adapter_model.safetensors")), \
        load_file(str(Path(cfg.output_dir) / "adapter_model.safetensors"))
    key = next(k for k in before if "lora_A" in k)
    delta = (after[key].float() - before[key].float()).abs().max().item()
    assert 0 < delta < 0.01  # one small step away from the initial adapter, not a fresh init

    with pytest.raises(ValueError, match="init_adapter needs mode: lora"):
        _cfg(toy, tmp_path, init_adapter=tiny_adapter, mode="full")


def test_full_finetuning_one_step(toy, tmp_path, base_model_path):
    from notelake.models.training import train

    cfg = _cfg(toy, tmp_path, mode="full", steps=1, validation_fraction=0.0, learning_rate=1e-5)
    manifest = train(cfg)
    t = manifest["training"]
    assert manifest["kind"] == "full" and t["optimizer_steps"] == 1 and math.isfinite(t["final_train_loss"])
    assert t["trainable_params"] == t["total_params"]
    assert (Path(cfg.output_dir) / "model.safetensors").is_file()


def test_train_cli_dry_run(toy, tmp_path, capsys):
    from notelake.jobs.train import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"tasks: [{toy['task']}]\ndata_dir: {toy['data_dir']}\noutput_dir: {tmp_path / 'o'}\n"
                   f"steps: 3\nbatch_size: 1\nmax_length: 512\n", encoding="utf-8")
    assert main(["--config", str(cfg), "--dry-run"]) == 0
    assert "estimated_tokens_for_steps" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [phee]\noutput_dir: o\nlora_rank: 8\n", encoding="utf-8")
    assert main(["--config", str(bad), "--dry-run"]) == 2
