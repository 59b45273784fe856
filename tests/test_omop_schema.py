"""The OMOP tables' shapes against the official CDM v5.4 DDL (tests/data, fetched from OHDSI/CommonDataModel), and
the pure mappings of udfs/omop.py. No Spark."""

from __future__ import annotations

import re
from datetime import date, datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from notelake.udfs import omop

DDL = Path(__file__).parent / "data" / "OMOPCDM_duckdb_5.4_ddl.sql"


def official_cdm(con: duckdb.DuckDBPyConnection, schema: str = "cdm") -> None:
    """Create the official CDM v5.4 tables in ``schema`` (the DDL's only parameter is the schema name)."""
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    con.execute(DDL.read_text(encoding="utf-8").replace("@cdmDatabaseSchema", schema))


@pytest.fixture(scope="module")
def cdm():
    con = duckdb.connect()
    official_cdm(con)
    yield con
    con.close()


def _describe(con, relation: str) -> dict[str, tuple[str, bool]]:
    return {name: (kind, null == "YES") for name, kind, null, *_ in con.execute(f"DESCRIBE {relation}").fetchall()}


@pytest.mark.parametrize("table", sorted(omop.CDM_TABLES))
def test_cdm_columns_names_types_and_nullability_match_the_official_ddl(cdm, table):
    official = _describe(cdm, f"cdm.{table}")
    schema = omop.CDM_TABLES[table]
    cdm.register("ours", schema.empty_table())
    ours = _describe(cdm, "ours")
    cdm.unregister("ours")
    assert omop.cdm_columns(table) == list(official), "every CDM column, in CDM order, before the extension columns"
    assert schema.names[:len(official)] == list(official)
    for column, (kind, nullable) in official.items():
        if column in omop.BIGINT_IDS[table]:
            assert (kind, ours[column][0]) == ("INTEGER", "BIGINT"), column  # widened as in CDM v6.0, nothing else
        else:
            assert ours[column][0] == kind, column
        assert schema.field(column).nullable == nullable, column
    assert set(ours) - set(official) == set(omop.EXTENSION_COLUMNS[table])


def test_text_limits_are_the_ddl_varchar_lengths():
    text = DDL.read_text(encoding="utf-8")

    def length(table: str, column: str) -> int:
        body = re.search(rf"TABLE @cdmDatabaseSchema\.{table} \((.*?)\);", text, re.S).group(1)
        return int(re.search(rf'^\s*"?{column}"? varchar\((\d+)\)', body, re.M).group(1))

    assert length("note_nlp", "snippet") == omop.SNIPPET_CHARS
    assert length("note_nlp", "lexical_variant") == omop.LEXICAL_VARIANT_CHARS
    assert length("note_nlp", "nlp_system") == omop.NLP_SYSTEM_CHARS
    assert length("note_nlp", "term_modifiers") == omop.TERM_MODIFIERS_CHARS
    assert length("drug_exposure", "drug_source_value") == omop.SOURCE_VALUE_CHARS
    assert length("condition_occurrence", "condition_source_value") == omop.SOURCE_VALUE_CHARS


def test_offset_columns_say_what_they_count():
    comment = omop.NOTE_NLP_SCHEMA.field("offset_end").metadata[b"comment"].decode()
    assert "code points" in comment and "exclusive" in comment


def test_term_exists_follows_the_cdm_convention_and_the_setting():
    assertions = pa.array(["present", "negated", "hypothetical", "speculated", "unknown", None])
    assert omop.term_exists(assertions, "N").to_pylist() == ["Y", "N", "N", "N", None, None]
    assert omop.term_exists(assertions, "Y").to_pylist() == ["Y", "N", "N", "Y", None, None]
    with pytest.raises(ValueError):
        omop.term_exists(assertions, "yes")


def test_nlp_system_names_version_model_and_adapter_within_250_chars():
    text = omop.nlp_system("0.5.0", "/models/smollm2-135m-instruct/", "models/adapters/notelake-mt", "ab" * 32)
    assert text == f"notelake 0.5.0; model=smollm2-135m-instruct; adapter=notelake-mt@{'ab' * 8}"
    assert omop.nlp_system("0.5.0", "m", None, None) == "notelake 0.5.0; model=m"
    assert len(omop.nlp_system("0.5.0", "m" * 400, "a", "b")) == omop.NLP_SYSTEM_CHARS


def _mentions(**overrides) -> pa.Table:
    row = {"concept_id": "c1", "note_id": "N1", "task": "phee", "note_bucket": 3, "label": "Effect",
           "text": "gastrointestinal bleeding", "start": 10, "end": 35, "assertion": "negated", "grounded": True,
           "model": "m", "adapter": None, "adapter_sha256": None,
           "extracted_at": datetime(2026, 1, 5, 23, 30, tzinfo=timezone.utc), "omop_concept_id": 2000000010,
           "source_concept_id": None, "domain_id": "Condition", "match_type": "exact", "person_value": "7",
           "note_date": date(2026, 1, 4), "note_id_value": None}
    return pa.Table.from_pylist([{**row, **overrides}], schema=omop.MENTION_SCHEMA)


def test_note_nlp_rows_map_a_mention():
    m = _mentions(text="x" * 300)
    row = omop.note_nlp_rows(m, pa.array([11], pa.int64()), pa.array([5], pa.int64()), pa.array(["sys"]),
                             "N").to_pylist()[0]
    assert row["note_nlp_id"] == 11 and row["note_id"] == 5
    assert row["lexical_variant"] == "x" * 250 and row["snippet"] == "x" * 250
    assert (row["offset"], row["offset_start"], row["offset_end"]) == ("10", 10, 35)
    assert (row["note_nlp_concept_id"], row["note_nlp_source_concept_id"]) == (2000000010, 0)
    assert row["term_exists"] == "N" and row["term_temporal"] is None and row["section_concept_id"] is None
    assert row["term_modifiers"] == "assertion=negated,task=phee,label=Effect,link=exact"
    assert row["nlp_date"] == date(2026, 1, 5) and row["nlp_datetime"] == datetime(2026, 1, 5, 23, 30)
    unlinked = omop.note_nlp_rows(_mentions(omop_concept_id=None, match_type=None, start=None, end=None),
                                  pa.array([1], pa.int64()), pa.array([1], pa.int64()), pa.array(["s"]), "N")
    row = unlinked.to_pylist()[0]
    assert row["note_nlp_concept_id"] == 0 and row["offset"] is None and row["term_modifiers"].endswith("link=unlinked")


def test_derivable_needs_a_linked_present_grounded_mention_of_the_domain():
    cases = [({}, False), ({"assertion": "present"}, True), ({"assertion": "present", "omop_concept_id": 0}, False),
             ({"assertion": "present", "grounded": False}, False), ({"assertion": "present", "domain_id": "Drug"},
                                                                    False)]
    for overrides, expected in cases:
        assert omop.derivable(_mentions(**overrides), "Condition").to_pylist() == [expected], overrides


def test_derived_rows_use_the_note_date_the_mention_and_the_type_concept():
    m = _mentions(assertion="present", text="a very long mention of a gastrointestinal haemorrhage, upper tract",
                  source_concept_id=2000000099)
    row = omop.derived_rows("Condition", m, pa.array([11], pa.int64()), pa.array([5], pa.int64()),
                            pa.array([7], pa.int64()), 2000000900).to_pylist()[0]
    assert (row["condition_occurrence_id"], row["person_id"], row["note_id"]) == (11, 7, 5)
    assert row["condition_start_date"] == row["condition_end_date"] == date(2026, 1, 4)
    assert row["condition_start_datetime"] == datetime(2026, 1, 4)
    assert row["condition_type_concept_id"] == 2000000900 and row["condition_concept_id"] == 2000000010
    assert row["condition_source_value"] == m["text"][0].as_py()[:50]
    assert row["condition_source_concept_id"] == 2000000099 and row["visit_occurrence_id"] is None
