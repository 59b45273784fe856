"""OMOP CDM v5.4 shapes of the output and the pure mappings from concept rows to them (jobs/omop/ writes them).

Tables (Delta, partitioned by ``task`` and ``note_bucket`` like the concepts they come from):

* ``note_nlp`` -- every column of the CDM v5.4 NOTE_NLP table, in CDM order and with CDM types, then the extension
  columns ``offset_start`` / ``offset_end`` (integer offsets of the mention's extent in the note text, counted in
  Unicode code points -- not UTF-16 units -- with the end exclusive; the names the 2023 NLP proposal gives them)
  and notelake's keys ``task``, ``note_bucket`` and ``concept_id`` (the concepts row it comes from).
* ``note_nlp_relation`` -- notelake's companion table: one row per extracted relation, keyed by the
  ``note_nlp_id`` of its head and tail mentions (the CDM has no NOTE_NLP relation table).
* ``drug_exposure`` / ``condition_occurrence`` -- NLP-derived CDM rows (type concept "NLP"), one per linked,
  asserted-present, grounded mention of the Drug / Condition domain; every CDM v5.4 column, then ``task``,
  ``note_bucket`` and ``note_id`` (the NOTE the row was read from).

Identifier columns that CDM v6.0 widens from integer to bigint are BIGINT here (:data:`BIGINT_IDS`): a warehouse
passes 2^31 NOTE_NLP rows. Ids are assigned from 1 upwards, so they load into a v5.4 INTEGER column until then.
Concept ids stay integer. ``0`` means "no matching concept", as in the CDM.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

#: CDM integer columns stored as BIGINT (CDM v6.0's type for them): keys that can pass 2^31 rows.
BIGINT_IDS: dict[str, frozenset[str]] = {
    "note_nlp": frozenset({"note_nlp_id", "note_id"}),
    "drug_exposure": frozenset({"drug_exposure_id", "person_id", "provider_id", "visit_occurrence_id",
                                "visit_detail_id"}),
    "condition_occurrence": frozenset({"condition_occurrence_id", "person_id", "provider_id", "visit_occurrence_id",
                                       "visit_detail_id"}),
}

#: varchar(n) lengths of the CDM columns this module fills with text (values are cut to fit).
SNIPPET_CHARS = 250
LEXICAL_VARIANT_CHARS = 250
NLP_SYSTEM_CHARS = 250
TERM_MODIFIERS_CHARS = 2000
SOURCE_VALUE_CHARS = 50

_INT = pa.int32()
_BIG = pa.int64()
_STR = pa.string()
_DATE = pa.date32()
_DATETIME = pa.timestamp("us")  # CDM datetime: no time zone; notelake writes UTC wall time
_KEYS = [pa.field("task", _STR, nullable=False), pa.field("note_bucket", pa.int32(), nullable=False)]

NOTE_NLP_SCHEMA = pa.schema([
    pa.field("note_nlp_id", _BIG, nullable=False),
    pa.field("note_id", _BIG, nullable=False),
    pa.field("section_concept_id", _INT),
    pa.field("snippet", _STR, metadata={"comment": "the mention itself: the output keeps no note text around it"}),
    pa.field("offset", _STR, metadata={"comment": "start of the mention, in Unicode code points (= offset_start)"}),
    pa.field("lexical_variant", _STR, nullable=False),
    pa.field("note_nlp_concept_id", _INT),
    pa.field("note_nlp_source_concept_id", _INT),
    pa.field("nlp_system", _STR),
    pa.field("nlp_date", _DATE, nullable=False),
    pa.field("nlp_datetime", _DATETIME),
    pa.field("term_exists", _STR),
    pa.field("term_temporal", _STR),
    pa.field("term_modifiers", _STR),
    # extension columns
    pa.field("offset_start", _INT, metadata={"comment": "start of the mention's extent: Unicode code points from the "
                                                        "start of the note text, 0-based"}),
    pa.field("offset_end", _INT, metadata={"comment": "end of the mention's extent: Unicode code points, exclusive"}),
    *_KEYS,
    pa.field("concept_id", _STR, nullable=False, metadata={"comment": "notelake concepts.concept_id of the mention"}),
])

NOTE_NLP_RELATION_SCHEMA = pa.schema([
    pa.field("relation_id", _STR, nullable=False),  # notelake relations.relation_id
    pa.field("note_id", _BIG, nullable=False),
    pa.field("head_note_nlp_id", _BIG, nullable=False),
    pa.field("tail_note_nlp_id", _BIG, nullable=False),
    pa.field("relationship", _STR, nullable=False),  # the task's relation label, e.g. adverse_effect
    *_KEYS,
])

_DERIVED_KEYS = [*_KEYS, pa.field("note_id", _BIG, nullable=False)]

DRUG_EXPOSURE_SCHEMA = pa.schema([
    pa.field("drug_exposure_id", _BIG, nullable=False),
    pa.field("person_id", _BIG, nullable=False),
    pa.field("drug_concept_id", _INT, nullable=False),
    pa.field("drug_exposure_start_date", _DATE, nullable=False),
    pa.field("drug_exposure_start_datetime", _DATETIME),
    pa.field("drug_exposure_end_date", _DATE, nullable=False),
    pa.field("drug_exposure_end_datetime", _DATETIME),
    pa.field("verbatim_end_date", _DATE),
    pa.field("drug_type_concept_id", _INT, nullable=False),
    pa.field("stop_reason", _STR),
    pa.field("refills", _INT),
    pa.field("quantity", pa.decimal128(18, 3)),  # the DDL's NUMERIC (DuckDB: DECIMAL(18,3))
    pa.field("days_supply", _INT),
    pa.field("sig", _STR),
    pa.field("route_concept_id", _INT),
    pa.field("lot_number", _STR),
    pa.field("provider_id", _BIG),
    pa.field("visit_occurrence_id", _BIG),
    pa.field("visit_detail_id", _BIG),
    pa.field("drug_source_value", _STR),
    pa.field("drug_source_concept_id", _INT),
    pa.field("route_source_value", _STR),
    pa.field("dose_unit_source_value", _STR),
    *_DERIVED_KEYS,
])

CONDITION_OCCURRENCE_SCHEMA = pa.schema([
    pa.field("condition_occurrence_id", _BIG, nullable=False),
    pa.field("person_id", _BIG, nullable=False),
    pa.field("condition_concept_id", _INT, nullable=False),
    pa.field("condition_start_date", _DATE, nullable=False),
    pa.field("condition_start_datetime", _DATETIME),
    pa.field("condition_end_date", _DATE),
    pa.field("condition_end_datetime", _DATETIME),
    pa.field("condition_type_concept_id", _INT, nullable=False),
    pa.field("condition_status_concept_id", _INT),
    pa.field("stop_reason", _STR),
    pa.field("provider_id", _BIG),
    pa.field("visit_occurrence_id", _BIG),
    pa.field("visit_detail_id", _BIG),
    pa.field("condition_source_value", _STR),
    pa.field("condition_source_concept_id", _INT),
    pa.field("condition_status_source_value", _STR),
    *_DERIVED_KEYS,
])

#: The CDM tables written, with the name of their CDM columns (the rest of each schema is extension columns).
CDM_TABLES: dict[str, pa.Schema] = {
    "note_nlp": NOTE_NLP_SCHEMA, "drug_exposure": DRUG_EXPOSURE_SCHEMA,
    "condition_occurrence": CONDITION_OCCURRENCE_SCHEMA,
}
EXTENSION_COLUMNS: dict[str, tuple[str, ...]] = {
    "note_nlp": ("offset_start", "offset_end", "task", "note_bucket", "concept_id"),
    "drug_exposure": ("task", "note_bucket", "note_id"),
    "condition_occurrence": ("task", "note_bucket", "note_id"),
}
#: concept domain -> the derived table, its concept/source columns and its type-concept column.
DOMAIN_TABLES: dict[str, str] = {"Drug": "drug_exposure", "Condition": "condition_occurrence"}


def cdm_columns(table: str) -> list[str]:
    """The CDM v5.4 columns of ``table``, in CDM order (the schema without its extension columns)."""
    return [n for n in CDM_TABLES[table].names if n not in EXTENSION_COLUMNS[table]]


#: One mention as the publish stage hands it over: a concepts row joined with its concept_links row and the note's
#: OMOP keys (the job's Spark side builds these; :func:`note_nlp_rows` and :func:`derived_rows` map them).
MENTION_SCHEMA = pa.schema([
    pa.field("concept_id", _STR), pa.field("note_id", _STR), pa.field("task", _STR), pa.field("note_bucket", _INT),
    pa.field("label", _STR), pa.field("text", _STR), pa.field("start", _BIG), pa.field("end", _BIG),
    pa.field("assertion", _STR), pa.field("grounded", pa.bool_()),
    pa.field("model", _STR), pa.field("adapter", _STR), pa.field("adapter_sha256", _STR),
    pa.field("extracted_at", pa.timestamp("us", tz="UTC")),
    pa.field("omop_concept_id", _INT), pa.field("source_concept_id", _INT), pa.field("domain_id", _STR),
    pa.field("match_type", _STR),
    pa.field("person_value", _STR), pa.field("note_date", _DATE), pa.field("note_id_value", _STR),
])


def term_exists(assertion: pa.ChunkedArray | pa.Array, speculated: str) -> pa.Array:
    """CDM ``term_exists`` of each assertion: present -> 'Y'; negated, hypothetical -> 'N' (the CDM: negation and
    conditional make it false); speculated -> ``speculated`` ('Y' or 'N', omop.term_exists_speculated); an
    unknown value -> null."""
    if speculated not in ("Y", "N"):
        raise ValueError(f"speculated must be 'Y' or 'N', not {speculated!r}")
    values = {"present": "Y", "negated": "N", "hypothetical": "N", "speculated": speculated}
    keys = pa.array(list(values), _STR)
    return pc.take(pa.array(list(values.values()), _STR), pc.index_in(assertion, value_set=keys))


def nlp_system(version: str, model: str, adapter: str | None, adapter_sha256: str | None) -> str:
    """``notelake <version>; model=<name>; adapter=<name>@<sha256 prefix>`` within the CDM's 250 characters
    (a model or adapter given as a folder is named by its last component)."""
    def name(path: str) -> str:
        return path.rstrip("/").rsplit("/", 1)[-1]

    text = f"notelake {version}; model={name(model)}"
    if adapter:
        text += f"; adapter={name(adapter)}" + (f"@{adapter_sha256[:16]}" if adapter_sha256 else "")
    return text[:NLP_SYSTEM_CHARS]


def _cut(values, chars: int) -> pa.Array:
    return pc.utf8_slice_codeunits(values, 0, chars)


def _modifiers(m: pa.Table) -> pa.Array:
    """term_modifiers: ``assertion=negated,task=phee,label=Effect,link=exact`` (raw assertion, task, label and how
    the concept was linked: the linker's match type, ``unlinked`` when no link row exists)."""
    link = pc.fill_null(m["match_type"], "unlinked")
    parts = [pc.binary_join_element_wise(pa.scalar(f"{key}="), pc.cast(m[col], _STR), "")
             for key, col in (("assertion", "assertion"), ("task", "task"), ("label", "label"))]
    parts.append(pc.binary_join_element_wise(pa.scalar("link="), link, ""))
    return _cut(pc.binary_join_element_wise(*parts, ","), TERM_MODIFIERS_CHARS)


def _concept(values) -> pa.Array:
    """A concept id column: 0 (no matching concept) where the mention has none."""
    return pc.fill_null(pc.cast(values, _INT), 0)


def note_nlp_rows(m: pa.Table, note_nlp_ids: pa.Array, note_ids: pa.Array, systems: pa.Array,
                  speculated: str) -> pa.Table:
    """NOTE_NLP rows of the mentions ``m`` (:data:`MENTION_SCHEMA`), one per mention, given each mention's
    ``note_nlp_id``, OMOP ``note_id`` and ``nlp_system``. nlp_date/nlp_datetime are when the note was processed
    (the extraction time, UTC), so republishing an unchanged mention writes the same row."""
    extracted = pc.cast(m["extracted_at"], pa.timestamp("us", tz="UTC"))
    start = pc.cast(m["start"], _INT)
    columns = {
        "note_nlp_id": note_nlp_ids, "note_id": note_ids,
        "section_concept_id": pa.nulls(m.num_rows, _INT),
        "snippet": _cut(m["text"], SNIPPET_CHARS),
        "offset": pc.cast(start, _STR),
        "lexical_variant": _cut(m["text"], LEXICAL_VARIANT_CHARS),
        "note_nlp_concept_id": _concept(m["omop_concept_id"]),
        "note_nlp_source_concept_id": _concept(m["source_concept_id"]),
        "nlp_system": systems,
        "nlp_date": pc.cast(pc.cast(extracted, pa.timestamp("us")), _DATE),
        "nlp_datetime": pc.cast(extracted, pa.timestamp("us")),
        "term_exists": term_exists(m["assertion"], speculated),
        "term_temporal": pa.nulls(m.num_rows, _STR),
        "term_modifiers": _modifiers(m),
        "offset_start": start, "offset_end": pc.cast(m["end"], _INT),
        "task": m["task"], "note_bucket": m["note_bucket"], "concept_id": m["concept_id"],
    }
    return pa.table(columns, schema=NOTE_NLP_SCHEMA)


def derivable(m: pa.Table, domain: str) -> pa.Array:
    """Mask of the mentions that become NLP-derived rows of ``domain``: linked (concept != 0) to a concept of that
    domain, asserted present and grounded in the note text."""
    return pc.and_kleene(
        pc.and_kleene(pc.equal(m["domain_id"], domain), pc.not_equal(pc.fill_null(m["omop_concept_id"], 0), 0)),
        pc.and_kleene(pc.equal(m["assertion"], "present"), pc.equal(m["grounded"], True)))


def derived_rows(domain: str, m: pa.Table, row_ids: pa.Array, note_ids: pa.Array, person_ids: pa.Array,
                 type_concept_id: int) -> pa.Table:
    """NLP-derived rows of ``domain`` ('Drug' -> drug_exposure, 'Condition' -> condition_occurrence) for the
    mentions ``m`` (already filtered with :func:`derivable`, each with a person and a note date). The row id is the
    mention's note_nlp_id; start and end date are the note date (the CDM's convention when a source has one date;
    datetimes at midnight); the source value is the mention, cut to the CDM's 50 characters; the source concept
    is the linker's ``source_concept_id`` (0 when it has none)."""
    table = DOMAIN_TABLES[domain]
    schema = CDM_TABLES[table]
    n = m.num_rows
    date = pc.cast(m["note_date"], _DATE)
    midnight = pc.cast(date, _DATETIME)
    prefix = "drug" if table == "drug_exposure" else "condition"
    start_col = "drug_exposure_start" if prefix == "drug" else "condition_start"
    end_col = "drug_exposure_end" if prefix == "drug" else "condition_end"
    values = {
        f"{table}_id": row_ids, "person_id": person_ids,
        f"{prefix}_concept_id": pc.cast(m["omop_concept_id"], _INT),
        f"{start_col}_date": date, f"{start_col}_datetime": midnight,
        f"{end_col}_date": date, f"{end_col}_datetime": midnight,
        f"{prefix}_type_concept_id": pa.array([type_concept_id] * n, _INT),
        f"{prefix}_source_value": _cut(m["text"], SOURCE_VALUE_CHARS),
        f"{prefix}_source_concept_id": _concept(m["source_concept_id"]),
        "task": m["task"], "note_bucket": m["note_bucket"], "note_id": note_ids,
    }
    return pa.table({f.name: values[f.name] if f.name in values else pa.nulls(n, f.type) for f in schema},
                     schema=schema)
