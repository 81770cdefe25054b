"""The vendored extract of OpenAI's spec is what the extractor makes of the spec."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.specs.extract_openai_schemas import OUTPUT, ROOTS, extract, load_spec, render

ROOT = Path(__file__).resolve().parents[1]
# The spec as this project's workspace provides it (see the issue), or where the
# environment says; a clean clone has neither and keeps only the extract.
CANDIDATES = [os.environ.get("AIGNE_HUB_OPENAI_SPEC", ""), str(ROOT.parent / "shared/specs/openai-openapi.yaml")]


def test_the_extract_holds_every_root_schema():
    schemas = json.loads(OUTPUT.read_text(encoding="utf-8"))["components"]["schemas"]
    assert set(ROOTS) <= set(schemas)


def test_the_extract_matches_the_spec():
    spec_path = next((Path(c) for c in CANDIDATES if c and Path(c).is_file()), None)
    if spec_path is None:
        pytest.skip("OpenAI's openapi.yaml is not at hand (set AIGNE_HUB_OPENAI_SPEC)")
    assert OUTPUT.read_text(encoding="utf-8") == render(extract(load_spec(spec_path)))
