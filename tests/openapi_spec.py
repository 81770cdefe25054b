"""OpenAI's published OpenAPI description, as JSON Schema validators.

The schemas come from `tests/specs/openai_response_schemas.json`: the response schemas
the conformance tests use, extracted with all they reference from the whole spec
(`tests/specs/extract_openai_schemas.py`, whose test checks the extract against the
spec when the spec is at hand). AIGNE_HUB_OPENAI_SPEC may name the whole YAML instead.

The spec is OpenAPI 3.1, whose schemas are JSON Schema 2020-12; each component schema is
checked as `{"$ref": "#/components/schemas/<name>"}` against the document, so its
references resolve inside it.

The document says OpenAPI 3.1 but still marks 111 schemas with 3.0's `nullable: true`,
which JSON Schema ignores (so `finish_reason: null`, which OpenAI sends in every chunk
but the last, would fail). Such a schema is read as OpenAI means it: the schema, or null.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.specs.extract_openai_schemas import OUTPUT, load_spec

SPEC_URI = "urn:openai-openapi"


@functools.cache
def _registry() -> Registry[Any]:
    full_spec = os.environ.get("AIGNE_HUB_OPENAI_SPEC")
    spec = load_spec(Path(full_spec)) if full_spec else json.loads(OUTPUT.read_text(encoding="utf-8"))
    spec = _with_nullable_as_null(spec)
    return Registry().with_resource(SPEC_URI, Resource.from_contents(spec, default_specification=DRAFT202012))


def _with_nullable_as_null(node: Any) -> Any:
    if isinstance(node, list):
        return [_with_nullable_as_null(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: _with_nullable_as_null(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


@functools.cache
def validator(schema_name: str) -> jsonschema.Draft202012Validator:
    schema = {"$ref": f"{SPEC_URI}#/components/schemas/{schema_name}"}
    return jsonschema.Draft202012Validator(schema, registry=_registry())


def schema_errors(schema_name: str, document: Any) -> list[str]:
    """Every way `document` departs from the spec's schema, as `path: message` lines."""
    found = validator(schema_name).iter_errors(document)
    return [f"{'/'.join(map(str, error.absolute_path)) or '(root)'}: {error.message[:300]}" for error in found]


def assert_conforms(schema_name: str, document: Any) -> None:
    problems = schema_errors(schema_name, document)
    assert not problems, f"{schema_name} violated:\n" + "\n".join(problems) + "\n" + json.dumps(document)[:2000]
