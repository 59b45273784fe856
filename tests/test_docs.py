"""The docs that are generated or cross-linked stay true to the code: docs/configuration.md matches the settings
and task models, and every relative link in the README and docs/ points at a file that exists."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from notelake.conf import reference
from notelake.conf.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_configuration_reference_is_up_to_date():
    committed = reference.DOC_PATH.read_text(encoding="utf-8") if reference.DOC_PATH.exists() else ""
    assert committed == reference.render(), (
        f"docs/configuration.md is out of date with conf/settings.py or conf/task.py: run `{reference.COMMAND}` "
        "(or `python -m notelake.conf.reference`) and commit the file")


def test_reference_names_every_setting_with_its_type_default_and_description():
    text = reference.render()
    for section, field in Settings.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            for name, sub in model.model_fields.items():
                row = next(line for line in text.splitlines() if line.startswith(f"| `{section}.{name}` |"))
                assert reference.default_text(sub) in row
                assert " ".join((sub.description or "").split()).replace("|", "\\|") in row


class _Example(BaseModel):
    level: Literal["low", "high"] = Field("low", description="how | much")
    size: int | None = Field(None, ge=1, le=8, description="bounded")
    names: list[str] = Field(default_factory=lambda: ["a"], description="listed")


def test_rows_render_type_bounds_default_and_escape_pipes():
    rows = {key: (field, annotation) for key, field, annotation in reference.field_rows(_Example, "x.")}
    assert reference.type_name(rows["x.level"][1]) == '"low" \\| "high"'
    assert reference.type_name(rows["x.size"][1]) == "int \\| null"
    assert reference.bounds(rows["x.size"][0]) == "≥ 1, ≤ 8"
    assert reference.default_text(rows["x.names"][0]) == '`["a"]`'
    assert reference._cell(rows["x.level"][0].description) == "how \\| much"


def test_check_mode_reports_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text("old\n", encoding="utf-8")
    assert reference.main(["config", "--check", "--out", str(stale)]) == 1
    assert reference.COMMAND in capsys.readouterr().err
    assert reference.main(["config", "--out", str(stale)]) == 0
    assert reference.main(["config", "--check", "--out", str(stale)]) == 0


def test_relative_links_in_readme_and_docs_resolve():
    broken = []
    for page in [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if not page.exists():
            continue
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == [], f"links to missing files: {broken}"
