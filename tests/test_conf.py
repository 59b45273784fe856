"""Configuration: shipped YAMLs load; each kind of bad YAML gives a message naming the problem."""

from __future__ import annotations

import pytest

from notelake.conf import CONF_DIR, ConfigError, Settings, load_settings
from notelake.conf.task import load_task, shipped_tasks
from notelake.udfs.answer import answer_grammar
from notelake.udfs.prompts import build_messages, prompt_version


@pytest.mark.parametrize("name", ["local", "gpu", "cluster"])
def test_shipped_environments_load(name):
    settings = load_settings(CONF_DIR / f"{name}.yaml")
    assert isinstance(settings, Settings) and settings.environment == name


def test_local_is_the_embedded_default():
    s = load_settings()
    assert (s.engine.backend, s.engine.dtype, s.ray.address, s.engine.guided_decoding) == \
        ("vllm", "float32", None, "grounded")


@pytest.mark.parametrize("body, expected", [
    ("engine:\n  dtype: float64\n", r"engine\.dtype: Input should be 'float32'"),
    ("engine:\n  max_num_seqs: 0\n", r"engine\.max_num_seqs: Input should be greater than or equal to 1"),
    ("engine:\n  gpu_memory_utilisation: 0.3\n", r"engine\.gpu_memory_utilisation: Extra inputs are not permitted"),
    ("ray:\n  num_actors: many\n", r"ray\.num_actors: Input should be a valid integer"),
    ("engine:\n  guided_decoding: json\n", r"engine\.guided_decoding: Input should be 'grounded', 'labels' or 'off'"),
    ("- just\n- a list\n", r"top level must be a mapping"),
    ("engine: [unclosed\n", r"is not valid YAML"),
    ("engine:\n  adapter: x\n  enable_lora: false\n", r"engine.adapter is set but engine.enable_lora is false"),
    ("ray:\n  address: ray://head:10001\n", r"ray\.address: Value error, Ray Client addresses \(ray://\)"),
    ("job:\n  task: phee,,maccrobat\n", r"job\.task: Value error, empty task name"),
    ("job:\n  task: phee, phee\n", r"job\.task: Value error, task named twice"),
])
def test_bad_yaml_names_the_field(tmp_path, body, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=expected):
        load_settings(path)


def test_several_tasks_are_one_comma_separated_setting():
    assert load_settings().with_overrides(job={"task": " phee , maccrobat"}).job.tasks == ["phee", "maccrobat"]
    assert load_settings().job.tasks == ["phee"]


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")


def test_overrides_are_validated():
    with pytest.raises(Exception, match="max_error_rate"):
        load_settings().with_overrides(job={"max_error_rate": 2})


def test_shipped_tasks_build_prompts_and_grammars():
    assert {"phee", "maccrobat", "clinical"} <= set(shipped_tasks())
    for name in shipped_tasks():
        task = load_task(name)
        grammar = answer_grammar(task, "Aspirin caused a rash.")
        assert all(f'"{label}"' in grammar for label in task.concepts)
        assert '"Aspirin"' in grammar and '"rash"' in grammar  # the text's own words (tests/test_udfs_answer.py)
        messages = build_messages(task, "Aspirin caused a rash.")
        assert messages[-1]["content"].endswith("Aspirin caused a rash.")
        assert prompt_version(task).startswith("t3-")


def test_trained_tasks_get_short_prompts_zero_shot_tasks_definitions():
    phee, clinical = load_task("phee"), load_task("clinical")
    system, user = build_messages(phee, "Aspirin caused a rash.")
    assert system["content"] == "Extract phee events." and user["content"] == "Aspirin caused a rash."
    zero_shot = build_messages(clinical, "Aspirin caused a rash.")[-1]["content"]
    assert all(definition in zero_shot for definition in clinical.concepts.values())
    assert "treats" in zero_shot and "| RELATION: tail mention" in zero_shot


@pytest.mark.parametrize("events, expected", [
    ("events: {anchors: [nope]}\n", "not a concept label"),
    ("events: {anchors: [trig], derived: [{relation: nope, head: drug, tail: effect}]}\n", "not a relation label"),
])
def test_event_specs_are_validated(tmp_path, events, expected):
    path = tmp_path / "ev.yaml"
    path.write_text("description: x\nkind: cre\nconcepts: {trig: t, drug: d, effect: e}\n"
                    "relations:\n  drug: {definition: d, pairs: [[trig, drug]]}\n" + events)
    with pytest.raises(ConfigError, match=expected):
        load_task(path)


def test_new_label_set_is_a_yaml_file_only(tmp_path):
    path = tmp_path / "radiology.yaml"
    path.write_text(
        "description: Findings in radiology reports.\nkind: cre\n"
        "concepts:\n  finding: an imaging finding\n  location: an anatomical location\n"
        "relations:\n  located_in: {definition: finding is located in location, pairs: [[finding, location]]}\n")
    task = load_task(path)
    assert task.name == "radiology" and task.allows("located_in", "finding", "location")
    assert not task.allows("located_in", "location", "finding")


@pytest.mark.parametrize("body, expected", [
    ("description: x\nkind: cre\nconcepts: {a: b}\n", "kind 'cre' needs at least one relation label"),
    ("description: x\nkind: cce\nconcepts: {a: b}\nrelations: {r: {definition: d}}\n", "kind 'cce' takes no relations"),
    ("description: x\nkind: cre\nconcepts: {a: b}\nrelations: {r: {definition: d, pairs: [[a, zz]]}}\n",
     "unknown concept label 'zz'"),
    ("description: x\nkind: ner\nconcepts: {a: b}\n", r"kind: Input should be 'cce' or 'cre'"),
    ("name: other\ndescription: x\nkind: cce\nconcepts: {a: b}\n", "must equal the file stem"),
])
def test_bad_task_yaml(tmp_path, body, expected):
    path = tmp_path / "mytask.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=expected):
        load_task(path)


def test_unknown_task_lists_shipped_ones():
    with pytest.raises(ConfigError, match="shipped tasks: .*phee"):
        load_task("no_such_task")


def test_storage_options_are_secrets_never_dumped(tmp_path):
    path = tmp_path / "s3.yaml"
    path.write_text("storage:\n  options:\n    AWS_SECRET_ACCESS_KEY: hunter2\n    AWS_REGION: eu-west-1\n")
    settings = load_settings(path)
    assert settings.storage.revealed_options() == {"AWS_SECRET_ACCESS_KEY": "hunter2", "AWS_REGION": "eu-west-1"}
    assert "hunter2" not in settings.model_dump_json() and "hunter2" not in repr(settings)
