"""Starts what the benchmark measures, each in its own process, and stops it all.

fake upstream  Envoy direct_response (fake_upstream.py)
gRPC server    `python -m server.cli grpc` with a YAML config naming two providers
REST bridge    Envoy with the production configuration (server.cli.envoy_yaml)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from server.bridge.process import EnvoyProcess
from server.cli import envoy_yaml, wait_for_bridge
from server.config import Settings
from tests.bench import procstat
from tests.bench.fake_upstream import render_fake_config

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Stack:
    rest_url: str
    fake_url: str
    gateway_pid: int
    bridge_pid: int | None
    fake_pid: int | None
    bridge_admin: str
    fake_admin: str
    # A key of the gateway's own ledger: the bench measures with authentication and
    # usage recording on, as the gateway runs in production.
    api_key: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def gateway_config(fake_url: str) -> str:
    """Two providers on one fake: `json/...` answers JSON, `sse/...` answers a stream."""
    providers = {
        name: {"type": "openai", "base_url": f"{fake_url}/{name}/v1", "api_key": "sk-bench"} for name in ("json", "sse")
    }
    return yaml.safe_dump({"providers": providers})


@contextlib.asynccontextmanager
async def running(work_dir: Path) -> AsyncIterator[Stack]:
    """Everything started and answering; on exit (error and Ctrl-C included) stopped."""
    fake_port, grpc_port = free_port(), free_port()
    fake_url = f"http://127.0.0.1:{fake_port}"
    fake = _envoy(render_fake_config(port=fake_port, admin_port=free_port()), work_dir / "fake")
    settings = Settings(grpc_port=grpc_port, rest_port=free_port(), admin_port=free_port())
    bridge = _envoy(envoy_yaml(settings, grpc_port), work_dir / "bridge")
    gateway: asyncio.subprocess.Process | None = None
    try:
        await fake.start()
        api_key = await _create_key(work_dir)
        gateway = await _start_gateway(grpc_port, gateway_config(fake_url), work_dir)
        await bridge.start()
        rest_url = f"http://127.0.0.1:{settings.rest_port}"
        await _wait_healthy(rest_url, gateway, work_dir / "gateway.log")
        yield Stack(
            rest_url=rest_url,
            fake_url=fake_url,
            gateway_pid=gateway.pid,
            bridge_pid=procstat.child_pid(str(bridge.config_path)),
            fake_pid=procstat.child_pid(str(fake.config_path)),
            bridge_admin=bridge.admin_url,
            fake_admin=fake.admin_url,
            api_key=api_key,
        )
    finally:
        await _stop_all(gateway, bridge, fake)


def _envoy(config: str, work_dir: Path) -> EnvoyProcess:
    return EnvoyProcess(config, admin_url=_admin_url(config), work_dir=work_dir)


def _admin_url(config: str) -> str:
    admin = yaml.safe_load(config)["admin"]["address"]["socket_address"]
    return f"http://{admin['address']}:{admin['port_value']}"


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _gateway_env(work_dir: Path) -> dict[str, str]:
    return {**os.environ, "AIGNE_HUB_DATA_DIR": str(work_dir / "data")}


async def _create_key(work_dir: Path) -> str:
    """A key made with `aigne-hub keys create`, in the bench's own data dir."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server.cli",
        "keys",
        "create",
        "--owner",
        "project:bench",
        "--name",
        "bench",
        "--json",
        cwd=REPO,
        env=_gateway_env(work_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"aigne-hub keys create failed: {stderr.decode()}")
    secret: str = json.loads(stdout)["secret"]
    return secret


async def _start_gateway(grpc_port: int, config: str, work_dir: Path) -> asyncio.subprocess.Process:
    config_path = _write(work_dir / "gateway.yaml", config)
    with open(work_dir / "gateway.log", "ab") as log:  # noqa: ASYNC230 - opening a local file is instant
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server.cli",
            "grpc",
            "--grpc-port",
            str(grpc_port),
            "--config",
            str(config_path),
            cwd=REPO,
            env=_gateway_env(work_dir),
            stdout=log,
            stderr=log,
            stdin=asyncio.subprocess.DEVNULL,
            # Its own session: Ctrl-C reaches only the benchmark, which then stops the
            # gateway with SIGTERM in order (after wrk, before the bridge).
            start_new_session=True,
        )


async def _wait_healthy(rest_url: str, gateway: asyncio.subprocess.Process, log: Path) -> None:
    """Until /status answers through the bridge; fails at once if the gateway exits."""
    healthy = asyncio.ensure_future(wait_for_bridge(rest_url, timeout_s=30.0))
    exited = asyncio.ensure_future(gateway.wait())
    try:
        await asyncio.wait([healthy, exited], return_when=asyncio.FIRST_COMPLETED)
    finally:
        exited.cancel()
        if not healthy.done():
            healthy.cancel()
    if healthy.done() and not healthy.cancelled() and healthy.exception() is None:
        return
    state = "running" if gateway.returncode is None else f"exited with {gateway.returncode}"
    raise RuntimeError(f"the stack did not become healthy; gateway {state}, its log:\n{log_tail(log)}")


async def _stop_all(gateway: asyncio.subprocess.Process | None, bridge: EnvoyProcess, fake: EnvoyProcess) -> None:
    if gateway is not None:
        await _stop_gateway(gateway)
    await bridge.stop()
    await fake.stop()


async def _stop_gateway(process: asyncio.subprocess.Process, timeout_s: float = 10.0) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
