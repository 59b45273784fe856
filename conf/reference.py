"""The settings and task reference (docs/configuration.md), generated from the pydantic models.

    notelake docs config                  # rewrite docs/configuration.md
    notelake docs config --check          # exit 1 when the committed file differs from the models
    python -m notelake.conf.reference     # the same without the console script

Every row comes from a model field: its YAML key, type (with its bounds), default and ``description``, and for
settings the value each shipped environment YAML (conf/*.yaml) sets. A field added to :mod:`notelake.conf.settings`
or :mod:`notelake.conf.task` appears here once the command is rerun; tests/test_docs.py fails until it is.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from notelake.conf.settings import CONF_DIR, TASKS_DIR, Settings, notelake_home
from notelake.conf import task as task_module
from notelake.conf.task import Task

DOC_PATH = CONF_DIR.parent / "docs" / "configuration.md"
COMMAND = "notelake docs config"
_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


def _inner(annotation: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return args[0] if is_union and len(args) == 1 else annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def type_name(annotation: Any) -> str:
    """A reader's name for a field's type: ``int``, ``"a" | "b"``, ``str | null``, ``list of str``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is tuple:
        return f"({', '.join(type_name(a) for a in args)})"
    if origin is dict:
        return f"mapping {type_name(args[0])} → {type_name(args[1])}"
    if annotation is SecretStr:
        return "secret str"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def bounds(field: FieldInfo) -> str:
    """The field's numeric bounds and pattern as text (``≥ 1, ≤ 4096``); empty when it has none."""
    parts = []
    for meta in field.metadata:
        for attr, sign in _BOUNDS:
            if getattr(meta, attr, None) is not None:
                parts.append(f"{sign} {getattr(meta, attr)}")
        if getattr(meta, "pattern", None):
            parts.append(f"pattern `{meta.pattern}`")
    return ", ".join(parts)


def default_text(field: FieldInfo) -> str:
    """The default as it would be written in YAML (JSON spelling), or *required*."""
    if field.is_required():
        return "*required*"
    value = field.default_factory() if field.default is PydanticUndefined else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value, default=str)}`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def field_rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, FieldInfo, Any]]:
    """(dotted key, field, annotation) for every field of ``model``, nested models expanded in place.

    A mapping of models is written ``<key>.<name>.``, a list of models ``<key>[].``."""
    rows = []
    for name, field in model.model_fields.items():
        key, annotation = prefix + name, _inner(field.annotation)
        rows.append((key, field, field.annotation))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if _is_model(annotation):
            rows += field_rows(annotation, key + ".")
        elif origin is dict and _is_model(args[1]):
            rows += field_rows(args[1], f"{key}.<name>.")
        elif origin is list and _is_model(args[0]):
            rows += field_rows(args[0], f"{key}[].")
    return rows


def _yaml_value(data: dict, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return PydanticUndefined
        node = node[part]
    return node


def environment_values(dotted: str, environments: dict[str, dict]) -> str:
    """What each shipped environment YAML sets for ``dotted`` (only the files that set it)."""
    found = [(name, _yaml_value(data, dotted)) for name, data in environments.items()]
    return "; ".join(f"{name}: `{json.dumps(v)}`" for name, v in found if v is not PydanticUndefined)


def shipped_environments() -> dict[str, dict]:
    """conf/<name>.yaml -> its raw mapping (the values as written, no path resolution)."""
    return {p.name: yaml.safe_load(p.read_text(encoding="utf-8")) or {} for p in sorted(CONF_DIR.glob("*.yaml"))}


def keys_table(model: type[BaseModel], prefix: str = "", environments: dict[str, dict] | None = None) -> list[str]:
    """One Markdown row per key of ``model``; with ``environments``, a column of what each shipped YAML sets."""
    env_header, env_rule = ("shipped YAMLs set | ", "---|") if environments is not None else ("", "")
    lines = [f"| key | type | default | {env_header}description |", f"|---|---|---|{env_rule}---|"]
    for key, field, annotation in field_rows(model, prefix):
        kind = type_name(annotation) + (f" ({bounds(field)})" if bounds(field) else "")
        env = f"{environment_values(key, environments)} | " if environments is not None else ""
        lines.append(f"| `{key}` | {kind} | {default_text(field)} | {env}{_cell(field.description or '')} |")
    return lines


def shipped_tasks_table() -> list[str]:
    lines = ["| task | kind | concept labels | relation labels | description |", "|---|---|---:|---:|---|"]
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        lines.append(f"| `{path.stem}` | {raw['kind']} | {len(raw.get('concepts', {}))} "
                     f"| {len(raw.get('relations', {}))} | {_cell(raw['description'])} |")
    return lines


def _doc_line(obj: Any) -> str:
    """``obj``'s docstring as one Markdown line (reST roles and double backticks made plain code)."""
    text = re.sub(r":\w+:`([^`]+)`", r"`\1`", obj.__doc__ or "").replace("``", "`")
    return " ".join(text.split())


def render() -> str:
    """docs/configuration.md as the models define it today."""
    environments = shipped_environments()
    out = ["# Configuration reference", "",
           f"<!-- Generated by `{COMMAND}` from conf/settings.py and conf/task.py: do not edit by hand. -->", "",
           "Settings are one YAML file per environment, validated by `notelake.conf.settings.Settings` (pydantic; "
           "an unknown key or a bad value stops the job with exit code 2 and a message naming the key). "
           f"Shipped environments: {', '.join(f'`conf/{n}`' for n in environments)}. A key left out takes the "
           "default below; the 'shipped YAMLs set' column shows the values those files set explicitly.", "",
           f"Environment variable: `NOTELAKE_HOME`: {_doc_line(notelake_home)}", ""]
    top_level = [(n, f) for n, f in Settings.model_fields.items() if not _is_model(_inner(f.annotation))]
    for name, field in top_level:
        out.append(f"Top level: `{name}` ({type_name(field.annotation)}, default {default_text(field)}): "
                   f"{field.description}.")
    for name, field in Settings.model_fields.items():
        section = _inner(field.annotation)
        if not _is_model(section):
            continue
        out += ["", f"## `{name}`", ""]
        if section.__doc__:
            out += [_doc_line(section), ""]
        out += keys_table(section, f"{name}.", environments)
    out += ["", "## Tasks", "", f"{_doc_line(task_module)} Its keys (`notelake.conf.task.Task`):", ""]
    out += keys_table(Task)
    out += ["", "Shipped tasks:", ""] + shipped_tasks_table()
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="notelake docs", description="write the generated reference docs")
    parser.add_argument("doc", nargs="?", choices=["config"], default="config",
                        help="config: docs/configuration.md from the settings and task models")
    parser.add_argument("--out", type=Path, default=DOC_PATH, help="where to write it ('-' = stdout)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if --out is out of date")
    args = parser.parse_args(argv)
    text = render()
    if str(args.out) == "-":
        sys.stdout.write(text)
        return 0
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
