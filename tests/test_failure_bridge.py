"""The REST bridge under failure (issue 7): an Envoy that outlives its gateway, an Envoy
that dies, timeouts that must let the server decide first, and the bridge's smaller
leaks (secrets in logs, gRPC status on the REST port, temp folders, echoed queries).

`aigne-hub serve` runs as a real subprocess, as an operator runs it; Envoy is the real
one; only the upstream is the fake OpenAI server.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.accounts.owners import ensure_owner
from server.bridge.envoy_config import LUA_PATH, bridge_timeouts, render_envoy_config
from server.bridge.process import EnvoyProcess, Listen, PortInUse
from server.bridge.supervisor import BridgeFailed, RestartPolicy, supervise
from server.cli import DESCRIPTOR_PATH, envoy_yaml, wait_for_bridge
from server.config import Settings
from tests.conftest import FAKE_KEY, Bridge, free_port, start_bridge

AIGNE_HUB = Path(sys.executable).parent / "aigne-hub"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# ----------------------------------------------------------------------------- helpers


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its ")".
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def poll(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting until {what}"
        await asyncio.sleep(0.05)


class Serve:
    """`aigne-hub serve` as a subprocess on fixed ports, its output collected."""

    def __init__(self, env: dict[str, str], rest_port: int, grpc_port: int, admin_port: int) -> None:
        self.env, self.rest_port, self.grpc_port, self.admin_port = env, rest_port, grpc_port, admin_port
        self.process: asyncio.subprocess.Process | None = None
        self.output = bytearray()
        self._reader: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> asyncio.subprocess.Process:
        self.process = await asyncio.create_subprocess_exec(
            str(AIGNE_HUB),
            "serve",
            f"--rest-port={self.rest_port}",
            f"--grpc-port={self.grpc_port}",
            f"--admin-port={self.admin_port}",
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.create_task(self._read())
        return self.process

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.output += line
            if b"aigne-hub ready" in line:
                self._ready.set()

    async def ready(self, seconds: float = 30) -> None:
        waiter = asyncio.ensure_future(self._ready.wait())
        assert self._reader is not None
        await asyncio.wait({waiter, self._reader}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        assert self._ready.is_set(), f"serve did not get ready:\n{self.output.decode(errors='replace')}"

    async def wait_for_output(self, text: bytes, seconds: float) -> None:
        await poll(lambda: text in self.output, seconds, f"{text!r} in the output of serve")

    async def exit_code(self, seconds: float = 30) -> int:
        assert self.process is not None
        code = await asyncio.wait_for(self.process.wait(), seconds)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
        return code

    @property
    def envoy_pid(self) -> int:
        assert self.process is not None
        pids = children(self.process.pid)
        assert len(pids) == 1, f"serve should have one child (Envoy), has {pids}"
        return pids[0]

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self._reader is not None:
            self._reader.cancel()


@pytest.fixture
async def serve_env(fake_openai, tmp_path) -> dict[str, str]:
    env = {
        **os.environ,
        "OPENAI_API_KEY": FAKE_KEY,
        "OPENAI_BASE_URL": fake_openai.base_url,
        "AIGNE_HUB_AUTH_REQUIRED": "false",
        "AIGNE_HUB_SHUTDOWN_GRACE_S": "1",
        "AIGNE_HUB_DATA_DIR": str(tmp_path / "data"),
        # Envoy's temp folders of these servers land here, where the test can see them.
        "TMPDIR": str(tmp_path),
    }
    env.pop("AIGNE_HUB_CONFIG", None)
    return env


@pytest.fixture
async def servers(serve_env) -> AsyncIterator[list[Serve]]:
    """Serve processes a test starts; all on the same ports, killed at the end."""
    started: list[Serve] = []
    ports = (free_port(), free_port(), free_port())

    def make() -> Serve:
        serve = Serve(serve_env, *ports)
        started.append(serve)
        return serve

    yield make  # type: ignore[misc]
    for serve in started:
        await serve.kill()


async def chat_over_rest(rest_url: str, text: str = "hello") -> httpx.Response:
    chat = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        return await client.post(f"{rest_url}/v1/chat/completions", json=chat)


async def admin_node_id(admin_port: int) -> str:
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        info = (await client.get(f"http://127.0.0.1:{admin_port}/server_info")).json()
    return str(info["node"]["id"])


# ------------------------------------------------------- item 2: no orphaned Envoy


async def test_envoy_dies_with_a_killed_server_and_a_restart_serves_through_its_own(servers, tmp_path):
    first = servers()
    await first.start()
    await first.ready()
    old_envoy = first.envoy_pid
    assert first.process is not None
    assert (await admin_node_id(first.admin_port)).startswith(f"aigne-hub-{first.process.pid}-")

    os.kill(first.process.pid, signal.SIGKILL)
    await first.exit_code()
    await poll(lambda: not alive(old_envoy), 10, "the killed server's Envoy is gone")

    assert list(tmp_path.glob(f"aigne-hub-envoy-{first.process.pid}-*")), "the killed server's folder is left"
    second = servers()
    await second.start()
    await second.ready()
    assert second.process is not None
    # ... until the next server starts.
    assert list(tmp_path.glob(f"aigne-hub-envoy-{first.process.pid}-*")) == []
    # The Envoy answering on the admin port is the new server's own.
    assert (await admin_node_id(second.admin_port)).startswith(f"aigne-hub-{second.process.pid}-")
    reply = await chat_over_rest(second.rest_url, "after kill -9")
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "echo: after kill -9"


@pytest.mark.parametrize("taken", ["REST", "admin"])
async def test_serve_fails_clearly_when_a_port_is_taken(servers, taken):
    serve = servers()
    port = serve.rest_port if taken == "REST" else serve.admin_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        await serve.start()
        code = await serve.exit_code()
    output = serve.output.decode(errors="replace")
    assert code == 1, output
    assert b"aigne-hub ready" not in serve.output
    assert f"127.0.0.1:{port} is already in use" in output, output


async def test_start_refuses_when_another_envoy_answers_the_admin_port(gateway, tmp_path):
    """The admin port's /ready is not enough: the Envoy answering must be the one started."""
    first = await start_bridge(gateway.port, tmp_path / "first")
    admin_port = int(first.admin_url.rsplit(":", 1)[1])
    try:
        config = render_envoy_config(
            rest_host="127.0.0.1",
            rest_port=free_port(),
            grpc_host="127.0.0.1",
            grpc_port=gateway.port,
            admin_port=admin_port,
            descriptor_path=DESCRIPTOR_PATH,
            lua_path=LUA_PATH,
            max_request_bytes=1 << 20,
            max_response_bytes=1 << 20,
        )
        second = EnvoyProcess(config, admin_url=first.admin_url, work_dir=tmp_path / "second")
        with pytest.raises(RuntimeError, match=r"envoy exited|another Envoy answers"):
            await second.start()
        assert not second.running
        # The precheck names the port before Envoy is even started.
        third = EnvoyProcess(
            config,
            admin_url=first.admin_url,
            work_dir=tmp_path / "third",
            listens=[Listen("admin", "127.0.0.1", admin_port)],
        )
        with pytest.raises(PortInUse, match=f"admin port 127.0.0.1:{admin_port} is already in use"):
            await third.start()
        assert third.pid is None
    finally:
        await first.envoy.stop()


# ------------------------------------------------------- item 3: Envoy supervised


async def watch_health(grpc_port: int, statuses: list[int]) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        async for response in stub.Watch(health_pb2.HealthCheckRequest(service="")):
            statuses.append(response.status)


async def test_serve_restarts_a_killed_envoy_and_health_follows_the_bridge(servers):
    serve = servers()
    await serve.start()
    await serve.ready()
    statuses: list[int] = []
    watcher = asyncio.create_task(watch_health(serve.grpc_port, statuses))
    try:
        await poll(lambda: statuses[-1:] == [SERVING], 10, "health is SERVING")
        old_envoy = serve.envoy_pid
        os.kill(old_envoy, signal.SIGKILL)

        await poll(lambda: NOT_SERVING in statuses, 10, "health reports the bridge down")
        await poll(lambda: statuses[-1] == SERVING, 30, "health is SERVING again after the restart")
        assert statuses[statuses.index(NOT_SERVING) :][-1] == SERVING
        reply = await chat_over_rest(serve.rest_url, "after envoy died")
        assert reply.status_code == 200, reply.text
        assert serve.envoy_pid != old_envoy
        await serve.wait_for_output(b"Envoy restarted", 5)
        assert b"Envoy exited unexpectedly" in serve.output
        assert serve.process is not None and serve.process.returncode is None
    finally:
        watcher.cancel()


async def test_supervisor_gives_up_when_envoy_cannot_come_back(gateway, tmp_path):
    """Restarts that keep failing end in BridgeFailed (serve then exits non-zero)."""
    rest_port, admin_port = free_port(), free_port()
    config = render_envoy_config(
        rest_host="127.0.0.1",
        rest_port=rest_port,
        grpc_host="127.0.0.1",
        grpc_port=gateway.port,
        admin_port=admin_port,
        descriptor_path=DESCRIPTOR_PATH,
        lua_path=LUA_PATH,
        max_request_bytes=1 << 20,
        max_response_bytes=1 << 20,
    )
    envoy = EnvoyProcess(
        config,
        admin_url=f"http://127.0.0.1:{admin_port}",
        work_dir=tmp_path,
        listens=[Listen("REST", "127.0.0.1", rest_port)],
    )
    await envoy.start()
    changes: list[bool] = []

    async def on_change(up: bool) -> None:
        changes.append(up)

    rest_url = f"http://127.0.0.1:{rest_port}"
    policy = RestartPolicy(first_delay_s=0.05, max_restarts=2)
    supervisor = asyncio.create_task(
        supervise(envoy, asyncio.Event(), on_change, lambda: wait_for_bridge(rest_url), policy)
    )
    try:
        assert envoy.pid is not None
        envoy_pid = envoy.pid
        # From now on no Envoy can start from this configuration.
        envoy.config_path.write_text("static_resources: {listeners: not-a-list}\n")
        os.kill(envoy_pid, signal.SIGKILL)
        with pytest.raises(BridgeFailed, match="Envoy failed 2 times in a row"):
            await asyncio.wait_for(supervisor, 60)
        assert changes == [False]
        assert not envoy.running
    finally:
        supervisor.cancel()
        await envoy.stop()


# ------------------------------------------------- item 9: the server decides first


def _durations(config: dict) -> dict[str, float]:
    """Envoy's stream idle timeout and route timeouts of a rendered configuration."""

    def seconds(text: str) -> float:
        return float(text.removesuffix("s"))

    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    found = {"stream_idle_timeout": seconds(manager["stream_idle_timeout"])}
    for route in manager["route_config"]["virtual_hosts"][0]["routes"]:
        if "route" in route:
            path = route["match"].get("path") or route["match"].get("prefix")
            found[f"{path} idle_timeout"] = seconds(route["route"]["idle_timeout"])
            found[f"{path} timeout"] = seconds(route["route"]["timeout"])
    return found


@pytest.mark.parametrize("server_timeout_s", [1.5, 600.0, 3600.0])
def test_envoy_limits_are_derived_from_the_servers_and_longer(server_timeout_s):
    settings = Settings(upstream_read_timeout_s=server_timeout_s)
    durations = _durations(yaml.safe_load(envoy_yaml(settings, 50051)))
    assert durations["stream_idle_timeout"] > server_timeout_s
    for name, value in durations.items():
        # 0 is "no limit" (the streamed chat route: only the idle timeout bounds it).
        assert value == 0 or value > server_timeout_s, (name, value, server_timeout_s)


@pytest.fixture(scope="module")
async def derived_bridge(gateway, tmp_path_factory) -> AsyncIterator[Bridge]:
    """A bridge configured as `serve` would configure it for the session gateway."""
    timeouts = bridge_timeouts(gateway.settings.upstream_read_timeout_s)
    running = await start_bridge(gateway.port, tmp_path_factory.mktemp("derived-envoy"), **timeouts)
    yield running
    await running.envoy.stop()


@pytest.fixture
async def timeout_key(gateway) -> tuple[str, str]:
    owner = await ensure_owner(gateway.accounts.db, "user", "timeouts")
    record, secret = await gateway.accounts.keys.create_key(owner.id, f"timeouts-{time.monotonic_ns()}")
    return record.id, secret


async def _sse_events(rest_url: str, secret: str, model: str) -> tuple[int, list[dict], float]:
    body = {"model": model, "messages": [{"role": "user", "content": "a b c d e f"}], "stream": True}
    events: list[dict] = []
    started = time.monotonic()
    async with (
        httpx.AsyncClient(timeout=60, trust_env=False) as client,
        client.stream(
            "POST", f"{rest_url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {secret}"}
        ) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line.removeprefix("data: ")))
        return response.status_code, events, time.monotonic() - started


@pytest.mark.parametrize("model", ["openai/stream-stall", "openai/stream-trickle"])
async def test_a_stalled_stream_ends_with_a_timeout_error_event_before_envoys_limit(
    gateway, derived_bridge, timeout_key, model
):
    key_id, secret = timeout_key
    server_limit = gateway.settings.upstream_read_timeout_s
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        dump = (await client.get(f"{derived_bridge.admin_url}/config_dump")).text
    envoy_idle = bridge_timeouts(server_limit)["stream_idle_timeout_s"]
    assert f'"stream_idle_timeout": "{envoy_idle:g}s"' in dump, "Envoy runs with the derived idle timeout"
    assert envoy_idle > server_limit

    status, events, took = await _sse_events(derived_bridge.rest_url, secret, model)

    assert status == 200
    content = [e for e in events if e.get("choices")]
    assert content, events  # the stream had started
    assert "error" in events[-1], events
    assert events[-1]["error"]["code"] == "UPSTREAM_TIMEOUT", events[-1]
    # The server's limit decided, well before Envoy's.
    assert server_limit * 0.9 <= took < envoy_idle - 10, took
    records = await gateway.accounts.ledger.records(key_id=key_id)
    assert [(r.outcome, r.error_reason) for r in records] == [("error", "UPSTREAM_TIMEOUT")]


async def test_an_upstream_silent_before_its_first_byte_is_a_timeout(gateway, derived_bridge, fake_openai, timeout_key):
    _, secret = timeout_key
    assert fake_openai.slow_seconds > gateway.settings.upstream_read_timeout_s
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        for stream in (False, True):
            body = {"model": "openai/slow", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
            reply = await client.post(
                f"{derived_bridge.rest_url}/v1/chat/completions",
                json=body,
                headers={"authorization": f"Bearer {secret}"},
            )
            assert reply.status_code == 504, reply.text
            assert reply.json()["error"]["code"] == "UPSTREAM_TIMEOUT"


# ------------------------------------------------------------------ item 10: leaks


SEEDED_SECRET = "sk-seeded-secret-0123456789abcdef"


@pytest.mark.parametrize("level", ["debug", "trace", "DEBUG"])
def test_envoy_log_levels_that_log_headers_are_refused(level):
    with pytest.raises(ValueError, match="authorization"):
        Settings(envoy_log_level=level)
    with pytest.raises(ValueError, match="authorization"):
        EnvoyProcess("", admin_url="http://127.0.0.1:1", work_dir=Path(tempfile.mkdtemp()), log_level=level)


async def test_serve_refuses_a_debug_envoy_log_level_with_a_clear_error(serve_env):
    env = {**serve_env, "AIGNE_HUB_ENVOY_LOG_LEVEL": "debug"}
    process = await asyncio.create_subprocess_exec(
        str(AIGNE_HUB), "serve", f"--rest-port={free_port()}", env=env, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert b"Envoy log level 'debug' is refused" in stderr and b"authorization" in stderr, stderr


async def test_no_allowed_envoy_log_level_logs_a_callers_key(gateway, tmp_path):
    for level in ("info", "warning", "error", "critical", "off"):
        os.environ["AIGNE_HUB_ENVOY_LOG_LEVEL"] = level
        try:
            bridge = await start_bridge(gateway.port, tmp_path / level)
        finally:
            del os.environ["AIGNE_HUB_ENVOY_LOG_LEVEL"]
        try:
            assert bridge.envoy.log_level == level
            async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
                for path in ("/v1/chat/completions", "/v1/nope"):
                    await client.post(
                        bridge.rest_url + path,
                        json={"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
                        headers={"authorization": f"Bearer {SEEDED_SECRET}"},
                    )
        finally:
            await bridge.envoy.stop()
        assert SEEDED_SECRET not in bridge.envoy.log_path.read_text(errors="replace")


async def test_native_grpc_on_the_rest_port_gets_a_grpc_status(bridge):
    async with grpc.aio.insecure_channel(bridge.rest_url.removeprefix("http://")) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED, caught.value
    assert "gRPC port" in (caught.value.details() or ""), caught.value.details()


async def test_envoy_temp_folder_is_removed_on_stop(gateway):
    rest_port, admin_port = free_port(), free_port()
    config = render_envoy_config(
        rest_host="127.0.0.1",
        rest_port=rest_port,
        grpc_host="127.0.0.1",
        grpc_port=gateway.port,
        admin_port=admin_port,
        descriptor_path=DESCRIPTOR_PATH,
        lua_path=LUA_PATH,
        max_request_bytes=1 << 20,
        max_response_bytes=1 << 20,
    )
    envoy = EnvoyProcess(config, admin_url=f"http://127.0.0.1:{admin_port}")
    folder = envoy.config_path.parent
    assert folder.name.startswith("aigne-hub-envoy-")
    await envoy.start()
    assert envoy.log_path.exists()
    await envoy.stop()
    assert not folder.exists()


async def test_serve_leaves_no_envoy_temp_folder(servers, tmp_path):
    serve = servers()
    await serve.start()
    await serve.ready()
    assert list(tmp_path.glob("aigne-hub-envoy-*")), "serve keeps its Envoy files in the temp folder"
    assert serve.process is not None
    serve.process.send_signal(signal.SIGTERM)
    assert await serve.exit_code() == 0
    assert list(tmp_path.glob("aigne-hub-envoy-*")) == []


async def test_404_echoes_neither_the_query_nor_a_long_path(bridge):
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        for method, path in [("GET", "/v1/nope"), ("PATCH", "/v1/chat/completions"), ("GET", "/v1/" + "x" * 500)]:
            reply = await client.request(method, f"{bridge.rest_url}{path}?api_key={SEEDED_SECRET}")
            assert reply.status_code == 404, reply.text
            message = reply.json()["error"]["message"]
            assert SEEDED_SECRET not in reply.text and "api_key" not in reply.text, reply.text
            assert message == f"Invalid URL ({method} {path[:80]})", message


async def test_rest_errors_are_not_mistaken_for_native_grpc(bridge, auth_headers):
    """Transcoded REST requests carry content-type application/grpc inside Envoy: their
    errors must still be REST errors, even with a client-sent marker header."""
    async with httpx.AsyncClient(timeout=10, trust_env=False, headers=auth_headers) as client:
        for extra in ({}, {"x-aigne-bridge": "grpc"}):
            reply = await client.post(
                f"{bridge.rest_url}/v1/chat/completions",
                content=b'{"model": "openai/gpt-4o-mini", "messages": [',
                headers={"content-type": "application/json", **extra},
            )
            assert reply.status_code == 400, reply.text
            assert "gRPC" not in reply.json()["error"]["message"], reply.text


@pytest.mark.parametrize("filler", ['\\"', "é", "\\u00e9", "\\\\", "€"])
async def test_envoy_error_replies_quote_at_most_a_bounded_part_of_a_value(bridge, auth_headers, filler):
    async with httpx.AsyncClient(timeout=10, trust_env=False, headers=auth_headers) as client:
        for shift in range(8):  # the cut lands on each byte of an escape or a character
            value = "x" * (290 + shift) + filler * 200 + SEEDED_SECRET
            head = '{"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "n": "'
            body = head + value + '"}'
            reply = await client.post(
                f"{bridge.rest_url}/v1/chat/completions",
                content=body.encode(),
                headers={"content-type": "application/json"},
            )
            assert reply.status_code == 400
            message = json.loads(reply.content)["error"]["message"]  # still valid JSON and UTF-8
            assert message.startswith("n: invalid value") and message.endswith("...")
            assert len(message.encode()) <= 310 and SEEDED_SECRET not in reply.text
