"""docs/CLUSTER.md, "Trust model": every test a claim names exists, so no claim points at
nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_test_the_trust_model_names_exists():
    text = (ROOT / "docs" / "CLUSTER.md").read_text()
    section = text.split("## Trust model", 1)[1]
    references = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", section)
    assert len(references) >= 15
    for path, name in references:
        source = ROOT / path
        assert source.is_file(), path
        if name:
            names = {node.name for node in ast.walk(ast.parse(source.read_text()))
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
            assert name in names, f"{path}::{name}"
