"""The gRPC server: services, health checking, reflection and graceful shutdown.

Shutdown lets calls in flight finish within the grace period; streams still open
shortly before it ends are interrupted with an error event (server.api.shutdown)
rather than cut silently. The ledger's spool replay task (server.accounts.spool)
runs for the gateway's lifetime.

A serving gateway also keeps its credit reservations' leases and sweeps expired ones
(see `server.accounts.credits`): started with the server, stopped after it drained.

Background work done once per `serve`, not once per worker: the sweep of expired
reservations and the periodic re-check of invalid credentials work on the shared
database, so N workers doing them would only multiply the queries and the probes sent
to providers. Worker 0 does them (`WorkerRole.keeps_shared_duties`); when it dies,
`serve` restarts it with the same index and they resume (a sweep runs at once on
start). Local models are preloaded there too; the other workers load one on its first
call, so a `local` provider that is configured but not called costs one copy, not N."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from typing import cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aigne.hub.v1 import (
    account_service_pb2,
    account_service_pb2_grpc,
    admin_service_pb2,
    admin_service_pb2_grpc,
    agent_service_pb2,
    agent_service_pb2_grpc,
    audio_service_pb2,
    audio_service_pb2_grpc,
    bridge_service_pb2_grpc,
    chat_service_pb2,
    chat_service_pb2_grpc,
    embedding_service_pb2,
    embedding_service_pb2_grpc,
    image_service_pb2,
    image_service_pb2_grpc,
    status_service_pb2,
    status_service_pb2_grpc,
)
from server.accounts.credits import rate_from_credits
from server.accounts.service import Accounts
from server.api.account import AccountServicer
from server.api.admin import AdminServicer
from server.api.agent import AgentServicer
from server.api.audio import AudioServicer
from server.api.auth import AuthInterceptor
from server.api.bridge import BridgeServicer
from server.api.chat import ChatServicer
from server.api.embeddings import EmbeddingServicer
from server.api.images import ImageServicer
from server.api.intake import IntakeInterceptor
from server.api.registration import GenericHandlersOnly
from server.api.shutdown import OpenStreams, interrupt_after
from server.api.status import ServingFlag, StatusServicer
from server.config import GatewayConfig, Settings, load_gateway_config
from server.limits import DefaultLimits, LimitStore, open_limiter
from server.memory import return_large_buffers_to_the_os, tune_garbage_collection
from server.observability import MetricsListener, instrument, serve_metrics
from server.observability.tracing import setup_tracing
from server.providers.base import CredentialProbe, Preloading, Provider
from server.providers.conversation_state import KeepsConversationState
from server.providers.registry import build_provider
from server.providers.transport import Transport, UpstreamLimits
from server.redaction import register_secret
from server.routing.attempts import Routing
from server.routing.cooldown import open_cooldowns
from server.routing.router import Router
from server.serving.hub import HubClient, HubCooldowns, HubCounters, WorkerRole
from server.storage.conversation import DatabaseConversationStore

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    chat_service_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name,
    embedding_service_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name,
    image_service_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name,
    audio_service_pb2.DESCRIPTOR.services_by_name["AudioService"].full_name,
    status_service_pb2.DESCRIPTOR.services_by_name["StatusService"].full_name,
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
    account_service_pb2.DESCRIPTOR.services_by_name["AccountService"].full_name,
]


def upstream_transport(settings: Settings) -> Transport:
    """The one upstream transport (server.providers.transport) with the settings' pool
    and waits; it opens its connection pool on the first request and closes it on
    shutdown. The call's credential, request id, trace context and deadline are put on
    each request by the transport, from the call."""
    return Transport(
        UpstreamLimits(
            connect_s=settings.upstream_connect_timeout_s,
            read_s=settings.upstream_read_timeout_s,
            pool_s=settings.upstream_connect_timeout_s,
            max_connections=settings.upstream_max_connections,
            keepalive_s=30.0,
        )
    )


@dataclass
class Gateway:
    """A running gRPC server and what it owns."""

    settings: Settings
    server: grpc.aio.Server
    port: int
    transport: Transport
    health: health.aio.HealthServicer
    serving: ServingFlag
    accounts: Accounts
    providers: dict[str, Provider] = field(default_factory=dict)
    streams: OpenStreams = field(default_factory=OpenStreams)
    spool_replay: asyncio.Task[None] | None = None
    routing: Routing | None = None
    metrics: MetricsListener | None = None

    async def stop(self, grace: float | None = None) -> None:
        """Stops taking calls, lets in-flight ones (streams too) finish within
        `grace` seconds, interrupts the streams still open just before it ends,
        then cancels the rest and releases the upstream client."""
        grace = self.settings.shutdown_grace_s if grace is None else grace
        self.serving.serving = False
        await self.health.enter_graceful_shutdown()
        stopping = asyncio.ensure_future(self.server.stop(grace))
        done, _ = await asyncio.wait({stopping}, timeout=interrupt_after(grace))
        if not done:
            self.streams.interrupt()
        await stopping
        await self.accounts.credits.stop_lease_keeping()
        for provider in self.providers.values():
            await provider.aclose()
        await self.transport.aclose()
        if self.routing is not None:
            await self.routing.aclose()
        if self.spool_replay is not None:
            self.spool_replay.cancel()
            await asyncio.gather(self.spool_replay, return_exceptions=True)
        await self.accounts.close()
        if self.metrics is not None:
            self.metrics.stop()


async def start_gateway(
    settings: Settings, config: GatewayConfig | None = None, worker: WorkerRole | None = None
) -> Gateway:
    """Builds and starts the gRPC server on settings.grpc_host:grpc_port (0: any port).

    As a worker of `serve --workers N` (`worker`): the supervisor did the once-only work
    (migrations, configured rates); the server also listens on the worker's Unix socket
    (Envoy's endpoint), shares the public port with the other workers (SO_REUSEPORT),
    and without Redis keeps its limit counters and cooldowns in the supervisor's hub."""
    return_large_buffers_to_the_os()
    if config is None:
        config = load_gateway_config(settings.config)
    accounts = await open_accounts(settings, migrate=False if worker is not None else None)
    if worker is None:
        await apply_configured_rates(accounts, config)
    duties = worker is None or worker.keeps_shared_duties
    hub = worker.hub if worker is not None and not settings.redis_url else None
    limit_rules = LimitStore(accounts.db, cache_ttl_s=settings.key_cache_ttl_s)
    if worker is not None:
        share_changes(worker.hub, accounts, limit_rules)
    accounts.limiter = open_limiter(
        limit_rules,
        settings.redis_url,
        defaults=DefaultLimits.from_config(config.limits.default_key),
        owner_defaults=DefaultLimits.from_config(config.limits.default_owner),
        on_redis_failure=settings.limits_on_redis_failure,
        budget_s=settings.limits_redis_budget_ms / 1000,
        lease_s=settings.limits_slot_lease_s,
        shared=HubCounters(hub) if hub is not None else None,
    )
    for secret in (settings.admin_token, settings.master_key, settings.key_pepper):
        register_secret(secret.get_secret_value() if secret else None)
    transport = upstream_transport(settings)
    providers = {name: build_provider(name, cfg, transport) for name, cfg in config.providers.items()}
    conversations = DatabaseConversationStore(accounts.db)
    for provider in providers.values():
        if isinstance(provider, KeepsConversationState):
            provider.keep_state_in(conversations, settings.conversation_state_ttl_s)
    for provider in providers.values():
        if duties and isinstance(provider, Preloading):
            provider.start_loading()
    router = Router(config, providers, upstream_timeout_s=settings.upstream_read_timeout_s)
    cooldowns = (
        HubCooldowns(hub, config.routing.cooldown)
        if hub is not None
        else open_cooldowns(settings.redis_url, config.routing.cooldown)
    )
    routing = Routing(config.routing, cooldowns)
    probes = {name: p.probe_credential for name, p in providers.items() if isinstance(p, CredentialProbe)}
    accounts.watch_credentials(probes, settings.credential_recheck_s, recheck=duties)
    setup_tracing()
    gateway_metrics = instrument(
        accounts, routing, router, metrics_on=settings.metrics_enabled, owner_labels=settings.metrics_owner_labels
    )
    metrics = None
    if gateway_metrics is not None:
        metrics_port = settings.metrics_port
        if worker is not None and metrics_port:
            metrics_port += worker.index  # one listener per worker: 9464, 9465, ...
        metrics = serve_metrics(gateway_metrics, settings.metrics_host, metrics_port)
    serving = ServingFlag()
    streams = OpenStreams()
    limit = settings.max_message_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # Workers share the public port; a single server refuses a port in use.
            ("grpc.so_reuseport", 1 if worker is not None else 0),
        ],
        interceptors=[
            AuthInterceptor(accounts, settings.admin_token.get_secret_value() if settings.admin_token else None),
            IntakeInterceptor(settings.default_call_deadline_s),
        ],
    )
    # Every service as a generic handler only: why in server.api.registration.
    services = cast(grpc.aio.Server, GenericHandlersOnly(server))
    chat = ChatServicer(router, accounts, streams, routing)
    images = ImageServicer(router, accounts, routing)
    chat_service_pb2_grpc.add_ChatServiceServicer_to_server(chat, services)
    # OpenAI's REST chat paths: the same calls, answered with the bytes the client gets.
    bridge_service_pb2_grpc.add_BridgeServiceServicer_to_server(BridgeServicer(chat), services)
    embedding_service_pb2_grpc.add_EmbeddingServiceServicer_to_server(
        EmbeddingServicer(router, accounts, routing), services
    )
    image_service_pb2_grpc.add_ImageServiceServicer_to_server(images, services)
    # AIGNE's agent protocol, served by the same chat and image servicers in process.
    agent_service_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(router, accounts, chat, images), services)
    audio_service_pb2_grpc.add_AudioServiceServicer_to_server(AudioServicer(router, accounts, routing), services)
    deployments = [f"{d.provider}/{d.model}" for route in config.models.values() for d in route.deployments]
    admin = AdminServicer(accounts, providers, deployments=deployments, cooldowns=routing.cooldowns)
    admin_service_pb2_grpc.add_AdminServiceServicer_to_server(admin, services)
    account_service_pb2_grpc.add_AccountServiceServicer_to_server(AccountServicer(accounts), services)
    status = StatusServicer(router, serving, routing, accounts.vault)
    status_service_pb2_grpc.add_StatusServiceServicer_to_server(status, services)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, services)
    # (Reflection's one method stays registered: it checks for a grpc.aio.Server.)
    reflection.enable_server_reflection(
        [*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
    if port == 0:
        raise OSError(f"cannot listen on {settings.grpc_host}:{settings.grpc_port}")
    if worker is not None and server.add_insecure_port(f"unix:{worker.socket}") == 0:
        raise OSError(f"cannot listen on the worker socket {worker.socket}")
    await server.start()
    accounts.credits.start_lease_keeping(sweep=duties)
    for name in ["", *SERVICE_NAMES]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if worker is not None:
        await follow_bridge_health(worker.hub, health_servicer)
    log.info("gRPC server listening on %s:%d (providers: %s)", settings.grpc_host, port, ", ".join(providers) or "none")
    tune_garbage_collection()
    replayer = accounts.spool_replayer(settings.spool_replay_interval_s)
    replay = asyncio.create_task(replayer.run(), name="ledger-spool-replay") if replayer else None
    return Gateway(
        settings,
        server,
        port,
        transport,
        health_servicer,
        serving,
        accounts,
        providers,
        streams,
        replay,
        routing,
        metrics,
    )


async def open_accounts(settings: Settings, migrate: bool | None = None) -> Accounts:
    """The accounts of these settings; `migrate` as `Database.open` takes it."""
    return await Accounts.open(
        settings,
        auth_required=settings.auth_required,
        billing_enabled=settings.billing_enabled,
        key_cache_ttl_s=settings.key_cache_ttl_s,
        key_negative_cache_ttl_s=settings.key_negative_cache_ttl_s,
        key_cache_outage_grace_s=settings.key_cache_outage_grace_s,
        key_pepper=settings.key_pepper.get_secret_value().encode() if settings.key_pepper else None,
        master_key=settings.master_key.get_secret_value() if settings.master_key else None,
        reservation_lease_s=settings.reservation_lease_s,
        credit_block_calls=settings.credit_block_calls,
        migrate=migrate,
    )


def share_changes(hub: HubClient, accounts: Accounts, limit_rules: LimitStore) -> None:
    """A key revoked (or its cap changed) or a limit rule changed through one worker's
    admin API takes effect on every worker at once, not within the cache TTL."""
    accounts.keys.on_change = lambda key_id: hub.send("invalidate", key_id=key_id)
    limit_rules.on_change = lambda: hub.send("invalidate", key_id=None)

    def forget(key_id: str | None) -> None:
        if key_id is None:
            limit_rules.invalidate()
        else:
            accounts.keys.invalidate(key_id)

    hub.on_invalidate = forget


async def follow_bridge_health(hub: HubClient, health_servicer: health.aio.HealthServicer) -> None:
    """A worker's health for "" (the whole gateway) follows the supervisor's REST bridge."""

    async def bridge(up: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        await health_servicer.set("", status)

    hub.on_bridge = bridge
    await bridge(hub.bridge_up)


async def apply_configured_rates(accounts: Accounts, config: GatewayConfig) -> None:
    for model, rate in config.rates.items():
        await accounts.credits.set_rate(rate_from_credits(model, rate.model_dump()))


async def serve_until_signalled(settings: Settings) -> None:
    """Runs the gRPC server until SIGTERM or SIGINT, then shuts down gracefully."""
    gateway = await start_gateway(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"gRPC listening on {settings.grpc_host}:{gateway.port}", flush=True)
    await stop.wait()
    log.info("shutting down: draining in-flight calls for up to %.0f s", settings.shutdown_grace_s)
    await gateway.stop()
