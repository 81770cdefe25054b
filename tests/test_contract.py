"""The contract itself: buf lint and breaking checks, generated code is current, the
REST paths are exactly the seed's (plus the SDK twins), and Envoy accepts its config."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.api import annotations_pb2, field_behavior_pb2
from google.protobuf import descriptor_pb2

from server.bridge.envoy_config import LUA_PATH, render_envoy_config, validate_envoy_config
from server.cli import DESCRIPTOR_PATH

ROOT = Path(__file__).resolve().parents[1]
BUF = ROOT / "node_modules" / ".bin" / "buf"
needs_buf = pytest.mark.skipif(not BUF.exists(), reason="buf not installed (make setup)")

SEED_PATHS = {
    ("post", "/chat/completions"),
    ("post", "/embeddings"),
    ("post", "/image/generations"),
    ("post", "/audio/transcriptions"),
    ("post", "/audio/speech"),
    ("get", "/status"),
}
SDK_TWINS = {("post", "/images/generations"), ("get", "/models")}
# AIGNE Hub's agent protocol, at AIGNE Hub's own paths (no /v1 twins).
AGENT_PATHS = {
    ("get", "/__blocklet__.js"),
    ("get", "/api/ai/models"),
    ("post", "/api/v2/chat"),
    ("post", "/api/v2/image"),
}
# The owner's view of its own account (AccountService, the dashboard's), by API key.
ACCOUNT_PATHS = {("get", "/account"), ("get", "/account/usage"), ("get", "/account/calls")}


def buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@needs_buf
def test_buf_lint_is_clean():
    result = buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_buf
def test_buf_breaking_catches_a_removed_field(tmp_path):
    baseline = tmp_path / "baseline.binpb"
    assert buf("build", "-o", str(baseline)).returncode == 0
    changed = tmp_path / "changed"
    shutil.copytree(ROOT / "protos", changed / "protos")
    shutil.copy(ROOT / "buf.yaml", changed / "buf.yaml")
    proto = changed / "protos" / "aigne" / "hub" / "v1" / "chat_service.proto"
    text = proto.read_text()
    assert "  optional double top_p = 4 [(google.api.field_behavior) = OPTIONAL];\n" in text
    proto.write_text(text.replace("  optional double top_p = 4 [(google.api.field_behavior) = OPTIONAL];\n", ""))

    unchanged = buf("breaking", str(ROOT), "--against", str(baseline))
    assert unchanged.returncode == 0, unchanged.stdout + unchanged.stderr
    broken = buf("breaking", str(changed), "--against", str(baseline))
    assert broken.returncode != 0
    assert "top_p" in broken.stdout + broken.stderr


def test_generated_code_is_current():
    result = subprocess.run(
        [sys.executable, "-m", "server.tools.generate", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _http_rules() -> dict[str, list[tuple[str, str]]]:
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_PATH.read_bytes())
    rules: dict[str, list[tuple[str, str]]] = {}
    for file in files.file:
        if file.package != "aigne.hub.v1":
            continue
        for service in file.service:
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                bindings = [rule, *rule.additional_bindings]
                rules[f"{service.name}.{method.name}"] = [
                    (kind, getattr(b, kind)) for b in bindings for kind in ("get", "post", "delete") if getattr(b, kind)
                ]
    return rules


def test_rest_paths_are_the_seeds_with_v1_twins_and_aignes_own():
    public = {
        pair for pairs in _http_rules().values() for pair in pairs if not pair[1].startswith(("/internal/", "/admin/"))
    }
    expected = SEED_PATHS | SDK_TWINS
    assert public == expected | {(method, "/v1" + path) for method, path in expected} | AGENT_PATHS | ACCOUNT_PATHS


def test_every_rpc_but_typed_transcription_is_on_rest():
    rules = _http_rules()
    assert [name for name, pairs in rules.items() if not pairs] == ["AudioService.CreateTranscription"]


def test_every_element_is_commented():
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_PATH.read_bytes())
    for file in files.file:
        if file.package != "aigne.hub.v1":
            continue
        commented = {tuple(loc.path) for loc in file.source_code_info.location if loc.leading_comments.strip()}
        for index, message in enumerate(file.message_type):
            assert (4, index) in commented, f"{file.name}: message {message.name} has no comment"
            for field_index, field in enumerate(message.field):
                assert (4, index, 2, field_index) in commented, f"{message.name}.{field.name} has no comment"


def test_field_behaviors_match_the_comments():
    """A field commented "Output only." is annotated OUTPUT_ONLY and one commented
    "Optional." OPTIONAL (and "Required." REQUIRED), so generated clients and linters
    see what a reader sees; no annotation without its comment."""
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_PATH.read_bytes())
    words = {
        field_behavior_pb2.OUTPUT_ONLY: "Output only.",
        field_behavior_pb2.OPTIONAL: "Optional.",
        field_behavior_pb2.REQUIRED: "Required.",
    }
    checked = 0
    for file in files.file:
        if not file.package.startswith("aigne."):
            continue
        comments = {tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location}
        for m_index, message in enumerate(file.message_type):
            for f_index, field in enumerate(message.field):
                comment = comments.get((4, m_index, 2, f_index), "")
                behaviors = set(field.options.Extensions[field_behavior_pb2.field_behavior])
                for behavior, word in words.items():
                    if behavior == field_behavior_pb2.REQUIRED and comment.startswith(word):
                        continue  # "Required." may also mean required in some cases only
                    name = f"{message.name}.{field.name}"
                    assert (behavior in behaviors) == comment.startswith(word), name
                checked += 1
    assert checked > 200


def test_envoy_accepts_the_rendered_config(tmp_path):
    config = render_envoy_config(
        rest_host="127.0.0.1",
        rest_port=18080,
        grpc_host="127.0.0.1",
        grpc_port=15051,
        admin_port=19901,
        descriptor_path=DESCRIPTOR_PATH,
        lua_path=LUA_PATH,
        max_request_bytes=32 * 1024 * 1024,
        max_response_bytes=32 * 1024 * 1024,
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(config)
    validate_envoy_config(path)  # raises with Envoy's own message on failure


def test_readme_provider_table_matches_the_code():
    from server.providers.registry import capability_table

    assert capability_table() in (ROOT / "README.md").read_text()
