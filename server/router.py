"""Resolves `provider/model` (or an alias) to the adapter that serves it.

A bare model name (no `provider/`, not an alias) is resolved through the catalog when
exactly one enabled provider lists it: clients such as AIGNE's framework strip the
provider prefix before talking OpenAI's protocol (`openai/gpt-4o-mini` is sent as
`gpt-4o-mini`). A name several providers list is refused (400) naming the candidates,
so that a call never lands on a provider the caller did not mean.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from server.config import GatewayConfig
from server.errors import InvalidRequest, ModelNotFound, ProviderNotConfigured, UnsupportedFeature
from server.providers.base import Capability, Provider
from server.providers.registry import PRESETS, api_key_variable, catalog_models

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Route:
    """Where one call goes."""

    provider: Provider
    # The name after `provider/`, as the upstream knows it.
    upstream_model: str
    # `provider/model` as reported back to the client.
    public_model: str
    # The server's limit on the upstream call (server.api.calls enforces it): a unary
    # answer, a stream's first chunk, each gap between chunks. The REST bridge's limits
    # are derived from the largest (settings.upstream_read_timeout_s) and must stay above it.
    timeout_s: float = 600.0


@dataclass(frozen=True, slots=True)
class CatalogModel:
    """A model of the catalog, as listed by ListModels."""

    id: str
    owned_by: str
    capabilities: frozenset[Capability]
    alias_of: str = ""


class Router:
    """Maps model strings to adapters; built once at start from the configuration."""

    def __init__(
        self, config: GatewayConfig, providers: dict[str, Provider], *, upstream_timeout_s: float = 600.0
    ) -> None:
        self._config = config
        self._upstream_timeout_s = upstream_timeout_s
        self._providers = providers
        self._aliases = dict(config.aliases)
        self._catalog = self._build_catalog()
        self._bare_names: dict[str, list[str]] = {}
        for entry in sorted(self._catalog.values(), key=lambda m: m.id):
            if not entry.alias_of:
                self._bare_names.setdefault(entry.id.partition("/")[2], []).append(entry.id)

    @property
    def providers(self) -> dict[str, Provider]:
        return self._providers

    def resolve(
        self, model: str, capability: Capability, interface: type[T], features: Iterable[Capability] = ()
    ) -> tuple[Route, T]:
        """The route for `model`, checked to offer `capability` through `interface`, and
        the request's other `features` (tools, ...)."""
        route = self.route(model)
        adapter = route.provider
        catalog_entry = self._catalog.get(route.public_model)
        allowed = catalog_entry.capabilities if catalog_entry else adapter.capabilities
        missing = [c for c in (capability, *features) if c not in allowed]
        if missing or not isinstance(adapter, interface):
            feature = (missing[0] if missing else capability).value
            raise UnsupportedFeature(
                f"provider {adapter.name!r} does not support {feature} for model {route.upstream_model!r}",
                field="model",
                metadata={"provider": adapter.name, "feature": feature},
            )
        return route, adapter

    def route(self, model: str) -> Route:
        if not model:
            raise InvalidRequest("model is required, as provider/model (e.g. openai/gpt-4o-mini)", field="model")
        target = self._aliases.get(model, model)
        if "/" not in target:
            target = self._unique_provider_of(target)
        provider_name, sep, upstream_model = target.partition("/")
        if not sep or not provider_name or not upstream_model:
            raise ModelNotFound(
                f"model {model!r} is not of the form provider/model (e.g. openai/gpt-4o-mini) "
                "and is no configured alias",
                field="model",
            )
        provider = self._providers.get(provider_name)
        if provider is None:
            raise self._unknown_provider(provider_name)
        provider_config = self._config.providers.get(provider_name)
        if provider_config and provider_config.strict_models and target not in self._catalog:
            raise ModelNotFound(
                f"model {upstream_model!r} is not in provider {provider_name!r}'s catalog",
                field="model",
            )
        return Route(
            provider=provider, upstream_model=upstream_model, public_model=target, timeout_s=self._upstream_timeout_s
        )

    def _unique_provider_of(self, name: str) -> str:
        """`provider/name` when exactly one enabled provider's catalog lists `name`."""
        candidates = self._bare_names.get(name, [])
        if len(candidates) > 1:
            raise InvalidRequest(
                f"model {name[:64]!r} is listed by several providers ({', '.join(candidates)}): "
                "name one as provider/model",
                field="model",
            )
        return candidates[0] if candidates else name

    def catalog(self) -> list[CatalogModel]:
        return sorted(self._catalog.values(), key=lambda m: m.id)

    def _unknown_provider(self, name: str) -> Exception:
        variable = api_key_variable(name)
        if name in PRESETS and variable:
            return ProviderNotConfigured(
                f"provider {name!r} is not configured: set {variable} or add it to the config file",
                field="model",
                metadata={"provider": name},
            )
        enabled = ", ".join(sorted(self._providers)) or "none"
        return ModelNotFound(f"unknown provider {name!r} (enabled providers: {enabled})", field="model")

    def _build_catalog(self) -> dict[str, CatalogModel]:
        catalog: dict[str, CatalogModel] = {}
        for name, cfg in self._config.providers.items():
            provider = self._providers.get(name)
            if provider is None:
                continue
            for entry in catalog_models(name, cfg):
                caps = frozenset(entry.capabilities) if entry.capabilities else provider.capabilities
                model_id = f"{name}/{entry.id}"
                catalog[model_id] = CatalogModel(model_id, name, caps & provider.capabilities)
        for alias, target in self._aliases.items():
            base = catalog.get(target)
            owner = target.partition("/")[0]
            provider = self._providers.get(owner)
            caps = base.capabilities if base else (provider.capabilities if provider else frozenset())
            catalog[alias] = CatalogModel(alias, owner, caps, alias_of=target)
        return catalog
