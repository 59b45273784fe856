"""The link stage (jobs/linking/) on real Spark and Delta tables: matching order and incremental behaviour.

A small vocabulary is written in Athena format and loaded with the real loader; concepts tables are written with
the real concepts schema (udfs/schemas.py) to a temporary warehouse.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from notelake.conf.task import load_task
from notelake.jobs import linking, vocab
from notelake.jobs.warehouse import open_warehouse, read_delta_arrow
from notelake.udfs import schemas
from notelake.udfs.hashing import concept_id, note_bucket

BUCKETS = 4
DEMO = Path(__file__).resolve().parents[1] / "data" / "vocab" / "demo"
TASK_YAML = """\
description: Test task for the concept linker.
kind: cce
concepts:
  Drug: a drug
  Effect: an effect
  Trigger: a trigger word
normalization:
  Drug: {domains: [Drug], vocabularies: [TestVocab], concept_classes: [Ingredient]}
  Effect: {domains: [Condition], vocabularies: [TestVocab, Other]}
"""
S, D = "20200101", "20991231"
CONCEPTS = [  # id, name, domain, vocabulary, class, standard, invalid_reason
    (1, "Warfarin", "Drug", "TestVocab", "Ingredient", "S", ""),
    (2, "Coumadin", "Drug", "TestVocab", "Brand Name", "", ""),
    (3, "Gastrointestinal haemorrhage", "Condition", "TestVocab", "Disorder", "S", ""),
    (4, "Zombie disease", "Condition", "TestVocab", "Disorder", "S", "D"),  # deprecated
    (5, "Cardiomyopathy type A", "Condition", "TestVocab", "Disorder", "S", ""),
    (6, "Cardiomyopathy type B", "Condition", "TestVocab", "Disorder", "S", ""),
    (7, "Cold", "Condition", "TestVocab", "Disorder", "S", ""),
    (8, "Cold", "Condition", "Other", "Disorder", "S", ""),  # same name, later vocabulary of the label
    (9, "Chill", "Condition", "TestVocab", "Finding", "S", ""),
    (10, "Shivering", "Condition", "TestVocab", "Finding", "S", ""),
    (11, "Oral tablet", "Drug", "TestVocab", "Dose Form", "S", ""),  # not an ingredient
    (12, "Old bleed term", "Condition", "TestVocab", "Disorder", "", "D"),  # its Maps to is deprecated too
    (13, "Hepatotoxicity", "Condition", "TestVocab", "AE term", "", "U"),  # upgraded source, valid Maps to
    (14, "Toxic liver disease", "Condition", "TestVocab", "Disorder", "S", ""),
]
SYNONYMS = [(3, "GI bleed"), (9, "Rigor"), (10, "Rigor")]  # "rigor" names two concepts equally
MAPS = [(2, 1, ""), (12, 3, "D"), (13, 14, "")]
MENTIONS = [  # note, label, text, expected (omop, source, match_type)
    ("N1", "Drug", "Warfarin", (1, 1, "exact")),
    ("N1", "Effect", "GI-bleed", (3, 3, "exact")),  # a synonym, punctuation folded
    ("N1", "Drug", "coumadin", (1, 2, "maps_to")),  # the non-standard id kept as source
    ("N2", "Effect", "gastrointestinal hemorrhage", (3, 3, "fuzzy")),
    ("N2", "Effect", "cardiomyopathy type", (0, 0, "ambiguous")),  # fuzzy: no margin over the runner-up
    ("N2", "Effect", "zombie disease", (0, 0, "none")),  # a deprecated concept is never returned
    ("N3", "Effect", "liver failure", (0, 0, "none")),  # fuzzy: score too low
    ("N3", "Effect", "COLD", (7, 7, "exact")),  # the label's first vocabulary wins the tie
    ("N3", "Effect", "rigor", (0, 0, "ambiguous")),  # a synonym of two concepts
    ("N3", "Drug", "oral tablet", (0, 0, "none")),  # outside the label's concept classes
    ("N4", "Effect", "old bleed term", (0, 0, "none")),  # deprecated Maps to is not followed
    ("N4", "Effect", "Hepatotoxicity", (14, 13, "maps_to")),
    ("N4", "Trigger", "developed", (0, 0, "unmapped_label")),
]


def write_athena(folder: Path, release: str = "v1") -> Path:
    folder.mkdir(parents=True, exist_ok=True)

    def tsv(name: str, header: str, rows) -> None:
        lines = [header] + ["\t".join(str(v) for v in row) for row in rows]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")

    tsv("CONCEPT.csv", "concept_id\tconcept_name\tdomain_id\tvocabulary_id\tconcept_class_id\tstandard_concept\t"
        "concept_code\tvalid_start_date\tvalid_end_date\tinvalid_reason",
        [(c[0], c[1], c[2], c[3], c[4], c[5], f"C{c[0]}", S, "20240101" if c[6] else D, c[6]) for c in CONCEPTS])
    tsv("CONCEPT_SYNONYM.csv", "concept_id\tconcept_synonym_name\tlanguage_concept_id",
        [(cid, name, 4180186) for cid, name in SYNONYMS])
    tsv("CONCEPT_RELATIONSHIP.csv", "concept_id_1\tconcept_id_2\trelationship_id\tvalid_start_date\tvalid_end_date\t"
        "invalid_reason", [(a, b, "Maps to", S, D, inv) for a, b, inv in MAPS])
    tsv("CONCEPT_ANCESTOR.csv", "ancestor_concept_id\tdescendant_concept_id\tmin_levels_of_separation\t"
        "max_levels_of_separation", [(c[0], c[0], 0, 0) for c in CONCEPTS if c[5] == "S" and not c[6]])
    tsv("VOCABULARY.csv", "vocabulary_id\tvocabulary_name\tvocabulary_reference\tvocabulary_version\t"
        "vocabulary_concept_id", [("None", "OMOP Standardized Vocabularies", "test", f"release {release}", 100),
                                  ("TestVocab", "Test vocabulary", "test", release, 101),
                                  ("Other", "Other vocabulary", "test", "", 102)])
    return folder


def concept_rows(mentions, task: str = "linktest") -> list[dict]:
    now = datetime.now(timezone.utc)
    rows = []
    for i, (note, label, text, *_) in enumerate(mentions):
        rows.append({
            "note_id": note, "concept_id": concept_id(note, task, label, 0, len(text), text, i), "task": task,
            "note_bucket": note_bucket(note, BUCKETS), "label": label, "text": text, "start": 0, "end": len(text),
            "spans": None, "assertion": "present", "grounded": True, "grounding_method": "exact",
            "grounding_score": 1.0, "chunk_index": 0, "run_id": "r1", "model": "m", "adapter": None,
            "adapter_sha256": None, "prompt_version": "p", "fingerprint": "f", "text_sha256": "t",
            "extracted_at": now})
    return rows


@pytest.fixture
def env(tmp_path, settings):
    task_path = tmp_path / "linktest.yaml"
    task_path.write_text(TASK_YAML, encoding="utf-8")
    out = tmp_path / "warehouse"
    warehouse = open_warehouse(out, {"notelake.run_id": "test"})
    warehouse.note_buckets(BUCKETS)
    rows = concept_rows(MENTIONS)
    warehouse.append("concepts", schemas.rows_to_table(rows, schemas.concepts_schema()))
    vocab.load_athena(str(write_athena(tmp_path / "athena")), vocab.vocabulary_root(str(out)))
    link_settings = settings.with_overrides(omop={"link_rows_per_pass": 5})  # several passes and commits
    return {"task": load_task(task_path), "task_path": task_path, "warehouse": warehouse, "rows": rows,
            "settings": link_settings, "tmp": tmp_path}


def links_by_concept(warehouse) -> dict[str, dict]:
    return {r["concept_id"]: r for r in read_delta_arrow(warehouse.path(linking.LINKS_TABLE)).to_pylist()}


def test_linker_order_and_decisions(spark, env, caplog):
    caplog.set_level(logging.WARNING, logger="notelake.linking")
    stats = linking.link_concepts(spark, env["warehouse"], env["settings"], [env["task"]])
    links = links_by_concept(env["warehouse"])
    assert len(links) == len(MENTIONS) == stats.linked and stats.passes > 1
    for row, (note, label, text, expected) in zip(env["rows"], MENTIONS):
        link = links[row["concept_id"]]
        assert (link["omop_concept_id"], link["source_concept_id"], link["match_type"]) == expected, text
        assert (link["note_id"], link["label"], link["task"], link["note_bucket"]) == \
            (note, label, "linktest", row["note_bucket"])
        assert link["vocabulary_version"] == "release v1"
        if expected[2] in ("exact", "maps_to"):
            assert link["match_score"] == 1.0 and link["vocabulary_id"] == "TestVocab"
        if expected[0] == 0:
            assert link["vocabulary_id"] is None and link["domain_id"] is None
    fuzzy = links[env["rows"][3]["concept_id"]]
    assert 0.9 <= fuzzy["match_score"] < 1 and fuzzy["domain_id"] == "Condition"
    assert links[env["rows"][4]["concept_id"]]["match_score"] >= 0.9  # close, but as close to another concept
    assert stats.by_match_type == {"exact": 3, "maps_to": 2, "fuzzy": 1, "ambiguous": 2, "none": 4,
                                   "unmapped_label": 1}
    unmapped = [r for r in caplog.records if "no vocabulary target" in r.getMessage()]
    assert len(unmapped) == 1 and "linktest/Trigger (1 rows)" in unmapped[0].getMessage()
    table = read_delta_arrow(env["warehouse"].path(linking.LINKS_TABLE))
    assert table.schema == schemas.CONCEPT_LINKS_SCHEMA


def test_incremental_relink_and_removal(spark, env):
    from deltalake import DeltaTable

    warehouse, settings, task = env["warehouse"], env["settings"], env["task"]
    linking.link_concepts(spark, warehouse, settings, [task])
    links_version = warehouse.version(linking.LINKS_TABLE)

    # a rerun changes nothing: no pass, no commit (the recorded state says so without a Spark job, and the
    # per-bucket comparison finds nothing either when that record is gone)
    for forget in (False, True):
        if forget:
            Path(warehouse.root, linking.STATE_FILE).unlink()
        again = linking.link_concepts(spark, warehouse, settings, [task])
        assert (again.linked, again.removed, again.passes) == (0, 0, 0)
        assert warehouse.version(linking.LINKS_TABLE) == links_version

    # a new vocabulary release re-links every row, without the extraction stage (no model, no engine)
    concepts_version = warehouse.version("concepts")
    vocab.load_athena(str(write_athena(env["tmp"] / "athena2", release="v2")), vocab.vocabulary_root(warehouse.root))
    modules = set(sys.modules)
    relinked = linking.link_concepts(spark, warehouse, settings, [task])
    assert relinked.linked == len(MENTIONS) and relinked.removed == 0
    assert {r["vocabulary_version"] for r in links_by_concept(warehouse).values()} == {"release v2"}
    assert warehouse.version("concepts") == concepts_version
    assert not {m for m in set(sys.modules) - modules if m.startswith(("notelake.models", "vllm", "ray"))}

    # note N1 re-extracted: its concepts rows replaced by one new row; the old link rows go, the new row is linked
    new = concept_rows([("N1", "Drug", "warfarine")])
    new[0]["concept_id"] = "replacement-row"
    warehouse.replace_notes("concepts", schemas.rows_to_table(new, schemas.concepts_schema()), "linktest", ["N1"],
                            {note_bucket("N1", BUCKETS)})
    after = linking.link_concepts(spark, warehouse, settings, [task])
    assert (after.linked, after.removed) == (1, 3)
    links = links_by_concept(warehouse)
    concepts = read_delta_arrow(warehouse.path("concepts"), columns=["concept_id"])["concept_id"].to_pylist()
    assert sorted(links) == sorted(concepts)  # one link row per concepts row, none left over
    assert links["replacement-row"]["match_type"] == "fuzzy" and links["replacement-row"]["omop_concept_id"] == 1
    assert linking.link_concepts(spark, warehouse, settings, [task]).passes == 0
    assert DeltaTable(warehouse.path(linking.LINKS_TABLE)).history(1)[0]["operation"] == "MERGE"


def test_a_label_target_change_relinks_that_label_only(spark, env, tmp_path):
    warehouse, settings = env["warehouse"], env["settings"]
    linking.link_concepts(spark, warehouse, settings, [env["task"]])
    changed = tmp_path / "changed" / "linktest.yaml"
    changed.parent.mkdir()
    changed.write_text(TASK_YAML.replace("vocabularies: [TestVocab, Other]", "vocabularies: [Other, TestVocab]"))
    stats = linking.link_concepts(spark, warehouse, settings, [load_task(changed)])
    effects = sum(1 for m in MENTIONS if m[1] == "Effect")
    assert stats.linked == effects
    cold = next(r for r in env["rows"] if r["text"] == "COLD")
    assert links_by_concept(warehouse)[cold["concept_id"]]["omop_concept_id"] == 8  # now the preferred vocabulary


def test_cli_and_missing_vocabulary(spark, env, tmp_path, caplog):
    out = env["warehouse"].root
    assert linking.main(["--output", out, "--task", str(env["task_path"])]) == 0
    assert len(links_by_concept(env["warehouse"])) == len(MENTIONS)
    # a configured vocabulary that is not there: exit 2; the default location missing: one warning, no link
    assert linking.main(["--output", out, "--task", str(env["task_path"]), "--vocabulary",
                         str(tmp_path / "nowhere")]) == 2
    bare = open_warehouse(tmp_path / "bare", {})
    bare.append("concepts", schemas.rows_to_table(concept_rows(MENTIONS[:1]), schemas.concepts_schema()))
    stats = linking.link_concepts(spark, bare, env["settings"], [env["task"]])
    assert stats.skipped and stats.linked == 0 and bare.version(linking.LINKS_TABLE) is None
    assert "no vocabulary at" in caplog.text


def test_demo_vocabulary_links_the_sample_mentions(spark, tmp_path, settings):
    """The shipped demo vocabulary and phee's normalization section link the sample notes' drugs and effects."""
    out = tmp_path / "warehouse"
    warehouse = open_warehouse(out, {})
    warehouse.note_buckets(BUCKETS)
    mentions = [("N0008", "Drug", "warfarin"), ("N0008", "Effect", "gastrointestinal bleed"),
                ("N0002", "Effect", "hepatotoxicity"), ("N0006", "Effect", "Hyperkalemia"),
                ("N0010", "Drug", "simvastatin"), ("N0009", "Effect", "QT prolongation")]
    warehouse.append("concepts", schemas.rows_to_table(concept_rows(mentions, task="phee"),
                                                       schemas.concepts_schema()))
    vocab.load_athena(str(DEMO), vocab.vocabulary_root(str(out)))
    linking.link_concepts(spark, warehouse, settings, [load_task("phee")])
    got = {(r["label"], r["omop_concept_id"], r["source_concept_id"], r["match_type"])
           for r in read_delta_arrow(warehouse.path(linking.LINKS_TABLE)).to_pylist()}
    assert got == {("Drug", 2000001009, 2000001009, "exact"), ("Effect", 2000003002, 2000003002, "exact"),
                   ("Effect", 2000003006, 2000003101, "maps_to"), ("Effect", 2000003014, 2000003014, "exact"),
                   ("Drug", 2000001011, 2000001011, "exact"), ("Effect", 2000003016, 2000003016, "exact")}
