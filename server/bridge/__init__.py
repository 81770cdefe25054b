"""The OpenAI-compatible REST bridge: Envoy's gRPC-JSON transcoder plus a Lua filter.

`envoy_config` renders and validates the Envoy configuration (envoy/envoy.yaml.tmpl),
with timeouts derived from the server's; `process` runs one Envoy that dies with its
parent (through `die_with_parent.py`) and checks that the Envoy answering is its own;
`supervisor` restarts it while `aigne-hub serve` runs.
"""

from server.bridge.envoy_config import (
    ENVOY_DIR,
    LUA_PATH,
    TEMPLATE_PATH,
    render_envoy_config,
    validate_envoy_config,
)

__all__ = ["ENVOY_DIR", "LUA_PATH", "TEMPLATE_PATH", "render_envoy_config", "validate_envoy_config"]
