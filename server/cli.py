"""The `aigne-hub` command.

aigne-hub serve          gRPC server(s) and the Envoy REST bridge together
aigne-hub worker         one worker process of `serve --workers N` (started by serve)
aigne-hub grpc           the gRPC server alone
aigne-hub envoy-config   print the Envoy configuration `serve` would use
"""

from __future__ import annotations

import os

# Envoy is started as a child process; grpc's fork handlers are not needed for that
# and only print warnings. Must be set before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse
import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2

from server.accounts.cli import add_commands as add_account_commands
from server.accounts.cli import run as run_account_command
from server.accounts.credentials import MasterKeyError
from server.app import Gateway, apply_configured_rates, open_accounts, serve_until_signalled, start_gateway
from server.bridge.envoy_config import LUA_PATH, bridge_timeouts, render_envoy_config
from server.bridge.process import EnvoyProcess, Listen, check_ports_free
from server.bridge.supervisor import supervise
from server.config import ConfigError, GatewayConfig, Settings, cores, load_gateway_config
from server.memory import trace_allocations_if_asked
from server.observability.logs import configure_logging
from server.providers.registry import enabling_variables
from server.serving.hub import Hub, HubClient, WorkerRole
from server.serving.workers import RUN_DIR_PREFIX, WorkerPool, remove_stale_run_dirs
from server.storage.database import StorageError

ACCOUNT_COMMANDS = frozenset({"keys", "credits", "usage", "credentials", "limits", "migrate"})
# Longest Unix socket path Linux takes (sun_path is 108 bytes, NUL included), with margin.
UNIX_PATH_MAX = 100
DESCRIPTOR_PATH = Path(__file__).resolve().parent.parent / "generated" / "descriptor.binpb"
log = logging.getLogger("aigne_hub")


def envoy_yaml(settings: Settings, grpc_port: int, endpoints_file: Path | None = None) -> str:
    """The bridge configuration for these settings, pointing at `grpc_port` (or at the
    workers' sockets); Envoy's timeouts are derived from the server's upstream timeout,
    so the server decides first."""
    return render_envoy_config(
        rest_host=settings.rest_host,
        rest_port=settings.rest_port,
        grpc_host=settings.grpc_host,
        grpc_port=grpc_port,
        admin_port=settings.admin_port,
        descriptor_path=DESCRIPTOR_PATH,
        lua_path=LUA_PATH,
        max_request_bytes=settings.max_message_bytes,
        max_response_bytes=settings.max_message_bytes,
        grpc_endpoints_file=endpoints_file,
        **bridge_timeouts(settings.upstream_read_timeout_s),
    )


async def wait_for_bridge(rest_url: str, timeout_s: float = 15.0) -> None:
    """Waits until a REST call crosses Envoy and reaches the gRPC server."""
    import httpx  # here: workers import this module and never call it

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with httpx.AsyncClient(timeout=1.0, trust_env=False) as client:
        while loop.time() < deadline:
            try:
                if (await client.get(f"{rest_url}/status")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)
    raise TimeoutError(f"the REST bridge at {rest_url} did not become healthy in {timeout_s} s")


def bridge_listens(settings: Settings) -> list[Listen]:
    return [
        Listen("REST", settings.rest_host, settings.rest_port),
        Listen("Envoy admin", "127.0.0.1", settings.admin_port),
    ]


def bridge_process(
    settings: Settings, grpc_port: int, endpoints_file: Path | None = None, *, workers: int = 1
) -> EnvoyProcess:
    """The Envoy of `serve`: checks its ports before each start and logs no secrets.

    One Envoy worker thread per gRPC worker, up to the cores: Envoy's share of a chat
    call is about a third of the server's, so its threads never outrun the workers',
    and with one gRPC worker one thread took 3-5 % less CPU per call than one per core
    (paired A/B, 2 cores, c=16 and c=64: its requests meet in fewer, fuller turns of
    one event loop); with two workers two threads and one measured the same."""
    return EnvoyProcess(
        envoy_yaml(settings, grpc_port, endpoints_file),
        admin_url=f"http://127.0.0.1:{settings.admin_port}",
        log_level=settings.envoy_log_level,
        listens=bridge_listens(settings),
        threads=min(workers, cores()),
    )


async def serve(settings: Settings) -> None:
    """Starts gRPC and Envoy, waits for both, runs until SIGTERM/SIGINT, stops both.

    Envoy is supervised (server.bridge.supervisor): restarted when it dies, and gRPC
    health for "" (the whole gateway) is NOT_SERVING while the REST bridge is down.
    """
    # Before anything is opened or loaded (local models take seconds): a taken port
    # fails the start at once.
    check_ports_free(bridge_listens(settings))
    gateway: Gateway = await start_gateway(settings)
    envoy = bridge_process(settings, gateway.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    rest_url = f"http://{settings.rest_host}:{settings.rest_port}"

    async def bridge_health(up: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        await gateway.health.set("", status)

    try:
        await bridge_health(False)
        await envoy.start()
        await wait_for_bridge(rest_url)
        await bridge_health(True)
        print(
            f"aigne-hub ready: REST {rest_url} (OpenAI base_url {rest_url}/v1, dashboard {rest_url}/ui/), "
            f"gRPC {settings.grpc_host}:{gateway.port}, Envoy log {envoy.log_path}",
            flush=True,
        )
        _print_hints(gateway)
        await supervise(envoy, stop, bridge_health, lambda: wait_for_bridge(rest_url))
        print("aigne-hub stopping: draining in-flight calls", flush=True)
    finally:
        await gateway.stop()
        await envoy.stop()
    print("aigne-hub stopped", flush=True)


async def serve_workers(settings: Settings) -> None:
    """`serve` with `settings.workers` gRPC processes (server.serving.workers): the
    once-only work here, then the hub, the workers, Envoy; runs until SIGTERM/SIGINT,
    restarting whatever dies; then drains every worker and stops Envoy."""
    grpc = Listen("gRPC", settings.grpc_host, settings.grpc_port or free_port(settings.grpc_host))
    check_ports_free([*bridge_listens(settings), grpc])
    config = load_gateway_config(settings.config)
    await prepare_storage(settings, config)
    remove_stale_run_dirs()
    run_dir = Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-"))
    if len(str(run_dir / f"worker-{settings.workers}.sock")) > UNIX_PATH_MAX:
        shutil.rmtree(run_dir, ignore_errors=True)  # a long TMPDIR: sockets need short paths
        run_dir = Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-", dir="/tmp"))
    hub = Hub(run_dir / "hub.sock", config.routing.cooldown)
    env = {**os.environ, "AIGNE_HUB_GRPC_HOST": grpc.host, "AIGNE_HUB_GRPC_PORT": str(grpc.port)}
    if settings.config is not None:
        env["AIGNE_HUB_CONFIG"] = str(settings.config.resolve())
    pool = WorkerPool(settings.workers, run_dir, hub, env)
    envoy = bridge_process(settings, grpc.port, pool.endpoints_file, workers=settings.workers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    rest_url = f"http://{settings.rest_host}:{settings.rest_port}"

    async def bridge_health(up: bool) -> None:
        hub.set_bridge(up)

    try:
        await hub.start()
        await pool.start()
        pool.publish()
        await envoy.start()
        await wait_for_bridge(rest_url)
        await wait_for_healthy_workers(envoy.admin_url, len(pool.workers))
        hub.set_bridge(True)
        print(
            f"aigne-hub ready: REST {rest_url} (OpenAI base_url {rest_url}/v1), gRPC {grpc.host}:{grpc.port} "
            f"({settings.workers} workers, pids {' '.join(str(w.pid) for w in pool.workers)}), "
            f"Envoy log {envoy.log_path}",
            flush=True,
        )
        await _first_of(supervise(envoy, stop, bridge_health, lambda: wait_for_bridge(rest_url)), pool.supervise(stop))
        print("aigne-hub stopping: draining in-flight calls", flush=True)
    finally:
        stop.set()
        await pool.stop(settings.shutdown_grace_s + 15)
        await envoy.stop()
        await hub.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    print("aigne-hub stopped", flush=True)


async def wait_for_healthy_workers(admin_url: str, count: int, timeout_s: float = 15.0) -> None:
    """Until Envoy's health checks pass for `count` workers: before that, Envoy sends
    every call to the workers already checked (or, with none, to all in panic mode)."""
    import httpx  # here: workers import this module and never call it

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with httpx.AsyncClient(timeout=1.0, trust_env=False) as client:
        while loop.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                text = (await client.get(f"{admin_url}/clusters")).text
                if text.count("::health_flags::healthy") >= count:
                    return
            await asyncio.sleep(0.1)
    log.warning("Envoy's health checks did not pass for all %d workers within %.0f s", count, timeout_s)


async def _first_of(*coroutines: Coroutine[Any, Any, None]) -> None:
    """Runs until the first returns (or raises, which is re-raised); cancels the others."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def prepare_storage(settings: Settings, config: GatewayConfig) -> None:
    """The work done once before workers start: migrations (SQLite), configured rates."""
    accounts = await open_accounts(settings)
    try:
        await apply_configured_rates(accounts, config)
    finally:
        await accounts.close()


def free_port(host: str) -> int:
    """A port free now (for `--grpc-port 0` with workers: they must share one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


async def serve_worker(settings: Settings, index: int, socket_path: Path, hub_path: Path) -> None:
    """One worker of `serve --workers N` (started by it): serves until SIGTERM/SIGINT."""
    trace_allocations_if_asked()
    hub = await HubClient.connect(hub_path)
    gateway = await start_gateway(settings, worker=WorkerRole(index, socket_path, hub))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    hub.send("ready", index=index, pid=os.getpid())
    if index == 0:
        _print_hints(gateway)
    await stop.wait()
    log.info("worker %d shutting down: draining in-flight calls for up to %.0f s", index, settings.shutdown_grace_s)
    await gateway.stop()
    await hub.aclose()


def _print_hints(gateway: Gateway) -> None:
    """What a first-time user needs next: a provider, and a key to call with."""
    if not gateway.providers:
        first, *others = enabling_variables()
        print(
            f"aigne-hub: no provider is configured, so every model is refused: set {first} "
            f"(or {', '.join(others[:4])}, ...) or pass --config",
            flush=True,
        )
    if gateway.settings.auth_required:
        print("aigne-hub: calls need an API key: `aigne-hub keys create --owner user:NAME --name NAME`", flush=True)


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        key: value
        for key, value in {
            "grpc_host": getattr(args, "grpc_host", None),
            "grpc_port": getattr(args, "grpc_port", None),
            "rest_host": getattr(args, "rest_host", None),
            "rest_port": getattr(args, "rest_port", None),
            "admin_port": getattr(args, "admin_port", None),
            "config": getattr(args, "config", None),
            "workers": getattr(args, "workers", None),
        }.items()
        if value is not None
    }
    return Settings(**overrides)


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this is a fallback
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="aigne-hub", description="AIGNE Hub: a unified AI gateway over gRPC and REST."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [
        ("serve", "run the gRPC server and the Envoy REST bridge"),
        ("grpc", "run the gRPC server alone"),
        ("envoy-config", "print the Envoy configuration that `serve` would use"),
    ]:
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--config", type=Path, help="YAML file of providers and aliases (env AIGNE_HUB_CONFIG)")
        command.add_argument("--grpc-host", help="gRPC listen address (default 127.0.0.1)")
        command.add_argument("--grpc-port", type=int, help="gRPC port (default 50051)")
        command.add_argument("--rest-host", help="REST listen address (default 127.0.0.1)")
        command.add_argument("--rest-port", type=int, help="REST port (default 8080)")
        command.add_argument("--admin-port", type=int, help="Envoy admin port, loopback only (default 9901)")
        if name == "serve":
            command.add_argument(
                "--workers", type=int, help="gRPC server processes (env AIGNE_HUB_WORKERS; default: one per core)"
            )
    worker = sub.add_parser("worker", help="one worker process of `serve --workers N` (started by serve)")
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--socket", type=Path, required=True)
    worker.add_argument("--hub", type=Path, required=True)
    add_account_commands(sub)
    args = parser.parse_args(argv)
    try:
        settings = _settings(args)
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging(settings.log_level, settings.log_format)
    # httpx (the admin commands' and readiness probes' client) logs each request at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        if args.command in ACCOUNT_COMMANDS:
            _run(run_account_command(args, settings))
        elif args.command == "envoy-config":
            print(envoy_yaml(settings, settings.grpc_port))
        elif args.command == "grpc":
            _run(serve_until_signalled(settings))
        elif args.command == "worker":
            _run(serve_worker(settings, args.index, args.socket, args.hub))
        elif settings.workers > 1:
            _run(serve_workers(settings))
        else:
            _run(serve(settings))
    except ConfigError as exc:
        print(f"aigne-hub: {exc}", file=sys.stderr)
        sys.exit(2)
    except (OSError, TimeoutError, RuntimeError, StorageError, MasterKeyError) as exc:
        print(f"aigne-hub: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
