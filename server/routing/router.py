"""Resolves what a client calls (`provider/model`, an alias, or a model of the
configuration's `models:`) to the deployments that can serve it, in the order a call
tries them: the model's own deployments, then its fallbacks' (see `Plan`).

A bare model name (no `provider/`, not an alias) is resolved through the catalog when
exactly one enabled provider lists it: clients such as AIGNE's framework strip the
provider prefix before talking OpenAI's protocol (`openai/gpt-4o-mini` is sent as
`gpt-4o-mini`). A name several providers list is refused (400) naming the candidates,
so that a call never lands on a provider the caller did not mean.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeGuard, TypeVar

from server.config import GatewayConfig, ModelRouteConfig, Strategy, TimeoutsConfig
from server.errors import GatewayError, InvalidRequest, ModelNotFound, ProviderNotConfigured, UnsupportedFeature
from server.providers.base import Capability, Provider
from server.providers.registry import SPECS, api_key_variable, catalog_models

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
class Target(Generic[T]):
    """One deployment a call may try: a route, its adapter (checked to offer the call's
    capability) and its share of the traffic."""

    route: Route
    adapter: T
    weight: float = 1.0
    # A provider credential stored through the admin API that this deployment uses (its
    # id; never the secret): each active stored credential of a provider is a deployment
    # of its own (server.api.credential_deployments). None: the provider's configured key.
    credential_id: str | None = None

    @property
    def deployment(self) -> str:
        """`provider/model`, as the served-by header reports it."""
        return f"{self.route.provider.name}/{self.route.upstream_model}"

    @property
    def name(self) -> str:
        """The deployment's identity for cooldowns and statistics: `provider/model`, and
        `@<credential id>` when it uses a stored credential."""
        return f"{self.deployment}@{self.credential_id}" if self.credential_id else self.deployment


@dataclass(frozen=True, slots=True)
class ModelGroup(Generic[T]):
    """The deployments of one public model and how to balance them."""

    model: str
    targets: list[Target[T]]
    strategy: Strategy = "weighted"


@dataclass(frozen=True, slots=True)
class Plan(Generic[T]):
    """Where one call may go, in order: the model's deployments, then each fallback
    model's. A fallback that cannot serve the call's capability is left out."""

    primary: ModelGroup[T]
    fallbacks: list[ModelGroup[T]] = field(default_factory=list)
    context_window_fallbacks: list[ModelGroup[T]] = field(default_factory=list)
    content_policy_fallbacks: list[ModelGroup[T]] = field(default_factory=list)
    max_attempts: int = 3
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)


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
        # By id() of a `models:` entry (None: the defaults); the entries live as long as
        # the router, so an id is never reused for another.
        self._timeouts: dict[int, TimeoutsConfig] = {}
        self._providers = providers
        self._aliases = dict(config.aliases)
        self._models = dict(config.models)
        self._catalog = self._build_catalog()
        self._bare_names: dict[str, list[str]] = {}
        for entry in sorted(self._catalog.values(), key=lambda m: m.id):
            if not entry.alias_of and "/" in entry.id:
                self._bare_names.setdefault(entry.id.partition("/")[2], []).append(entry.id)
        self._check_models()

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
        if missing or not _implements(adapter, interface):
            feature = (missing[0] if missing else capability).value
            raise UnsupportedFeature(
                f"provider {adapter.name!r} does not support {feature} for model {route.upstream_model!r}",
                field="model",
                metadata={"provider": adapter.name, "feature": feature},
            )
        return route, adapter

    def plan(
        self,
        model: str,
        capability: Capability,
        interface: type[T],
        features: Iterable[Capability] = (),
        extra_fallbacks: Sequence[str] = (),
    ) -> Plan[T]:
        """Every deployment that may serve this call, in the order to try them.

        `extra_fallbacks` (the caller's own chain) come before the configured ones. The
        primary model must be able to serve the call (else the error says why); a
        fallback that cannot is skipped."""
        features = tuple(features)
        primary = self._group(model, capability, interface, features)
        config = self._models.get(model) or self._models.get(self._aliases.get(model, model))
        routing = self._config.routing

        def groups(names: Iterable[str]) -> list[ModelGroup[T]]:
            found: list[ModelGroup[T]] = []
            for name in dict.fromkeys(n for n in names if n != model):  # in order, once each
                try:
                    found.append(self._group(name, capability, interface, features))
                except GatewayError:
                    continue
            return found

        configured = config.fallbacks if config and config.fallbacks else routing.fallbacks
        return Plan(
            primary=primary,
            fallbacks=groups([*extra_fallbacks, *configured]),
            context_window_fallbacks=groups(config.context_window_fallbacks if config else ()),
            content_policy_fallbacks=groups(config.content_policy_fallbacks if config else ()),
            max_attempts=(config.max_attempts if config and config.max_attempts else routing.max_attempts),
            timeouts=self._timeouts_of(config),
        )

    def _timeouts_of(self, config: ModelRouteConfig | None) -> TimeoutsConfig:
        """The model's effective timeouts, merged once per model (not per call)."""
        key = id(config)
        merged = self._timeouts.get(key)
        if merged is None:
            routing = self._config.routing
            merged = _merged_timeouts(routing.timeouts, config.timeouts if config else None, self._upstream_timeout_s)
            self._timeouts[key] = merged
        return merged

    def deployments(self, model: str) -> list[str]:
        """The `provider/model` names of the deployments of `model` (for /status)."""
        config = self._models.get(model)
        if config is not None and config.deployments:
            return [f"{d.provider}/{d.model}" for d in config.deployments]
        return [self.route(model).public_model]

    def _group(
        self, model: str, capability: Capability, interface: type[T], features: tuple[Capability, ...]
    ) -> ModelGroup[T]:
        config = self._models.get(model)
        if config is None or not config.deployments:
            route, adapter = self.resolve(model, capability, interface, features)
            strategy = config.strategy if config else "weighted"
            return ModelGroup(model, [Target(route, adapter)], strategy)
        targets = []
        for deployment in config.deployments:
            route, adapter = self.resolve(f"{deployment.provider}/{deployment.model}", capability, interface, features)
            targets.append(Target(route, adapter, deployment.weight))
        return ModelGroup(model, targets, config.strategy)

    def _check_models(self) -> None:
        """Refuses at start a `models:` entry that names what does not exist."""
        for name, config in self._models.items():
            for deployment in config.deployments:
                if deployment.provider not in self._providers:
                    raise ModelNotFound(
                        f"model {name!r}: deployment provider {deployment.provider!r} is not configured "
                        f"(configured: {', '.join(sorted(self._providers)) or 'none'})",
                        field="models",
                    )
            if not config.deployments:
                self.route(name)  # a provider/model with fallbacks only: it must resolve
            for fallback in _fallbacks_of(config):
                if fallback not in self._models:
                    self.route(fallback)

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

    def configured_models(self) -> set[str]:
        """The model names the configuration declares (aliases and `models:` entries)."""
        return set(self._aliases) | set(self._models)

    def catalog(self) -> list[CatalogModel]:
        return sorted(self._catalog.values(), key=lambda m: m.id)

    def _unknown_provider(self, name: str) -> Exception:
        variable = api_key_variable(name)
        if name in SPECS and variable:
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
        for name, config in self._config.models.items():
            if not config.deployments:
                continue
            served = [catalog.get(f"{d.provider}/{d.model}") for d in config.deployments]
            caps = frozenset().union(
                *(
                    entry.capabilities
                    if entry
                    else getattr(self._providers.get(d.provider), "capabilities", frozenset())
                    for entry, d in zip(served, config.deployments, strict=True)
                )
            )
            catalog[name] = CatalogModel(name, "aigne-hub", caps)
        for alias, target in self._aliases.items():
            base = catalog.get(target)
            owner = target.partition("/")[0]
            provider = self._providers.get(owner)
            caps = base.capabilities if base else (provider.capabilities if provider else frozenset())
            catalog[alias] = CatalogModel(alias, owner, caps, alias_of=target)
        return catalog


def _fallbacks_of(config: ModelRouteConfig) -> list[str]:
    return [*config.fallbacks, *config.context_window_fallbacks, *config.content_policy_fallbacks]


def _merged_timeouts(defaults: TimeoutsConfig, model: TimeoutsConfig | None, ceiling: float) -> TimeoutsConfig:
    """The model's timeouts where it sets them, the defaults' elsewhere, the server's
    upstream limit (`AIGNE_HUB_UPSTREAM_READ_TIMEOUT_S`) where neither does, and never
    above that limit: the REST bridge's own limits are derived from it, so the server
    always decides first and says why."""
    model = model or TimeoutsConfig()

    def pick(name: str) -> float:
        value = getattr(model, name) or getattr(defaults, name) or ceiling
        return float(min(value, ceiling))

    return TimeoutsConfig(first_token_s=pick("first_token_s"), idle_s=pick("idle_s"), total_s=pick("total_s"))


_IMPLEMENTS: dict[tuple[type, type], bool] = {}


def _implements(adapter: object, interface: type[T]) -> TypeGuard[T]:
    """`isinstance(adapter, interface)` for a runtime-checkable Protocol, worked out once
    per adapter class: such a check walks the protocol's members each time (about 40 us
    on the test machine, on every call's route), and adapters' methods are their class's."""
    key = (type(adapter), interface)
    found = _IMPLEMENTS.get(key)
    if found is None:
        found = _IMPLEMENTS[key] = isinstance(adapter, interface)
    return found
