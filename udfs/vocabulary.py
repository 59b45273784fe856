"""The OMOP vocabulary tables notelake reads (CDM v5.4 names and types) and how their Athena files are parsed.

An Athena export is a folder of tab-separated files, one per table (``CONCEPT.csv``, ...), with a header row
and dates as ``YYYYMMDD``. Athena writes them with opencsv's ``NO_QUOTE_CHARACTER`` and
``NO_ESCAPE_CHARACTER`` (OHDSI/Athena ``AthenaCSVWriter``; OHDSI's own loaders read them with quoting off,
e.g. PostgreSQL ``COPY ... CSV QUOTE E'\\b'``): a ``"`` in a name is an ordinary character, a tab always ends
a field and a line always ends a row. :data:`ATHENA_QUOTING` ``"none"`` reads them so. Files re-exported by a
CSV tool that quotes fields (``"a ""quoted"" name"``, tabs inside quotes) are read with ``"csv"``.

Types follow the official CDM v5.4 Spark DDL (``integer`` -> int32, ``date`` -> date32, the rest strings);
``required`` follows its field-level specification (``isRequired``). An empty field is null; a null in a
required column, a value of the wrong type or a row with the wrong number of fields is a malformed file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

Quoting = Literal["none", "csv"]
ATHENA_QUOTING: Quoting = "none"


@dataclass(frozen=True)
class VocabularyTable:
    """One CDM vocabulary table: its Athena file name and Arrow schema (nullable = not required in the CDM)."""

    name: str
    schema: pa.Schema
    required: bool  # the linker needs it: a missing file stops a load

    @property
    def file_name(self) -> str:
        return f"{self.name.upper()}.csv"


def _schema(*fields: tuple[str, pa.DataType, bool]) -> pa.Schema:
    return pa.schema([pa.field(name, dtype, nullable=not required) for name, dtype, required in fields])


_I, _S, _D = pa.int32(), pa.string(), pa.date32()

VOCABULARY_TABLES: dict[str, VocabularyTable] = {t.name: t for t in (
    VocabularyTable("concept", _schema(
        ("concept_id", _I, True), ("concept_name", _S, True), ("domain_id", _S, True), ("vocabulary_id", _S, True),
        ("concept_class_id", _S, True), ("standard_concept", _S, False), ("concept_code", _S, True),
        ("valid_start_date", _D, True), ("valid_end_date", _D, True), ("invalid_reason", _S, False)), True),
    VocabularyTable("concept_synonym", _schema(
        ("concept_id", _I, True), ("concept_synonym_name", _S, True), ("language_concept_id", _I, True)), True),
    VocabularyTable("concept_relationship", _schema(
        ("concept_id_1", _I, True), ("concept_id_2", _I, True), ("relationship_id", _S, True),
        ("valid_start_date", _D, True), ("valid_end_date", _D, True), ("invalid_reason", _S, False)), True),
    VocabularyTable("concept_ancestor", _schema(
        ("ancestor_concept_id", _I, True), ("descendant_concept_id", _I, True),
        ("min_levels_of_separation", _I, True), ("max_levels_of_separation", _I, True)), True),
    VocabularyTable("vocabulary", _schema(
        ("vocabulary_id", _S, True), ("vocabulary_name", _S, True), ("vocabulary_reference", _S, False),
        ("vocabulary_version", _S, False), ("vocabulary_concept_id", _I, True)), True),
    # shipped by Athena too; loaded when present (cohort tools and the CDM's own checks read them)
    VocabularyTable("domain", _schema(
        ("domain_id", _S, True), ("domain_name", _S, True), ("domain_concept_id", _I, True)), False),
    VocabularyTable("concept_class", _schema(
        ("concept_class_id", _S, True), ("concept_class_name", _S, True), ("concept_class_concept_id", _I, True)),
        False),
    VocabularyTable("relationship", _schema(
        ("relationship_id", _S, True), ("relationship_name", _S, True), ("is_hierarchical", _S, True),
        ("defines_ancestry", _S, True), ("reverse_relationship_id", _S, True), ("relationship_concept_id", _I, True)),
        False),
)}

#: The row of VOCABULARY.csv whose version names the whole release (OHDSI: "OMOP Standardized Vocabularies").
RELEASE_VOCABULARY_ID = "None"


def release_versions(vocabulary: pa.Table) -> dict[str, str | None]:
    """``{vocabulary_id: vocabulary_version}`` of a vocabulary table: what a link fingerprint depends on."""
    return dict(sorted(zip(vocabulary["vocabulary_id"].to_pylist(), vocabulary["vocabulary_version"].to_pylist())))


def release_name(versions: dict[str, str | None]) -> str:
    """The release's version: the ``None`` row's vocabulary_version (an OHDSI release, e.g. ``v5.0 30-AUG-24``),
    else the versions of all vocabularies joined (a site's own tables without that row)."""
    release = versions.get(RELEASE_VOCABULARY_ID)
    if release:
        return release
    return "; ".join(f"{vid} {version}" for vid, version in versions.items() if version)
