"""The YAML a user copies from the documentation into conf/ parses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", ROOT / "slurm" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _yaml_blocks() -> list[tuple[str, str]]:
    blocks = []
    for document in DOCUMENTS:
        for index, block in enumerate(
            re.findall(r"```yaml\n(.*?)```", document.read_text(encoding="utf-8"), re.S)
        ):
            blocks.append((f"{document.relative_to(ROOT)}#{index}", block))
    return blocks


@pytest.mark.parametrize(("where", "block"), _yaml_blocks(), ids=[where for where, _ in _yaml_blocks()])
def test_documented_yaml_parses(where: str, block: str) -> None:
    assert yaml.safe_load(block) is not None, where
