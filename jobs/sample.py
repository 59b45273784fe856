"""Write the shipped synthetic notes (data/sample/notes.jsonl) as a Delta note table.

    notelake sample-table --out out/notes [--source data/sample/notes.jsonl]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.json as pj

SAMPLE_NOTES = Path(__file__).resolve().parents[1] / "data" / "sample" / "notes.jsonl"


def main(argv: list[str] | None = None) -> int:
    from deltalake import write_deltalake

    p = argparse.ArgumentParser(prog="notelake sample-table")
    p.add_argument("--out", required=True, help="Delta table path to (over)write")
    p.add_argument("--source", default=str(SAMPLE_NOTES), help="JSONL of notes")
    args = p.parse_args(argv)
    table = pj.read_json(args.source)
    if "note_date" in table.column_names:
        table = table.set_column(table.column_names.index("note_date"), "note_date",
                                 table["note_date"].cast(pa.date32()))
    write_deltalake(args.out, table, mode="overwrite")
    print(f"wrote {table.num_rows} notes to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
