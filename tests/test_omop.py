"""notelake omop: the OMOP CDM tables published from a small warehouse (concepts, relations, concept_links and a
vocabulary written here), incrementally; cohorts over them with OHDSI's Circe (duckcdm) on the official CDM v5.4
DDL, a plain-SQL cohort over note_nlp and concept_ancestor, and the shipped drug class -> adverse effect query."""

from __future__ import annotations

import json
import sys
from datetime import date, datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from notelake.conf import load_settings
from notelake.jobs.omop import publish_omop
from notelake.jobs.vocab import load_athena
from notelake.jobs.warehouse import open_warehouse, read_delta_arrow
from notelake.udfs import omop, schemas

sys.path.insert(0, str(Path(__file__).parent))
from test_omop_schema import official_cdm  # noqa: E402

DATA = Path(__file__).parent / "data"
DEMO_VOCABULARY = Path(__file__).parents[1] / "data" / "vocab" / "demo"
TASK = "phee"
# Concepts of the demo vocabulary (data/vocab/demo): ingredients under drug classes, a brand name that maps to
# ibuprofen, conditions under a parent, and OMOP's 'NLP' type concept.
IBUPROFEN, WARFARIN, ADVIL = 2000001001, 2000001009, 2000001103
GI_HAEMORRHAGE, HAEMORRHAGE, AKI = 2000003002, 2000003001, 2000003004
NLP_TYPE = 32858
DRUGS = {IBUPROFEN, WARFARIN}
DRUG, EFFECT = "Drug", "Effect"
# note, person, date, bucket, mentions (label, text, assertion, concept, source concept), relations (head, tail)
NOTES = [
    ("N1", 1, date(2026, 1, 4), 0, [(DRUG, "ibuprofen", "present", IBUPROFEN, None),
                                    (EFFECT, "kidney injury", "present", AKI, None)], [(0, 1)]),
    ("N2", 1, date(2026, 1, 14), 1, [(EFFECT, "GI bleed", "present", GI_HAEMORRHAGE, None)], []),
    ("N3", 2, date(2026, 1, 5), 2, [(DRUG, "Advil", "present", IBUPROFEN, ADVIL)], []),
    ("N4", 2, date(2026, 3, 1), 3, [(EFFECT, "upper GI bleeding", "present", GI_HAEMORRHAGE, None)], []),
    ("N5", 3, date(2026, 1, 6), 0, [(DRUG, "ibuprofen", "present", IBUPROFEN, None),
                                    (EFFECT, "GI bleeding", "negated", GI_HAEMORRHAGE, None)], [(0, 1)]),
    ("N6", 4, date(2026, 1, 7), 1, [(DRUG, "warfarin", "present", WARFARIN, None),
                                    (EFFECT, "GI bleeding", "present", GI_HAEMORRHAGE, None)], [(0, 1)]),
    ("N7", 5, date(2026, 1, 8), 2, [(DRUG, "ibuprofen", "speculated", IBUPROFEN, None)], []),
    ("N8", 5, date(2026, 1, 10), 3, [(EFFECT, "melena", "present", 0, None)], []),
    ("N9", 6, date(2026, 2, 1), 0, [(DRUG, "ibuprofen", "present", IBUPROFEN, None),
                                    (EFFECT, "haematemesis", "present", GI_HAEMORRHAGE, None)], [(0, 1)]),
    ("N10", None, date(2026, 1, 9), 1, [(DRUG, "ibuprofen", "present", IBUPROFEN, None)], []),  # no person id
]
NOTE_NAMES = {n[0] for n in NOTES}
PASSTHROUGH = pa.schema([("person_id", pa.int64()), ("note_date", pa.date32())])
RUN_AT = datetime(2026, 2, 2, 3, 0, tzinfo=timezone.utc)


def _concept_rows(note, person, day, bucket, mentions, run_id="run-1"):
    rows, start = [], 0
    for k, (label, text, assertion, *_rest) in enumerate(mentions):
        rows.append({
            "note_id": note, "concept_id": f"{note}-{k}-{text}", "task": TASK, "note_bucket": bucket, "label": label,
            "text": text, "start": start, "end": start + len(text),
            "spans": [{"start": start, "end": start + len(text)}],
            "assertion": assertion, "grounded": True, "grounding_method": "exact", "grounding_score": 1.0,
            "chunk_index": 0, "run_id": run_id, "model": "smollm2-135m-instruct", "adapter": "notelake-mt",
            "adapter_sha256": "ab" * 32, "prompt_version": "v2", "fingerprint": "fp", "text_sha256": "t",
            "extracted_at": RUN_AT, "person_id": person, "note_date": day})
        start += len(text) + 1
    return rows


def _link_rows(note, bucket, mentions):
    """concept_links rows as the linker writes them: the source concept is the concept matched (the brand name for
    a 'Maps to' match), 0 with concept 0."""
    return [{"concept_id": f"{note}-{k}-{text}", "note_id": note, "task": TASK, "note_bucket": bucket, "label": label,
             "omop_concept_id": concept, "source_concept_id": source or concept, "vocabulary_id": "Notelake Demo",
             "domain_id": ("Drug" if concept in DRUGS else "Condition") if concept else None,
             "match_type": ("maps_to" if source else "exact") if concept else "none", "match_score": 1.0,
             "link_fingerprint": "lf", "vocabulary_version": "test 1", "linked_at": RUN_AT}
            for k, (label, text, _assertion, concept, source) in enumerate(mentions)]


def _relation_rows(note, bucket, mentions, relations):
    return [{"note_id": note, "relation_id": f"{note}-r{h}{t}", "task": TASK, "note_bucket": bucket,
             "label": "adverse_effect", "head_concept_id": f"{note}-{h}-{mentions[h][1]}",
             "tail_concept_id": f"{note}-{t}-{mentions[t][1]}", "head_label": mentions[h][0],
             "head_text": mentions[h][1],
             "tail_label": mentions[t][0], "tail_text": mentions[t][1], "chunk_index": 0, "run_id": "run-1",
             "model": "smollm2-135m-instruct", "adapter": "notelake-mt", "adapter_sha256": "ab" * 32,
             "prompt_version": "v2", "fingerprint": "fp", "text_sha256": "t", "extracted_at": RUN_AT,
             "person_id": None, "note_date": None} for h, t in relations]


def build_warehouse(root: Path):
    wh = open_warehouse(root, {"notelake.stage": "test"})
    concepts = [r for n in NOTES for r in _concept_rows(*n[:5])]
    wh.append("concepts", schemas.rows_to_table(concepts, schemas.concepts_schema(PASSTHROUGH)))
    relations = [r for n in NOTES for r in _relation_rows(n[0], n[3], n[4], n[5])]
    wh.append("relations", schemas.rows_to_table(relations, schemas.relations_schema(PASSTHROUGH)))
    links = [r for n in NOTES for r in _link_rows(n[0], n[3], n[4])]
    write_deltalake(wh.path("concept_links"), pa.Table.from_pylist(links, schema=schemas.CONCEPT_LINKS_SCHEMA),
                    partition_by=["task", "note_bucket"])
    load_athena(str(DEMO_VOCABULARY), str(root / "vocabulary"))
    return wh


@pytest.fixture(scope="module")
def omop_settings():
    return load_settings().with_overrides(omop={"domain_tables": True, "publish_buckets_per_pass": 2})


@pytest.fixture(scope="module")
def published(spark, omop_settings, tmp_path_factory):
    root = tmp_path_factory.mktemp("omop") / "warehouse"
    wh = build_warehouse(root)
    stats = publish_omop(spark, wh, omop_settings, [TASK])
    return wh, stats


def table(wh, name) -> list[dict]:
    return read_delta_arrow(wh.path(name)).to_pylist()


def source_ids(wh) -> dict[int, str]:
    return {r["note_id"]: r["source_note_id"] for r in table(wh, "note_crosswalk")}


def test_first_publish_writes_note_nlp_relations_and_derived_rows(published):
    wh, stats = published
    assert (stats.notes_published, stats.notes_removed, stats.buckets_visited) == (10, 0, 4)
    nlp = table(wh, "note_nlp")
    assert len(nlp) == stats.note_nlp_rows == 14
    assert sorted(r["note_nlp_id"] for r in nlp) == list(range(1, 15))
    names = source_ids(wh)
    assert set(names.values()) == NOTE_NAMES and sorted(names) == list(range(1, 11))
    by_text = {(names[r["note_id"]], r["lexical_variant"]): r for r in nlp}
    advil = by_text[("N3", "Advil")]  # a brand name: the standard ingredient, the brand as source concept
    assert (advil["note_nlp_concept_id"], advil["note_nlp_source_concept_id"]) == (IBUPROFEN, ADVIL)
    assert by_text[("N5", "GI bleeding")]["term_exists"] == "N"
    assert by_text[("N7", "ibuprofen")]["term_exists"] == "N"  # speculated: omop.term_exists_speculated N
    assert by_text[("N8", "melena")]["note_nlp_concept_id"] == 0
    assert by_text[("N1", "kidney injury")]["offset_start"] == 10
    assert by_text[("N1", "kidney injury")]["nlp_system"].startswith("notelake ")
    relation = {(names[r["note_id"]], r["relationship"]) for r in table(wh, "note_nlp_relation")}
    assert relation == {("N1", "adverse_effect"), ("N5", "adverse_effect"), ("N6", "adverse_effect"),
                        ("N9", "adverse_effect")}
    drugs = {(r["person_id"], r["drug_concept_id"], r["drug_exposure_start_date"], r["drug_source_value"],
              r["drug_type_concept_id"]) for r in table(wh, "drug_exposure")}
    assert drugs == {(1, IBUPROFEN, date(2026, 1, 4), "ibuprofen", NLP_TYPE),
                     (2, IBUPROFEN, date(2026, 1, 5), "Advil", NLP_TYPE),
                     (3, IBUPROFEN, date(2026, 1, 6), "ibuprofen", NLP_TYPE),
                     (4, WARFARIN, date(2026, 1, 7), "warfarin", NLP_TYPE),
                     (6, IBUPROFEN, date(2026, 2, 1), "ibuprofen", NLP_TYPE)}
    conditions = {(r["person_id"], r["condition_concept_id"], r["condition_start_date"])
                  for r in table(wh, "condition_occurrence")}
    assert conditions == {(1, AKI, date(2026, 1, 4)), (1, GI_HAEMORRHAGE, date(2026, 1, 14)),
                          (2, GI_HAEMORRHAGE, date(2026, 3, 1)), (4, GI_HAEMORRHAGE, date(2026, 1, 7)),
                          (6, GI_HAEMORRHAGE, date(2026, 2, 1))}
    # N10 has no person id: its mention is in note_nlp, its drug row is not, and the errors table says why
    assert by_text[("N10", "ibuprofen")]["term_exists"] == "Y" and stats.derived_skipped == 1
    assert [(e["note_id"], e["stage"], e["error_type"]) for e in table(wh, "errors")] == [
        ("N10", "omop", "omop_person_id_invalid")]
    nlp_ids = {r["concept_id"]: r["note_nlp_id"] for r in nlp}
    assert {r["drug_exposure_id"] for r in table(wh, "drug_exposure")} <= set(nlp_ids.values())


def _cdm_database(wh) -> duckdb.DuckDBPyConnection:
    """The official CDM v5.4 schema in DuckDB with persons, observation periods, the vocabulary and the
    NLP-derived rows loaded (their CDM columns)."""
    con = duckdb.connect()
    official_cdm(con, "cdm")
    con.execute("CREATE SCHEMA results")
    con.execute("CREATE TABLE results.cohort (cohort_definition_id INTEGER, subject_id BIGINT, "
                "cohort_start_date DATE, cohort_end_date DATE)")
    for person in range(1, 7):
        con.execute("INSERT INTO cdm.person (person_id, gender_concept_id, year_of_birth, race_concept_id, "
                    "ethnicity_concept_id) VALUES (?, 0, 1960, 0, 0)", [person])
        con.execute("INSERT INTO cdm.observation_period VALUES (?, ?, DATE '2025-01-01', DATE '2026-12-31', 0)",
                    [person, person])
    for name in ("concept", "concept_ancestor"):
        con.register("src", DeltaTable(str(Path(wh.root) / "vocabulary" / name)).to_pyarrow_dataset())
        con.execute(f"INSERT INTO cdm.{name} BY NAME SELECT * FROM src")
        con.unregister("src")
    for name in ("drug_exposure", "condition_occurrence", "note_nlp"):
        con.register("src", DeltaTable(wh.path(name)).to_pyarrow_dataset())
        columns = ", ".join(f'"{c}"' for c in omop.cdm_columns(name))
        con.execute(f"INSERT INTO cdm.{name} ({columns}) SELECT {columns} FROM src")
        con.unregister("src")
    return con


def test_circe_cohort_drug_class_then_condition_within_30_days(published):
    from duckcdm.circe import build_cohort_query
    from duckcdm.sqlrender import render, split_sql, translate

    wh, _ = published
    con = _cdm_database(wh)
    cohort = (DATA / "nsaid_then_haemorrhage.cohort.json").read_text(encoding="utf-8")
    sql = build_cohort_query(cohort, cdm_schema="cdm", vocabulary_schema="cdm", result_schema="results",
                             target_table="results.cohort", cohort_id=1)
    for statement in split_sql(translate(render(sql), "duckdb")):
        if statement.strip():
            con.execute(statement)
    persons = con.execute("SELECT subject_id, cohort_start_date FROM results.cohort ORDER BY 1").fetchall()
    # 1: ibuprofen, a GI haemorrhage (a descendant of Haemorrhage) 10 days later; 6: both the same day.
    # Not 2 (bleed 55 days later), 3 (bleed negated), 4 (warfarin is no NSAID), 5 (ibuprofen only speculated).
    assert persons == [(1, date(2026, 1, 4)), (6, date(2026, 2, 1))]


def test_sql_cohort_over_note_nlp_with_concept_ancestor(published):
    wh, _ = published
    con = _cdm_database(wh)
    notes = con.execute("""
        SELECT DISTINCT n.note_id FROM cdm.note_nlp n
        JOIN cdm.concept_ancestor ca ON ca.descendant_concept_id = n.note_nlp_concept_id
        WHERE ca.ancestor_concept_id = ? AND n.term_exists = 'Y'""", [HAEMORRHAGE]).fetchall()
    names = source_ids(wh)
    # every present mention of a haemorrhage (any descendant); not N5 (negated), not N8 (no concept)
    assert sorted(names[n] for (n,) in notes) == ["N2", "N4", "N6", "N9"]


def test_drug_class_adverse_effects_query(published):
    from notelake.jobs.cohort import query_text, run_duckdb

    wh, _ = published
    rows = run_duckdb(wh.root, query_text("drug_class_adverse_effects")).to_pylist()
    nsaids, antithrombotic, anticoagulants, vka = 2000002001, 2000002012, 2000002013, 2000002014
    gi_haemorrhage, aki = 2000003002, 2000003004
    assert [(r["drug_class_id"], r["adverse_effect_id"], r["notes"], r["drugs"]) for r in rows] == [
        (anticoagulants, gi_haemorrhage, 1, 1), (antithrombotic, gi_haemorrhage, 1, 1), (nsaids, aki, 1, 1),
        (nsaids, gi_haemorrhage, 1, 1), (vka, gi_haemorrhage, 1, 1)]
    names = {r[f"{c}_id"]: r[c] for r in rows for c in ("drug_class", "adverse_effect")}
    assert names == {anticoagulants: "Anticoagulants", antithrombotic: "Antithrombotic agents",
                     nsaids: "Nonsteroidal anti-inflammatory drugs", vka: "Vitamin K antagonists",
                     gi_haemorrhage: "Gastrointestinal haemorrhage", aki: "Acute kidney injury"}


def test_publish_is_incremental_and_keeps_ids(spark, omop_settings, tmp_path):
    wh = build_warehouse(tmp_path / "warehouse")
    publish_omop(spark, wh, omop_settings, [TASK])
    before = {r["concept_id"]: r["note_nlp_id"] for r in table(wh, "note_nlp")}
    versions = {t: wh.version(t) for t in ("note_nlp", "drug_exposure", "omop_state")}

    again = publish_omop(spark, wh, omop_settings, [TASK])
    assert (again.buckets_visited, again.notes_published) == (0, 0)
    assert {t: wh.version(t) for t in versions} == versions

    # N1 re-extracted (and linked): its drug mention unchanged, the effect now "renal failure"; N2 deleted; N6's
    # mentions re-linked to concept 0
    n1 = NOTES[0]
    mentions = [n1[4][0], (EFFECT, "renal failure", "present", AKI, None)]
    wh.replace_notes("concepts", schemas.rows_to_table(_concept_rows("N1", 1, n1[2], 0, mentions, run_id="run-2"),
                                                       schemas.concepts_schema(PASSTHROUGH)), TASK, ["N1"], {0})
    links = pa.Table.from_pylist(_link_rows("N1", 0, mentions), schema=schemas.CONCEPT_LINKS_SCHEMA)
    write_deltalake(wh.path("concept_links"), links, mode="overwrite",
                    predicate=f"task = '{TASK}' AND note_bucket = 0 AND note_id = 'N1'")
    wh.delete_notes(TASK, {"N2": 1}, tables=("concepts", "relations", "concept_links"))
    relinked = [{**r, "omop_concept_id": 0, "domain_id": None, "match_type": "none"}
                for r in _link_rows("N6", 1, NOTES[5][4])]
    write_deltalake(wh.path("concept_links"), pa.Table.from_pylist(relinked, schema=schemas.CONCEPT_LINKS_SCHEMA),
                    mode="overwrite", predicate=f"task = '{TASK}' AND note_bucket = 1 AND note_id = 'N6'")
    stats = publish_omop(spark, wh, omop_settings, [TASK])
    assert (stats.notes_published, stats.notes_removed, stats.buckets_visited) == (2, 1, 2)

    after = {r["concept_id"]: r for r in table(wh, "note_nlp")}
    names = source_ids(wh)
    assert after["N1-0-ibuprofen"]["note_nlp_id"] == before["N1-0-ibuprofen"]  # unchanged mention keeps its id
    assert after["N1-1-renal failure"]["note_nlp_id"] == max(before.values()) + 1  # a new one: a fresh id
    assert "N1-1-kidney injury" not in after and not [r for r in after.values() if names[r["note_id"]] == "N2"]
    untouched = {c: i for c, i in before.items() if c.split("-")[0] not in ("N1", "N2", "N6")}
    assert {c: after[c]["note_nlp_id"] for c in untouched} == untouched
    assert after["N6-0-warfarin"]["note_nlp_concept_id"] == 0
    assert 4 not in {r["person_id"] for r in table(wh, "drug_exposure")}  # warfarin no longer linked
    conditions = {(r["person_id"], r["condition_start_date"]) for r in table(wh, "condition_occurrence")}
    assert (1, date(2026, 1, 14)) not in conditions and (1, date(2026, 1, 4)) in conditions
    assert set(names.values()) == NOTE_NAMES  # the crosswalk keeps a deleted note's id
    state = {r["note_id"] for r in table(wh, "omop_state")}
    assert state == NOTE_NAMES - {"N2"}
    assert len(table(wh, "errors")) == 1  # N10 is not republished: its error is not repeated
    assert publish_omop(spark, wh, omop_settings, [TASK]).notes_published == 0


def test_cli_publishes_and_refuses_derived_rows_without_the_nlp_type_concept(spark, tmp_path, capsys):
    from notelake.jobs.omop import main

    build_warehouse(tmp_path / "warehouse")
    conf = tmp_path / "omop.yaml"
    conf.write_text(f"omop:\n  domain_tables: true\n  vocabulary: {tmp_path / 'no-vocabulary'}\n", encoding="utf-8")
    assert main(["--output", str(tmp_path / "warehouse"), "--conf", str(conf), "--task", TASK]) == 2
    conf.write_text("omop:\n  domain_tables: false\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["--output", str(tmp_path / "warehouse"), "--conf", str(conf), "--task", TASK]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (stats["notes_published"], stats["drug_exposure_rows"]) == (10, 0)
    assert DeltaTable(str(tmp_path / "warehouse" / "note_nlp")).to_pyarrow_table().num_rows == 14


def test_omop_note_ids_from_a_column_report_a_value_that_is_no_integer(omop_settings):
    from notelake.jobs.omop import rows, state

    settings = omop_settings.with_overrides(omop={"note_id_column": "omop_note_id"})
    ctx = state._Publish(settings, "p1", "fp", None, "unused", {})
    live = pa.table({"note_id": ["A", "B", "C"], "note_bucket": pa.array([0, 0, 1], pa.int32())})
    mentions = pa.table({"note_id": ["A", "B", "C"], "note_id_value": ["42", " 7 ", "x7"]})
    errors: list[dict] = []
    assert rows._omop_note_ids(None, ctx, TASK, live, mentions, errors) == {"A": 42, "B": 7}
    assert [(e["note_id"], e["error_type"]) for e in errors] == [("C", "omop_note_id_invalid")]
