"""Load a site's OMOP vocabulary export (Athena format) into Delta tables the linker reads.

    notelake vocab load --athena DIR --output WAREHOUSE        # -> WAREHOUSE/vocabulary/<table>
    notelake vocab load --athena DIR --vocabulary URI          # -> URI/<table> (a shared vocabulary location)
    notelake vocab load --athena data/vocab/demo --output out/warehouse   # the shipped demo vocabulary

Each of ``CONCEPT.csv``, ``CONCEPT_SYNONYM.csv``, ``CONCEPT_RELATIONSHIP.csv``, ``CONCEPT_ANCESTOR.csv`` and
``VOCABULARY.csv`` (and ``DOMAIN.csv``, ``CONCEPT_CLASS.csv``, ``RELATIONSHIP.csv`` when present) becomes the
Delta table of the same name in lower case, with the CDM v5.4 column names and types
(``udfs/vocabulary.py``). File names are matched case-insensitively; header names too, in any order.

Every file is parsed and checked **before** anything is written: a malformed file (a row with the wrong number of
fields, a value of the wrong type, an empty required field, a date that is not ``YYYYMMDD``, bytes that are not
UTF-8) stops the load with exit 2 and names the file and line, and the tables already there are left as they
were. Then each table is replaced whole, and the release is recorded in ``_notelake_vocabulary.json`` beside the
tables (``vocabulary_version`` of the ``None`` row and of every vocabulary, row counts, load time) and in each
commit's metadata. The linker's fingerprint reads the versions from the ``vocabulary`` table itself, so a
vocabulary already in Delta (written by another tool) is linked against the same way. Nothing is downloaded.

Exit codes: 0 loaded; 2 bad arguments, a missing required file or a malformed file; 4 a table could not be
written.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Iterator
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from notelake.jobs import storage
from notelake.udfs.vocabulary import ATHENA_QUOTING, VOCABULARY_TABLES, Quoting, VocabularyTable, release_name, \
    release_versions

log = logging.getLogger("notelake.vocab")

MANIFEST = "_notelake_vocabulary.json"
VOCABULARY_DIR = "vocabulary"
_BLOCK_BYTES = 16 << 20
_INT32 = (-(2**31), 2**31 - 1)


class VocabularyFileError(ValueError):
    """A vocabulary file cannot be loaded; the message names the file and, where one is at fault, the line."""

    def __init__(self, path: str, line: int | None, reason: str) -> None:
        super().__init__(f"{path}{f':{line}' if line else ''}: {reason}")
        self.path, self.line, self.reason = path, line, reason


def vocabulary_root(output: str | None = None, vocabulary: str | None = None) -> str:
    """Where the vocabulary tables live: ``vocabulary`` when given, else ``<output>/vocabulary``."""
    if vocabulary:
        return vocabulary
    if not output:
        raise ValueError("give the warehouse (--output) or the vocabulary location (--vocabulary)")
    return storage.join(output, VOCABULARY_DIR)


def find_files(athena_dir: str, opts: dict[str, str] | None = None) -> dict[str, str]:
    """``{table: file location}`` of the vocabulary files in ``athena_dir`` (names matched case-insensitively);
    VocabularyFileError when a required one is missing."""
    import pyarrow.fs as pafs

    fs, base = storage.filesystem(athena_dir, opts)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        raise VocabularyFileError(athena_dir, None, "not a folder of Athena vocabulary files")
    names = {info.base_name.upper(): info.base_name
             for info in fs.get_file_info(pafs.FileSelector(base, recursive=False)) if info.type == pafs.FileType.File}
    found, missing = {}, []
    for table in VOCABULARY_TABLES.values():
        if table.file_name.upper() in names:
            found[table.name] = storage.join(athena_dir, names[table.file_name.upper()])
        elif table.required:
            missing.append(table.file_name)
    if missing:
        raise VocabularyFileError(athena_dir, None, f"missing vocabulary file(s): {', '.join(missing)}")
    return found


# ------------------------------------------------------------------------------------------------------ reading
def _open(location: str, opts: dict[str, str] | None):
    fs, path = storage.filesystem(location, opts)
    return fs.open_input_stream(path)


def _byte_lines(location: str, opts: dict[str, str] | None) -> Iterator[bytes]:
    """The file's lines as bytes, ``\n`` kept (pyarrow's input streams have no ``readline``)."""
    with _open(location, opts) as stream:
        pending = b""
        while chunk := stream.read(1 << 20):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            yield from (line + b"\n" for line in lines)
        if pending:
            yield pending


def _header(location: str, table: VocabularyTable, quoting: Quoting, opts: dict[str, str] | None) -> list[str]:
    """The file's column names (lower case), checked against the table's."""
    first = next(_byte_lines(location, opts), b"").decode("utf-8-sig", errors="replace").rstrip("\r\n")
    if quoting == "csv":
        fields = next(csv.reader([first], delimiter="\t"), [])
    else:
        fields = first.split("\t")
    names = [f.strip().lower() for f in fields]
    expected = set(table.schema.names)
    if set(names) != expected or len(names) != len(expected):
        missing, extra = sorted(expected - set(names)), sorted(set(names) - expected)
        raise VocabularyFileError(location, 1, f"header of {table.file_name} must name the CDM v5.4 columns "
                                               f"{', '.join(table.schema.names)} (missing: {missing or 'none'}, "
                                               f"unexpected: {extra or 'none'})")
    return names


def _physical_line(location: str, record: int, quoting: Quoting, opts: dict[str, str] | None) -> int:
    """The line number of the ``record``-th record of a file (1 = the header; blank lines are no records)."""
    lines = (raw.decode("utf-8", errors="replace") for raw in _byte_lines(location, opts))
    if quoting == "csv":
        reader = csv.reader(lines, delimiter="\t")
        count = 0
        for row in reader:
            count += bool(row)
            if count == record:
                break
        return reader.line_num
    count = 0
    for number, line in enumerate(lines, start=1):
        count += bool(line.strip("\r\n"))
        if count == record:
            return number
    return record


def _first_invalid_utf8_line(location: str, opts: dict[str, str] | None) -> int | None:
    for number, raw in enumerate(_byte_lines(location, opts), start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return number
    return None


def _typed(column: pa.Array, field: pa.Field) -> tuple[pa.Array, int | None, str]:
    """``column`` (strings) as ``field``'s type, or (_, index of the first bad value, what is wrong)."""
    text = column
    empty = pc.equal(pc.utf8_length(text), 0)
    nulls = pc.if_else(empty, pa.scalar(None, pa.string()), text)
    if not field.nullable and pc.any(empty).as_py():
        return column, _first_true(empty), f"empty {field.name} (required)"
    if pa.types.is_string(field.type):
        return nulls, None, ""
    if pa.types.is_int32(field.type):
        ok = pc.match_substring_regex(nulls, r"^\s*[+-]?[0-9]{1,10}\s*$")
        bad = pc.and_(pc.invert(ok), pc.invert(empty))
        if pc.any(bad).as_py():
            return column, _first_true(bad), f"{field.name} is not an integer"
        wide = pc.cast(pc.utf8_trim_whitespace(nulls), pa.int64())
        out_of_range = pc.fill_null(pc.or_(pc.less(wide, _INT32[0]), pc.greater(wide, _INT32[1])), False)
        if pc.any(out_of_range).as_py():
            return column, _first_true(out_of_range), f"{field.name} does not fit a CDM integer (int32)"
        return pc.cast(wide, pa.int32()), None, ""
    parsed = pc.strptime(nulls, format="%Y%m%d", unit="s", error_is_null=True)
    bad = pc.and_(pc.is_null(parsed), pc.invert(empty))
    bad = pc.or_(bad, pc.invert(pc.fill_null(pc.match_substring_regex(nulls, r"^[0-9]{8}$"), True)))
    if pc.any(bad).as_py():
        return column, _first_true(bad), f"{field.name} is not a YYYYMMDD date"
    return pc.cast(pc.cast(parsed, pa.timestamp("s")), pa.date32()), None, ""


def _first_true(mask: pa.Array) -> int:
    return pc.index(pc.fill_null(mask, False), True).as_py()


def read_athena(location: str, table: VocabularyTable, quoting: Quoting = ATHENA_QUOTING,
                opts: dict[str, str] | None = None) -> Iterator[pa.RecordBatch]:
    """The rows of one Athena file as record batches of the table's CDM schema, streamed (a 2 GB
    CONCEPT_ANCESTOR.csv never sits in memory whole); VocabularyFileError names the file and line of the first
    malformed row."""
    names = _header(location, table, quoting, opts)
    invalid: list[tuple[int, int]] = []

    def on_invalid(row) -> str:
        invalid.append((row.number, row.actual_columns))
        return "error"

    parse = pacsv.ParseOptions(delimiter="\t", quote_char='"' if quoting == "csv" else False, double_quote=True,
                               escape_char=False, newlines_in_values=quoting == "csv", invalid_row_handler=on_invalid)
    convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False,
                                   quoted_strings_can_be_null=False, null_values=[])
    read = pacsv.ReadOptions(use_threads=False, block_size=_BLOCK_BYTES, skip_rows=1, column_names=names)
    records = 1  # the header
    with _open(location, opts) as stream:
        try:
            reader = pacsv.open_csv(stream, read_options=read, parse_options=parse, convert_options=convert)
            for batch in reader:
                columns = []
                for field in table.schema:
                    typed, bad, reason = _typed(batch.column(field.name), field)
                    if bad is not None:
                        line = _physical_line(location, records + bad + 1, quoting, opts)
                        raise VocabularyFileError(location, line, reason)
                    columns.append(typed)
                records += batch.num_rows
                yield pa.RecordBatch.from_arrays(columns, schema=table.schema)
        except pa.ArrowInvalid as exc:
            if invalid:
                number, found = invalid[0]
                line = _physical_line(location, number, quoting, opts)
                raise VocabularyFileError(location, line, f"{found} tab-separated fields, the header has "
                                                          f"{len(names)}") from None
            if "UTF8" in str(exc) or "utf-8" in str(exc).lower():
                raise VocabularyFileError(location, _first_invalid_utf8_line(location, opts),
                                          "not UTF-8 text") from None
            raise VocabularyFileError(location, None, f"unreadable: {str(exc).splitlines()[0][:200]}") from None


# ------------------------------------------------------------------------------------------------------ loading
def check_files(files: dict[str, str], quoting: Quoting, opts: dict[str, str] | None = None) -> dict[str, int]:
    """Parse every file (nothing written): ``{table: rows}``, or VocabularyFileError at the first bad line."""
    rows = {}
    for name, location in files.items():
        rows[name] = sum(batch.num_rows for batch in read_athena(location, VOCABULARY_TABLES[name], quoting, opts))
        log.info("checked %s: %d rows", location, rows[name])
    return rows


def load_athena(athena_dir: str, root: str, *, quoting: Quoting = ATHENA_QUOTING,
                opts: dict[str, str] | None = None) -> dict:
    """Load an Athena export into Delta tables under ``root`` (each replaced whole, after every file was checked)
    and record its release; returns the manifest written (versions, rows, load time)."""
    from deltalake import CommitProperties, write_deltalake

    files = find_files(athena_dir, opts)
    rows = check_files(files, quoting, opts)
    versions = release_versions(pa.Table.from_batches(
        list(read_athena(files["vocabulary"], VOCABULARY_TABLES["vocabulary"], quoting, opts)),
        schema=VOCABULARY_TABLES["vocabulary"].schema))
    manifest = {"release": release_name(versions), "versions": versions, "rows": rows,
                "loaded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quoting": quoting,
                "source_files": sorted(location.rsplit("/", 1)[-1] for location in files.values())}
    commit = CommitProperties(custom_metadata={"notelake.operation": "vocab_load",
                                               "notelake.vocabulary_release": manifest["release"]})
    for name, location in files.items():
        table = VOCABULARY_TABLES[name]
        batches = pa.RecordBatchReader.from_batches(table.schema, read_athena(location, table, quoting, opts))
        write_deltalake(storage.join(root, name), batches, mode="overwrite", schema_mode="overwrite",
                        commit_properties=commit, storage_options=opts)
    storage.write_text(storage.join(root, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True) + "\n", opts)
    return manifest


def main(argv: list[str] | None = None) -> int:
    """``notelake vocab load``: exit codes as in the module docstring; the release and row counts as one JSON line."""
    from notelake.jobs.cli_common import configure_command_logging

    configure_command_logging()
    p = argparse.ArgumentParser(prog="notelake vocab", description="OMOP vocabulary tables for concept linking")
    sub = p.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load", help="load an Athena export (tab-separated files) into Delta tables")
    load.add_argument("--athena", required=True, help="folder of the Athena export (CONCEPT.csv, ...)")
    where = load.add_mutually_exclusive_group(required=True)
    where.add_argument("--output", help="warehouse: the tables go to <output>/vocabulary/")
    where.add_argument("--vocabulary", help="the vocabulary tables' own location (path or URI)")
    load.add_argument("--quoting", choices=("none", "csv"), default=ATHENA_QUOTING,
                      help="none (Athena's own files: quotes are ordinary characters) or csv (fields in double "
                           "quotes, as a CSV tool re-exports them)")
    load.add_argument("--conf", default=None, help="settings YAML whose storage.options reach an object store")
    args = p.parse_args(argv)
    from notelake.conf import load_settings
    from notelake.jobs.cli_common import run_command

    def load() -> dict:
        opts = storage.settings_options(load_settings(args.conf))
        root = vocabulary_root(args.output, args.vocabulary)
        manifest = _load_reporting_write_errors(args.athena, root, args.quoting, opts)
        return {"vocabulary": root, "release": manifest["release"], "rows": manifest["rows"]}

    # vocabulary files hold no PHI: a VocabularyFileError names the file, line and value
    return run_command("vocab load", load, usage_errors=(VocabularyFileError,))


def _load_reporting_write_errors(athena_dir: str, root: str, quoting: Quoting, opts: dict[str, str]) -> dict:
    from deltalake.exceptions import DeltaError

    from notelake.jobs.warehouse import OutputWriteError

    try:
        return load_athena(athena_dir, root, quoting=quoting, opts=opts)
    except (OSError, DeltaError) as exc:
        if isinstance(exc, FileNotFoundError) and not storage.exists(athena_dir, opts):
            raise VocabularyFileError(athena_dir, None, "no such folder") from None
        raise OutputWriteError(f"cannot write the vocabulary tables at {root} ({type(exc).__name__}: {exc})") from exc


if __name__ == "__main__":
    sys.exit(main())
