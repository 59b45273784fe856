"""`notelake vocab load`: Athena files -> CDM v5.4 Delta tables (real deltalake tables in tmp, no Spark)."""

from __future__ import annotations

import json
import shutil
from datetime import date
from pathlib import Path

import pytest

from notelake.jobs import vocab
from notelake.jobs.warehouse import read_delta_arrow
from notelake.udfs.vocabulary import VOCABULARY_TABLES

DEMO = Path(__file__).resolve().parents[1] / "data" / "vocab" / "demo"


def athena_rows(path: Path) -> list[list[str]]:
    """A demo file's data rows split the way Athena wrote them: tabs only, no quoting."""
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:]]


def test_demo_vocabulary_round_trip(tmp_path):
    manifest = vocab.load_athena(str(DEMO), str(tmp_path / "vocabulary"))
    for name in ("concept", "concept_synonym", "concept_relationship", "concept_ancestor", "vocabulary"):
        table = read_delta_arrow(tmp_path / "vocabulary" / name)
        assert table.schema == VOCABULARY_TABLES[name].schema  # CDM v5.4 names, types, required columns
        assert table.num_rows == len(athena_rows(DEMO / VOCABULARY_TABLES[name].file_name)) == manifest["rows"][name]
    concept = {r["concept_id"]: r for r in read_delta_arrow(tmp_path / "vocabulary" / "concept").to_pylist()}
    assert concept[2000004001]["concept_name"] == 'Gauze pad 4" x 4"'  # quotes kept verbatim (Athena: no quoting)
    assert concept[2000001009]["valid_start_date"] == date(2026, 6, 1)
    assert concept[2000001009]["standard_concept"] == "S" and concept[2000001009]["invalid_reason"] is None
    assert concept[2000001101]["standard_concept"] is None  # empty field -> null
    assert concept[32858]["concept_name"] == "NLP" and concept[32858]["domain_id"] == "Type Concept"
    assert all(cid > 2_000_000_000 for cid in concept if cid != 32858)
    synonyms = read_delta_arrow(tmp_path / "vocabulary" / "concept_synonym").to_pylist()
    names = {r["concept_synonym_name"] for r in synonyms}
    assert '"Blood thinners" (lay term)' in names and "Hyperkal\u00e6mia" in names
    # every row of the file, field by field, is in the table
    assert sorted(int(r[0]) for r in athena_rows(DEMO / "CONCEPT.csv")) == sorted(concept)


def test_release_is_recorded(tmp_path):
    root = tmp_path / "vocabulary"
    manifest = vocab.load_athena(str(DEMO), str(root))
    recorded = json.loads((root / vocab.MANIFEST).read_text())
    assert recorded["release"] == manifest["release"] == "Notelake demo 2026-06-01"  # the None row's version
    assert recorded["versions"]["Notelake Demo"] == "2026-06-01"
    assert recorded["versions"]["Type Concept"] is None
    from deltalake import DeltaTable

    history = DeltaTable(str(root / "concept")).history(1)[0]
    assert history["notelake.vocabulary_release"] == "Notelake demo 2026-06-01"


def copy_demo(tmp_path) -> Path:
    target = tmp_path / "athena"
    shutil.copytree(DEMO, target)
    return target


def edit_line(path: Path, number: int, new: str) -> None:
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[number - 1] = new
    path.write_text("\n".join(lines), encoding="utf-8")


@pytest.mark.parametrize("file_name, line, content, reason", [
    ("CONCEPT.csv", 5, "2000000004\tOMOP\tVocabulary\tMetadata\tVocabulary\tVocabulary\t\tVocabulary\t20260601\t"
                       "20991231\t", "11 tab-separated fields, the header has 10"),  # a tab inside a name
    ("CONCEPT.csv", 7, "2000000005\tX\tDrug\tNotelake Demo\tIngredient\tS\tc\t2026-06-01\t20991231\t",
     "valid_start_date is not a YYYYMMDD date"),
    ("CONCEPT.csv", 8, "2000000006\tX\tDrug\tNotelake Demo\tIngredient\tS\tc\t20261301\t20991231\t",
     "valid_start_date is not a YYYYMMDD date"),  # month 13
    ("CONCEPT_SYNONYM.csv", 3, "20000x2001\tNSAIDs\t4180186", "concept_id is not an integer"),
    ("CONCEPT_ANCESTOR.csv", 4, "2000001002\t2000001002\t\t0", "empty min_levels_of_separation (required)"),
    ("CONCEPT_RELATIONSHIP.csv", 2, "9999999999\t1\tMaps to\t20260601\t20991231\t",
     "concept_id_1 does not fit a CDM integer (int32)"),
])
def test_malformed_file_is_exit_2_naming_file_and_line(tmp_path, caplog, file_name, line, content, reason):
    athena = copy_demo(tmp_path)
    edit_line(athena / file_name, line, content)
    out = tmp_path / "warehouse"
    assert vocab.main(["load", "--athena", str(athena), "--output", str(out)]) == 2
    assert f"{athena / file_name}:{line}: {reason}" in caplog.text
    assert not (out / "vocabulary" / "concept").exists()  # nothing written: every file is checked first


def test_line_numbers_count_blank_lines_and_bad_bytes_are_named(tmp_path):
    athena = copy_demo(tmp_path)
    path = athena / "CONCEPT_SYNONYM.csv"
    lines = path.read_text(encoding="utf-8").split("\n")
    path.write_text("\n".join(lines[:3] + ["", ""] + lines[3:5] + ["2000001009\tonly two"] + lines[5:]),
                    encoding="utf-8")
    with pytest.raises(vocab.VocabularyFileError) as bad:
        vocab.check_files({"concept_synonym": str(path)}, "none")
    assert (bad.value.line, bad.value.reason) == (8, "2 tab-separated fields, the header has 3")
    path.write_bytes(b"concept_id\tconcept_synonym_name\tlanguage_concept_id\n1\tok\t2\n3\t\xff\xfe\t4\n")
    with pytest.raises(vocab.VocabularyFileError) as bad:
        vocab.check_files({"concept_synonym": str(path)}, "none")
    assert (bad.value.line, bad.value.reason) == (3, "not UTF-8 text")


def test_missing_file_and_wrong_header_are_exit_2(tmp_path, caplog):
    athena = copy_demo(tmp_path)
    (athena / "CONCEPT_ANCESTOR.csv").unlink()
    assert vocab.main(["load", "--athena", str(athena), "--output", str(tmp_path / "w")]) == 2
    assert "missing vocabulary file(s): CONCEPT_ANCESTOR.csv" in caplog.text
    athena = copy_demo(tmp_path / "second")
    edit_line(athena / "VOCABULARY.csv", 1, "vocabulary_id\tvocabulary_name\tversion\tvocabulary_concept_id")
    assert vocab.main(["load", "--athena", str(athena), "--output", str(tmp_path / "w")]) == 2
    assert f"{athena / 'VOCABULARY.csv'}:1: header of VOCABULARY.csv" in caplog.text


def test_quoted_fields_csv_mode_and_file_names_in_any_case(tmp_path):
    """A re-export by a CSV tool (fields with quotes or tabs in double quotes, quotes doubled) reads with
    --quoting csv; Athena's own files (no quoting) read verbatim, a leading quote included."""
    import csv

    athena = tmp_path / "reexport"
    athena.mkdir()
    for table in VOCABULARY_TABLES.values():
        if table.required:
            rows = [line.split("\t") for line in (DEMO / table.file_name).read_text(encoding="utf-8").splitlines()]
            rows = [[field.replace("(lay term)", "\t(lay term)") for field in row] for row in rows]
            with open(athena / table.file_name.lower(), "w", encoding="utf-8", newline="") as f:
                csv.writer(f, delimiter="\t", lineterminator="\n").writerows(rows)
    files = vocab.find_files(str(athena))
    assert '"""Blood thinners"" \t(lay term)"' in Path(files["concept_synonym"]).read_text(encoding="utf-8")
    with pytest.raises(vocab.VocabularyFileError) as bad:  # read as Athena's: the quoted tab splits a row
        vocab.check_files({"concept_synonym": files["concept_synonym"]}, "none")
    assert bad.value.reason == "4 tab-separated fields, the header has 3"
    assert vocab.main(["load", "--athena", str(athena), "--vocabulary", str(tmp_path / "v"), "--quoting", "csv"]) == 0
    synonyms = read_delta_arrow(tmp_path / "v" / "concept_synonym").to_pylist()
    assert {"concept_id": 2000002013, "concept_synonym_name": '"Blood thinners" \t(lay term)',
            "language_concept_id": 4180186} in synonyms
    assert 'Gauze pad 4" x 4"' in read_delta_arrow(tmp_path / "v" / "concept")["concept_name"].to_pylist()
