"""Extracts, from OpenAI's published OpenAPI description, the response schemas the
conformance tests validate against, with every schema they reference.

    python -m tests.specs.extract_openai_schemas path/to/openai-openapi.yaml

writes `tests/specs/openai_response_schemas.json` (about 40 kB, where the whole spec is
3 MB), so that the tests need nothing outside the repository. The source is
openai/openai-openapi (MIT licence), `openapi.yaml`; `SOURCE` names the version used.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

OUTPUT = Path(__file__).resolve().parent / "openai_response_schemas.json"
SOURCE = (
    "openai/openai-openapi openapi.yaml, commit f85dbe223d40e1a31cba812ab2d755c7e98a92a3 "
    "(2026-08-21, OpenAPI 3.1.0, version 2.3.0), MIT licence"
)
ROOTS = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateEmbeddingResponse",
    "CreateTranscriptionResponseJson",
    "CreateTranscriptionResponseVerboseJson",
    "ErrorResponse",
    "ImagesResponse",
    "ListModelsResponse",
)
PREFIX = "#/components/schemas/"


def load_spec(path: Path) -> Any:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader is 20 times faster
    with path.open(encoding="utf-8") as handle:
        return yaml.load(handle, Loader=loader)


def extract(spec: Any) -> dict[str, Any]:
    """The document holding the ROOTS schemas and all they reference, refs unchanged."""
    schemas = spec["components"]["schemas"]
    kept: set[str] = set()
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name not in kept:
            kept.add(name)
            todo += [ref.removeprefix(PREFIX) for ref in _refs(schemas[name])]
    return {"source": SOURCE, "components": {"schemas": {name: schemas[name] for name in sorted(kept)}}}


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(PREFIX):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(render(extract(load_spec(Path(sys.argv[1])))), encoding="utf-8")
    print(f"wrote {OUTPUT}")
