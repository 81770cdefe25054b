"""ProviderSpec: everything the gateway knows about a provider before building it.

Each provider module exports one (`SPEC`); the registry is the list of them, and the
configuration (`server.config.config_from_environment`), the router's messages, the
admin API's known names and the README's provider table all read the specs, so a
provider's environment variables, default base URL, catalog and capabilities are
named in one place: its module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.providers.base import Capability, Provider

if TYPE_CHECKING:
    from server.config import ModelEntry, ProviderConfig
    from server.providers.transport import Transport

# (provider name, its configuration, its spec, the transport) -> the adapter.
Factory = Callable[[str, "ProviderConfig", "ProviderSpec", "Transport"], Provider]
# The configuration the environment implies for the provider, or None when it is off.
FromEnvironment = Callable[[Mapping[str, str]], "ProviderConfig | None"]


@dataclass(frozen=True)
class ProviderSpec:
    """One provider: its name, how it is configured and built, what it offers."""

    name: str
    build: Factory
    # The variable that holds its key (also named in "not configured" messages).
    api_key_env: str | None
    # Where it answers when the configuration gives no base_url.
    base_url: str | None = None
    capabilities: frozenset[Capability] = frozenset(Capability)
    # The catalog used when the configuration lists no models.
    models: tuple[ModelEntry, ...] = ()
    # How the environment enables it without a config file (None: only a config file does).
    from_environment: FromEnvironment | None = None
    # What enables it, for the README's provider table.
    enabled_by: str = ""
    # The module that implements it (several specs may share one: the OpenAI family).
    adapter: str = ""
    # OpenAI-compatible dialects: the field that carries visible reasoning.
    reasoning_field: str = "reasoning_content"
    # Every environment variable it reads (documentation and tests).
    variables: tuple[str, ...] = field(default=())

    def key_from_environment(self, cfg: ProviderConfig, environ: Mapping[str, str]) -> str | None:
        """The configured key, else (when the config names no variable) the spec's."""
        api_key = cfg.resolved_api_key()
        if api_key is None and cfg.api_key_env is None and self.api_key_env:
            api_key = environ.get(self.api_key_env) or None
        return api_key
