"""Configuration: process settings from the environment, providers from a YAML file.

Settings (`AIGNE_HUB_*` variables, all optional):
    AIGNE_HUB_GRPC_HOST / AIGNE_HUB_GRPC_PORT   gRPC listener, default 127.0.0.1:50051
    AIGNE_HUB_REST_HOST / AIGNE_HUB_REST_PORT   REST bridge (Envoy), default 127.0.0.1:8080
    AIGNE_HUB_ADMIN_PORT                        Envoy admin (loopback only), default 9901
    AIGNE_HUB_WORKERS                           gRPC processes of `serve`, default one per core
    AIGNE_HUB_CONFIG                            YAML file of providers, models, aliases
    AIGNE_HUB_MAX_MESSAGE_BYTES                 request/response size limit, default 32 MiB
    AIGNE_HUB_DEFAULT_CALL_DEADLINE_S           deadline of calls that send none, default 600
    AIGNE_HUB_DATA_DIR / AIGNE_HUB_DATABASE_URL SQLite file's folder / a PostgreSQL URL
    AIGNE_HUB_BILLING_ENABLED                   charge credits (default off)
    AIGNE_HUB_UPSTREAM_READ_TIMEOUT_S           upstream silence limit; Envoy's limits derive from it
    AIGNE_HUB_ENVOY_LOG_LEVEL                   info, warning (default), error, critical, off
    AIGNE_HUB_REDIS_URL                         shared cooldowns and rate-limit counters
    AIGNE_HUB_LIMITS_ON_REDIS_FAILURE           open (default) or closed
    AIGNE_HUB_METRICS_HOST / AIGNE_HUB_METRICS_PORT  Prometheus /metrics, default 127.0.0.1:9464
    AIGNE_HUB_LOG_LEVEL / AIGNE_HUB_LOG_FORMAT  INFO; text (default) or json lines
    ...                                         see `Settings` for the rest

Providers: with a YAML file, exactly the providers it lists; without one, every
provider whose official SDK variables are set (`OPENAI_API_KEY`, `OPENAI_BASE_URL`),
and the packaged `local` models when the `[local]` extra is installed
(`AIGNE_HUB_LOCAL=false` turns them off; server.providers.local has their settings).
Secrets belong in the environment: the file names the variable (`api_key_env`).
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import SettingsConfigDict

from server.accounts.settings import AccountsSettings
from server.bridge.envoy_config import check_envoy_log_level
from server.providers.base import Capability
from server.storage.settings import StorageSettings

MIB = 1024 * 1024


def cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Settings(StorageSettings, AccountsSettings):
    """Process settings, read from `AIGNE_HUB_*` environment variables (storage and
    accounts settings included: data dir, database URL, billing, key cache, master key)."""

    model_config = SettingsConfigDict(env_prefix="AIGNE_HUB_", extra="ignore")

    # Every call but health checks and an anonymous /status needs an API key. Turning
    # this off (trusted networks, tests of other things) records usage without a key.
    auth_required: bool = True
    # The credential of AdminService (`Authorization: Bearer <token>`); unset: the
    # admin API is closed (the `aigne-hub keys|credits|usage` CLI still works locally).
    admin_token: SecretStr | None = None

    # gRPC server processes of `aigne-hub serve` (server.serving); default: one per core.
    workers: int = Field(default_factory=lambda: cores(), ge=1, le=256)
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(50051, ge=0, le=65535)
    rest_host: str = "127.0.0.1"
    rest_port: int = Field(8080, ge=0, le=65535)
    admin_port: int = Field(9901, ge=0, le=65535)
    config: Path | None = None
    # One limit for request and response messages, in gRPC and in Envoy's buffers.
    max_message_bytes: int = Field(32 * MIB, ge=MIB, le=512 * MIB)
    upstream_connect_timeout_s: float = Field(10.0, gt=0)
    # The longest the server waits on upstreams: for an answer (a whole unary answer; a
    # stream's first chunk and each gap between chunks) and for a whole call, retries and
    # fallbacks included. It is the default of the routing timeouts and their ceiling;
    # the server then fails the call itself with UPSTREAM_TIMEOUT. Envoy's limits are
    # derived from this one and are longer.
    upstream_read_timeout_s: float = Field(600.0, gt=0)
    # Envoy's log level; debug and trace are refused (they log authorization headers).
    envoy_log_level: Annotated[str, AfterValidator(check_envoy_log_level)] = "warning"
    # Graceful shutdown: how long in-flight calls (streams included) may take to finish.
    shutdown_grace_s: float = Field(30.0, ge=0)
    # The deadline of a call that sends none (server.api.intake): no call is held forever.
    default_call_deadline_s: float = Field(600.0, gt=0)
    upstream_max_connections: int = Field(1000, ge=1)
    # Redis for state every replica must share (deployment cooldowns); unset: each
    # process keeps its own. E.g. redis://127.0.0.1:6379/0.
    redis_url: str | None = None
    # Rate limits (server.limits) when Redis fails or takes longer than the budget:
    # "open" serves through this process's own counters, "closed" answers 503.
    limits_on_redis_failure: Literal["open", "closed"] = "open"
    limits_redis_budget_ms: float = Field(50.0, gt=0, le=60_000)
    # A call-in-flight slot's lease: renewed while the call runs; a crashed replica's
    # slots are free again within it.
    limits_slot_lease_s: float = Field(60.0, ge=1, le=3600)
    # How long state a conversation needs on its next turn (Anthropic's thinking blocks,
    # Gemini's thought signatures) is kept in the database for any replica to find.
    conversation_state_ttl_s: float = Field(86_400.0, ge=60, le=30 * 86_400)
    log_level: str = "INFO"
    # `text` (readable, the default) or `json` (one object per line; server.observability.logs).
    log_format: Literal["text", "json"] = "text"
    # Prometheus `/metrics` on its own listener (server.observability); port 0: any free port.
    metrics_enabled: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9464, ge=0, le=65535)
    # Per-owner series (aigne_hub_owner_*): one per owner, so off by default.
    metrics_owner_labels: bool = False


def _models_list(value: Any) -> Any:
    """Accepts `models: [name, ...]` as well as `models: [{id: name, ...}, ...]`."""
    if isinstance(value, list):
        return [{"id": item} if isinstance(item, str) else item for item in value]
    return value


class ModelEntry(BaseModel):
    """One catalog model of a provider."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    # Narrows what the provider can do for this model; default: all of it.
    capabilities: list[Capability] | None = None


class ProviderConfig(BaseModel):
    """One provider: which adapter speaks to it, where, and with which credential."""

    model_config = ConfigDict(extra="forbid")

    # The spec it is built from (a key of `registry.SPECS`); default:
    # the provider's own name.
    type: str | None = None
    base_url: str | None = None
    # The environment variable that holds the API key (preferred over `api_key`).
    api_key_env: str | None = None
    api_key: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    # Azure OpenAI's `api-version` (default: OPENAI_API_VERSION, as its SDK reads it).
    api_version: str | None = None
    models: Annotated[list[ModelEntry], BeforeValidator(_models_list)] = Field(default_factory=list)
    # When true, models outside `models` are refused with MODEL_NOT_FOUND instead of
    # being passed to the provider, which knows best which models it has.
    strict_models: bool = False

    def resolved_api_key(self) -> str | None:
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return self.api_key


class RateConfig(BaseModel):
    """What a model (or glob) costs, in credits; written to the database on start."""

    model_config = ConfigDict(extra="forbid")

    input_per_million: Decimal = Decimal(0)
    output_per_million: Decimal = Decimal(0)
    cached_input_per_million: Decimal = Decimal(0)
    per_image: Decimal = Decimal(0)
    per_audio_second: Decimal = Decimal(0)
    per_character: Decimal = Decimal(0)


class DeploymentConfig(BaseModel):
    """One upstream that can serve a public model: a configured provider (its own base
    URL and credential), the model name it knows, and a share of the traffic."""

    model_config = ConfigDict(extra="forbid")

    provider: str = Field(min_length=1)
    model: str = Field(min_length=1)
    # Relative share under the `weighted` strategy.
    weight: float = Field(1.0, gt=0, le=1_000_000)


class TimeoutsConfig(BaseModel):
    """How long one attempt may take (seconds; unset: the routing defaults').

    first_token_s: until the first streamed chunk, or until a unary answer's response.
    idle_s: between two streamed chunks. total_s: the whole client call, all attempts
    and backoffs included (a shorter gRPC deadline or `x-aigne-hub-timeout-s` wins)."""

    model_config = ConfigDict(extra="forbid")

    first_token_s: float | None = Field(None, gt=0, le=86_400)
    idle_s: float | None = Field(None, gt=0, le=86_400)
    total_s: float | None = Field(None, gt=0, le=86_400)


Strategy = Literal["weighted", "least-busy", "latency"]


class ModelRouteConfig(BaseModel):
    """A public model: the deployments that serve it and where to go when they cannot.

    The key in `models:` is what clients call: a name of your own (`smart`) or a
    `provider/model` (which then needs no `deployments`: it is its own deployment)."""

    model_config = ConfigDict(extra="forbid")

    strategy: Strategy = "weighted"
    deployments: list[DeploymentConfig] = Field(default_factory=list)
    # Models tried in order once this model's deployments are exhausted.
    fallbacks: list[str] = Field(default_factory=list)
    # A model with a larger context window, tried when the prompt is too long.
    context_window_fallbacks: list[str] = Field(default_factory=list)
    # Models tried when the provider refuses the content on policy grounds.
    content_policy_fallbacks: list[str] = Field(default_factory=list)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    # Attempts across deployments and fallbacks (unset: the routing default).
    max_attempts: int | None = Field(None, ge=1, le=20)


class CooldownConfig(BaseModel):
    """When a deployment rests: `failures` failures within `window_s`, or more than half
    of at least `min_calls` calls failing in the window, or a 429. It rests for the
    provider's Retry-After, else `rest_s` doubling on each repeated trip up to
    `max_rest_s`; after that one trial call decides."""

    model_config = ConfigDict(extra="forbid")

    # False: no deployment ever rests (every call tries them all).
    enabled: bool = True
    failures: int = Field(3, ge=1, le=1000)
    window_s: float = Field(60.0, gt=0, le=3600)
    min_calls: int = Field(10, ge=1, le=100_000)
    rest_s: float = Field(5.0, gt=0, le=3600)
    max_rest_s: float = Field(300.0, gt=0, le=86_400)


class RoutingConfig(BaseModel):
    """Defaults for every model (`routing:` in the YAML file)."""

    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(3, ge=1, le=20)
    fallbacks: list[str] = Field(default_factory=list)
    # Exponential backoff with full jitter between attempts on the same deployment:
    # base * 2^(n-1), at most max_backoff_s; a Retry-After hint is honoured up to
    # max_retry_after_s (a longer hint rests the deployment instead of waiting).
    backoff_base_s: float = Field(0.25, ge=0, le=60)
    max_backoff_s: float = Field(8.0, ge=0, le=600)
    max_retry_after_s: float = Field(30.0, ge=0, le=3600)
    # Unset parts come from AIGNE_HUB_UPSTREAM_READ_TIMEOUT_S (default 600 s), which is
    # also the most any model may set (the REST bridge's limits are derived from it).
    timeouts: TimeoutsConfig = Field(default_factory=lambda: TimeoutsConfig(idle_s=300.0))
    cooldown: CooldownConfig = Field(default_factory=CooldownConfig)


class KeyLimitsConfig(BaseModel):
    """Limits of every key (or owner) that has no rule of its own for all models."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(None, ge=1, le=10**12)
    tpm: int | None = Field(None, ge=1, le=10**12)
    concurrency: int | None = Field(None, ge=1, le=10**12)
    # Credits per UTC day / calendar month (decimals, e.g. 2.5), as `limits set
    # --daily-credits` takes them: from 0.000001 to 1000000 credits.
    daily_credits: Decimal | None = Field(None, ge=Decimal("0.000001"), le=10**6, allow_inf_nan=False)
    monthly_credits: Decimal | None = Field(None, ge=Decimal("0.000001"), le=10**6, allow_inf_nan=False)


class LimitsConfig(BaseModel):
    """`limits:` in the YAML file: defaults for every key (`default_key: {rpm: 600}`) and
    for every owner, all its keys together (`default_owner: {daily_credits: 50}`)."""

    model_config = ConfigDict(extra="forbid")

    default_key: KeyLimitsConfig = Field(default_factory=KeyLimitsConfig)
    default_owner: KeyLimitsConfig = Field(default_factory=KeyLimitsConfig)


class GatewayConfig(BaseModel):
    """The YAML file's schema."""

    model_config = ConfigDict(extra="forbid")

    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    # `alias: provider/model`, e.g. `fast: openai/gpt-4o-mini` (a model with one deployment).
    aliases: dict[str, str] = Field(default_factory=dict)
    # Public models with deployments, fallbacks and timeouts (see ModelRouteConfig).
    models: dict[str, ModelRouteConfig] = Field(default_factory=dict)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    # `provider/model` or a glob (`openai/*`, `*`): its rates. The admin API can change
    # rates at run time; the file's are applied again at each start.
    rates: dict[str, RateConfig] = Field(default_factory=dict)
    # Rate limits applied to every key (rules per key or owner are set at run time).
    limits: LimitsConfig = Field(default_factory=LimitsConfig)


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid."""


def load_gateway_config(path: Path | None, environ: dict[str, str] | None = None) -> GatewayConfig:
    """The file's configuration, or the one implied by SDK environment variables."""
    if path is None:
        return config_from_environment(dict(os.environ) if environ is None else environ)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    try:
        return GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"config file {path} is invalid:\n{exc}") from exc


def config_from_environment(environ: dict[str, str]) -> GatewayConfig:
    """Providers enabled by the variables their official SDKs read; each provider's
    spec names its own (`server.providers.spec`)."""
    # Imported here: the registry builds on this module's ProviderConfig and ModelEntry.
    from server.providers.registry import providers_from_environment

    return GatewayConfig(providers=providers_from_environment(environ))
