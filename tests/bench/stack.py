"""Starts what the benchmark measures, each in its own process, and stops it all.

fake upstream  Envoy direct_response (fake_upstream.py)
gateway        `aigne-hub serve --workers W` (gRPC workers + the REST bridge Envoy, as
               an operator runs it) with a YAML config naming two providers on the fake
LiteLLM        the side-by-side kit's proxy (../shared/bench), when it is set up
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

import httpx
import yaml
from sqlalchemy.engine import make_url

from server.bridge.process import EnvoyProcess
from tests.bench import procstat
from tests.bench.fake_upstream import render_fake_config

REPO = Path(__file__).resolve().parents[2]
KIT = REPO.parent / "shared" / "bench"
BENCH_HOME = Path(os.environ.get("BENCH_HOME", "/tmp/bench"))
LITELLM_KEY = os.environ.get("BENCH_API_KEY", "sk-bench-0123456789abcdef0123456789abcdef")
# The PostgreSQL server of the `pg` rows: a database of their own is made there and dropped.
POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@dataclass(frozen=True)
class Fake:
    url: str
    port: int
    admin: str
    pid: int | None


@dataclass(frozen=True)
class Gateway:
    """A running gateway: where to call it, with which key, and its root process."""

    name: str
    url: str
    api_key: str
    root_pid: int
    admin: str | None = None

    def pids(self) -> list[int]:
        """Every process of the gateway (workers, Envoy, LiteLLM's uvicorn workers)."""
        return procstat.tree(self.root_pid)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def gateway_config(fake_url: str, paced_url: str | None = None) -> str:
    """Two providers on one fake: `json/...` answers JSON, `sse/...` answers a stream;
    with `paced_url`, `paced/...` streams from first_chunk.PacedFake."""
    providers = {
        name: {"type": "openai", "base_url": f"{fake_url}/{name}/v1", "api_key": "sk-bench"} for name in ("json", "sse")
    }
    if paced_url:
        providers["paced"] = {"type": "openai", "base_url": f"{paced_url}/v1", "api_key": "sk-bench"}
    return yaml.safe_dump({"providers": providers})


@contextlib.asynccontextmanager
async def fake(work_dir: Path) -> AsyncIterator[Fake]:
    port = free_port()
    config = render_fake_config(port=port, admin_port=free_port())
    envoy = EnvoyProcess(config, admin_url=_admin_url(config), work_dir=work_dir / "fake")
    try:
        await envoy.start()
        yield Fake(f"http://127.0.0.1:{port}", port, envoy.admin_url, envoy.pid)
    finally:
        await envoy.stop()


def _admin_url(config: str) -> str:
    admin = yaml.safe_load(config)["admin"]["address"]["socket_address"]
    return f"http://{admin['address']}:{admin['port_value']}"


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _gateway_env(work_dir: Path, billing: bool = False, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "AIGNE_HUB_DATA_DIR": str(work_dir / "data"), "AIGNE_HUB_METRICS_ENABLED": "false"}
    for name in (
        "AIGNE_HUB_CONFIG",
        "AIGNE_HUB_WORKERS",
        "AIGNE_HUB_DATABASE_URL",
        "AIGNE_HUB_REDIS_URL",
        "AIGNE_HUB_BILLING_ENABLED",
    ):
        env.pop(name, None)
    if billing:
        env["AIGNE_HUB_BILLING_ENABLED"] = "true"
    return {**env, **(extra or {})}


# Billing on: rates for the fake's models (credits per million tokens) and a balance
# no run can spend, set with the CLI before the gateway starts.
BILLING_SETUP = (
    ("credits", "rate", "json/*", "--input", "2.5", "--output", "10"),
    ("credits", "rate", "sse/*", "--input", "2.5", "--output", "10"),
    ("credits", "grant", "project:bench", "1000000000"),
)


async def cli(work_dir: Path, *args: str, repo: Path = REPO, env: dict[str, str] | None = None) -> bytes:
    """`aigne-hub ARGS` of the checkout `repo`, in the bench's own data dir; its standard output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "server.cli", *args),
        cwd=repo,
        env=_gateway_env(work_dir, extra=env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"aigne-hub {' '.join(args)} failed: {stderr.decode()}")
    return stdout


async def create_key(work_dir: Path, repo: Path = REPO, env: dict[str, str] | None = None) -> str:
    """A key made with `aigne-hub keys create`, in the bench's own data dir."""
    args = ("keys", "create", "--owner", "project:bench", "--name", "bench", "--json")
    stdout = await cli(work_dir, *args, repo=repo, env=env)
    secret: str = json.loads(stdout)["secret"]
    return secret


@contextlib.asynccontextmanager
async def gateway(
    work_dir: Path,
    fake_url: str,
    api_key: str,
    workers: int,
    paced_url: str | None = None,
    *,
    billing: bool = False,
    repo: Path = REPO,
    env: dict[str, str] | None = None,
    name: str | None = None,
) -> AsyncIterator[Gateway]:
    """`aigne-hub serve --workers W` of the checkout `repo`, ready; stopped with SIGTERM
    on exit. `billing`: with AIGNE_HUB_BILLING_ENABLED=true, after BILLING_SETUP (rates
    and a balance in the shared data dir, which billing-off gateways ignore). `env`:
    variables set for it (and its CLI calls) over the bench's own."""
    config_path = work_dir / "gateway.yaml"
    config_path.write_text(gateway_config(fake_url, paced_url))
    if billing:
        for args in BILLING_SETUP:
            await cli(work_dir, *args, repo=repo, env=env)
    rest_port, admin_port = free_port(), free_port()
    name = name or f"{workers}w" + ("-billing" if billing else "")
    out = work_dir / f"serve-{name}.out"
    with out.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "server.cli", "serve", f"--workers={workers}", f"--config={config_path}"),
            *(f"--rest-port={rest_port}", f"--grpc-port={free_port()}", f"--admin-port={admin_port}"),
            cwd=repo,
            env=_gateway_env(work_dir, billing, env),
            stdout=log,
            stderr=log,
            stdin=asyncio.subprocess.DEVNULL,
            # Its own session: Ctrl-C reaches only the benchmark, which stops it in order.
            start_new_session=True,
        )
    try:
        await _wait_for(lambda: b"aigne-hub ready" in out.read_bytes(), process, out, 120)
        yield Gateway(
            name,
            f"http://127.0.0.1:{rest_port}",
            api_key,
            process.pid,
            admin=f"http://127.0.0.1:{admin_port}",
        )
    finally:
        await _stop(process)


async def _wait_for(ready: object, process: asyncio.subprocess.Process, log: Path, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not ready():  # type: ignore[operator]
        if process.returncode is not None or loop.time() > deadline:
            state = "running" if process.returncode is None else f"exited with {process.returncode}"
            raise RuntimeError(f"the gateway did not get ready; it is {state}; its log:\n{log_tail(log)}")
        await asyncio.sleep(0.1)


async def _stop(process: asyncio.subprocess.Process, timeout_s: float = 60.0) -> None:
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


@contextlib.asynccontextmanager
async def postgres_database(prefix: str = "aigne_bench") -> AsyncIterator[str]:
    """A new, empty database on POSTGRES_URL's server (its URL), dropped on exit.
    RuntimeError when the server cannot be reached."""
    import asyncpg  # here: only the `pg` rows need it

    from tests.postgres_databases import new_database

    async with contextlib.AsyncExitStack() as database:
        try:
            url = await database.enter_async_context(new_database(POSTGRES_URL, prefix))
        except (OSError, asyncpg.PostgresError) as exc:
            raise RuntimeError(f"PostgreSQL is not reachable at {POSTGRES_URL} ({exc})") from exc
        yield url


def postgres_backends(url: str) -> list[int]:
    """The pids of PostgreSQL's backends connected to `url`'s database (the server's
    processes that work for the gateway: their CPU counts in its rows)."""
    import asyncpg

    async def query() -> list[int]:
        connection = await asyncpg.connect(POSTGRES_URL, timeout=5)
        try:
            rows = await connection.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                make_url(url).database,
            )
        finally:
            await connection.close()
        return [int(row["pid"]) for row in rows]

    return asyncio.run(query())


def litellm_installed() -> bool:
    return (BENCH_HOME / "venv-litellm" / "bin" / "litellm").exists() and (KIT / "litellm_proxy.sh").exists()


@contextlib.asynccontextmanager
async def litellm(fake_port: int) -> AsyncIterator[Gateway]:
    """The kit's LiteLLM proxy (1 uvicorn worker) in front of this run's fake."""
    port = free_port()
    env = {**os.environ, "BENCH_HOME": str(BENCH_HOME), "LITELLM_PORT": str(port), "FAKE_PORT": str(fake_port)}
    script = str(KIT / "litellm_proxy.sh")
    start = await asyncio.create_subprocess_exec(script, "start", "1", env=env, stdout=asyncio.subprocess.PIPE)
    output, _ = await start.communicate()
    if start.returncode != 0:
        raise RuntimeError(f"LiteLLM did not start: {output.decode(errors='replace')}")
    try:
        pid = int((BENCH_HOME / "run" / "litellm.pid").read_text())
        yield Gateway("litellm-1w", f"http://127.0.0.1:{port}", LITELLM_KEY, pid)
    finally:
        stop = await asyncio.create_subprocess_exec(script, "stop", env=env, stdout=asyncio.subprocess.DEVNULL)
        await stop.wait()


async def fake_connections(admin_url: str) -> int | None:
    """Connections the fake upstream has accepted so far."""
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
        try:
            text = (await client.get(f"{admin_url}/stats", params={"filter": "downstream_cx_total$"})).text
        except httpx.HTTPError:
            return None
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name == "http.fake_openai.downstream_cx_total" and value.isdigit():
            return int(value)
    return None
