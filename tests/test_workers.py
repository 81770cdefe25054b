"""`aigne-hub serve --workers 2` (issue 9): real processes, the real Envoy, the fake OpenAI
upstream. Calls spread over both workers; a worker killed with `kill -9` is routed
around and restarted; credits and a key's cap hold across workers (SQLite and
PostgreSQL); a rate limit of 20 per minute admits exactly 20 across both; SIGTERM drains
both; `kill -9` of the supervisor leaves no worker and no Envoy.

Which worker served a call: every JSON log line carries the pid of the process that
wrote it, and each call writes one line (logger `aigne_hub.calls`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.accounts.credits import CreditService, Rate, credits_to_micros
from server.accounts.keys import KeyStore
from server.accounts.owners import ensure_owner
from server.config import cores
from server.limits import LimitRule, LimitStore
from server.storage import Database
from tests.conftest import FAKE_KEY, free_port
from tests.fakes.openai_upstream import FakeOpenAI
from tests.storage_fixtures import database_url  # noqa: F401 - the fixture

AIGNE_HUB = Path(sys.executable).parent / "aigne-hub"
CREDIT = 1_000_000
# 1000 credits per million tokens: a chat call with max_tokens=100 reserves ~0.1 credit.
RATE = Rate(
    "openai/*", input_per_million_micros=credits_to_micros(1000), output_per_million_micros=credits_to_micros(1000)
)


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> str:
    """The process's command line ("" once it is gone). Read again while it is empty: a
    worker starts as the die_with_parent shim, which execs the worker in the same pid,
    and in the middle of that exec Linux shows an empty command line (two runs failed
    so: a worker counted, then missing from the next read)."""
    for _ in range(100):
        try:
            found = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return ""
        if found or not alive(pid):
            return found
        time.sleep(0.005)
    return ""


def run_dirs(pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"aigne-hub-run-{pid}-*"))


async def poll(predicate: Callable[[], bool], seconds: float, what: str, log: Callable[[], str] = str) -> None:
    """Until `predicate` holds; fails after `seconds` saying `what`, with `log()` (a log's tail)."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting until {what}\n{log()}"
        await asyncio.sleep(0.05)


class Served:
    """`aigne-hub serve --workers 2` as a subprocess; stdout collected, JSON logs in a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.rest_port, self.grpc_port, self.admin_port = free_port(), free_port(), free_port()
        self.process: asyncio.subprocess.Process | None = None
        self.output = bytearray()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                str(AIGNE_HUB),
                "serve",
                "--workers=2",
                f"--rest-port={self.rest_port}",
                f"--grpc-port={self.grpc_port}",
                f"--admin-port={self.admin_port}",
                env=self.env,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                start_new_session=True,  # its own process group, as a terminal's job is
            )
        self._reader = asyncio.create_task(self._read())
        await poll(lambda: b"aigne-hub ready" in self.output or self._reader.done(), 90, "serve is ready")
        assert b"aigne-hub ready" in self.output, self.output.decode(errors="replace") + self.log_tail()

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.output += line

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def workers(self) -> list[int]:
        return [p for p in children(self.pid) if " worker " in cmdline(p) and alive(p)]

    def envoy(self) -> list[int]:
        return [p for p in children(self.pid) if "envoy" in cmdline(p) and alive(p)]

    def call_pids(self) -> list[int]:
        """The pid of each call's log line so far, in order."""
        pids = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"aigne_hub.calls"' in line:
                pids.append(int(json.loads(line)["pid"]))
        return pids

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    async def stop(self) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), 60)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
        return code

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self._reader is not None:
            self._reader.cancel()


@pytest.fixture(scope="module")
async def upstream() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=FAKE_KEY) as fake:
        yield fake


def serve_env(upstream: FakeOpenAI, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "OPENAI_API_KEY": FAKE_KEY,
        "OPENAI_BASE_URL": upstream.base_url,
        "AIGNE_HUB_DATA_DIR": str(tmp_path / "data"),
        "AIGNE_HUB_LOG_FORMAT": "json",
        "AIGNE_HUB_METRICS_ENABLED": "false",
        "AIGNE_HUB_SHUTDOWN_GRACE_S": "3",
        # No local models: worker 0 would load them at start, and the CPU that takes
        # can delay Envoy's first health checks past their timeout (calls then go to one
        # worker until the next check).
        "AIGNE_HUB_LOCAL": "false",
        **extra,
    }
    for name in ("AIGNE_HUB_CONFIG", "AIGNE_HUB_REDIS_URL", "AIGNE_HUB_WORKERS"):
        env.pop(name, None)
    return env


@pytest.fixture
async def started(tmp_path: Path) -> AsyncIterator[Callable[[dict[str, str]], Served]]:
    made: list[Served] = []

    def make(env: dict[str, str]) -> Served:
        served = Served(env, tmp_path / f"serve-{len(made)}.log")
        made.append(served)
        return served

    yield make
    for served in made:
        await served.kill()


async def chat(client: httpx.AsyncClient, url: str, model: str = "openai/gpt-4o-mini", **body: Any) -> httpx.Response:
    payload = {"model": model, "messages": [{"role": "user", "content": "hello"}], **body}
    return await client.post(f"{url}/v1/chat/completions", json=payload)


async def test_two_workers_serve_and_share_the_calls(upstream, tmp_path, started) -> None:
    served = started(serve_env(upstream, tmp_path, AIGNE_HUB_AUTH_REQUIRED="false"))
    await served.start()
    workers = served.workers()
    assert len(workers) == 2 and len(served.envoy()) == 1, children(served.pid)
    async with httpx.AsyncClient(timeout=20, trust_env=False) as client:
        info = (await client.get(f"http://127.0.0.1:{served.admin_port}/server_info")).json()
        # An Envoy worker thread per gRPC worker, up to the cores.
        assert info["command_line_options"]["concurrency"] == min(2, cores())
        answers = await asyncio.gather(*(chat(client, served.rest_url) for _ in range(60)))
    assert [a.status_code for a in answers] == [200] * 60
    await poll(lambda: len(served.call_pids()) >= 60, 10, "every call is logged")
    spread = Counter(served.call_pids())
    assert set(spread) == set(workers), f"calls by pid {spread}, workers {workers}"
    assert min(spread.values()) >= 10, f"least-request balancing spreads the calls: {spread}"
    # The public gRPC port is shared (SO_REUSEPORT) and serves too.
    import grpc

    from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
    from tests.helpers import chat_request

    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        reply = await chat_grpc.ChatServiceStub(channel).CreateChatCompletion(
            chat_request("openai/gpt-4o-mini"), timeout=20
        )
    assert reply.choices[0].message.content.startswith("echo:")


async def test_a_killed_worker_is_routed_around_and_restarted(upstream, tmp_path, started) -> None:
    served = started(serve_env(upstream, tmp_path, AIGNE_HUB_AUTH_REQUIRED="false"))
    await served.start()
    victim, survivor = served.workers()
    os.kill(victim, signal.SIGKILL)
    await poll(lambda: not alive(victim), 5, "the worker is dead")
    statuses = []
    async with httpx.AsyncClient(timeout=20, trust_env=False) as client:
        for _ in range(30):  # sequential: none is in flight on the victim when it dies
            statuses.append((await chat(client, served.rest_url)).status_code)
    assert statuses == [200] * 30, statuses
    # The restarted worker as the poll saw it (reading the processes again could race
    # with another change and would hide which one the test is about).
    found: list[int] = []

    def restarted_found() -> bool:
        found[:] = sorted(set(served.workers()) - {survivor, victim})
        return len(found) == 1 and survivor in served.workers()

    await poll(restarted_found, 30, "the worker is restarted", served.log_tail)
    (restarted,) = found
    assert "exited unexpectedly" in served.log_path.read_text()
    # Envoy sends calls to the restarted worker again (its health check passes).
    seen_before = len(served.call_pids())
    async with httpx.AsyncClient(timeout=20, trust_env=False) as client:

        async def restarted_serves() -> bool:
            answers = await asyncio.gather(*(chat(client, served.rest_url) for _ in range(10)))
            failed = [(a.status_code, a.text[:300]) for a in answers if a.status_code != 200]
            assert not failed, failed
            return restarted in served.call_pids()[seen_before:]

        deadline = time.monotonic() + 30
        while not await restarted_serves():
            assert time.monotonic() < deadline, f"the restarted worker never got a call\n{served.log_tail()}"
            await asyncio.sleep(0.5)


async def test_credits_and_caps_hold_across_workers(upstream, tmp_path, started, database_url) -> None:  # noqa: F811
    db = await Database.open(database_url, migrate=True)
    try:
        credits = CreditService(db, billing_enabled=True)
        await credits.set_rate(RATE)
        owner = await ensure_owner(db, "project", "workers")
        await credits.grant(owner.id, 1000 * CREDIT)
        cap = 2 * CREDIT
        _, secret = await KeyStore(db).create_key(owner.id, "capped", spend_cap_micros=cap)
    finally:
        await db.close()
    upstream.slow_seconds = 1.0  # every call holds its reservation while the others reserve
    env = serve_env(upstream, tmp_path, AIGNE_HUB_BILLING_ENABLED="true", AIGNE_HUB_DATABASE_URL=database_url)
    served = started(env)
    await served.start()
    headers = {"authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(timeout=60, trust_env=False, headers=headers) as client:
        answers = await asyncio.gather(
            *(chat(client, served.rest_url, "openai/slow", max_tokens=100) for _ in range(100))
        )
    codes = Counter(a.status_code for a in answers)
    assert set(codes) == {200, 429} and codes[200] > 0, codes
    assert {a.json()["error"]["code"] for a in answers if a.status_code == 429} == {"SPENDING_CAP_REACHED"}
    assert len(set(served.call_pids())) == 2, "both workers took calls"
    assert await served.stop() == 0
    db = await Database.open(database_url, migrate=False)
    try:
        balance = await CreditService(db, billing_enabled=True).balance(owner.id)
        spent = 1000 * CREDIT - balance.balance_micros
        assert 0 < spent <= cap, (spent, cap)
        assert balance.reserved_micros == 0
    finally:
        await db.close()


async def test_a_rate_limit_of_20_per_minute_admits_exactly_20_across_workers(upstream, tmp_path, started) -> None:
    url = f"sqlite:///{tmp_path / 'data' / 'aigne-hub.db'}"
    db = await Database.open(url, migrate=True)
    try:
        owner = await ensure_owner(db, "project", "limited")
        key, secret = await KeyStore(db).create_key(owner.id, "limited")
        await LimitStore(db).set(LimitRule("key", key.id, "*", rpm=20))
    finally:
        await db.close()
    served = started(serve_env(upstream, tmp_path))
    await served.start()
    headers = {"authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(timeout=20, trust_env=False, headers=headers) as client:
        answers = await asyncio.gather(*(chat(client, served.rest_url) for _ in range(50)))
    codes = Counter(a.status_code for a in answers)
    assert codes == {200: 20, 429: 30}, codes
    assert len(set(served.call_pids())) == 2, "both workers took calls"


@pytest.mark.parametrize("ctrl_c", [False, True], ids=["sigterm", "sigint-to-the-group"])
async def test_sigterm_drains_both_workers_and_stops_everything(upstream, tmp_path, started, ctrl_c) -> None:
    """SIGTERM to `serve`, or Ctrl-C in a terminal (SIGINT to its whole process group):
    Envoy is in a group of its own, so it is stopped by `serve` after the drain."""
    upstream.slow_seconds = 1.5
    served = started(serve_env(upstream, tmp_path, AIGNE_HUB_AUTH_REQUIRED="false"))
    await served.start()
    workers, envoy = served.workers(), served.envoy()
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        await until_both_workers_serve(served, client)
        before, logged = len(upstream.requests), len(served.call_pids())
        calls = [asyncio.ensure_future(chat(client, served.rest_url, "openai/slow")) for _ in range(8)]
        await poll(lambda: len(upstream.requests) - before >= 8, 10, "every call reached the upstream")
        assert served.process is not None
        if ctrl_c:
            assert envoy and all(os.getpgid(p) != served.pid for p in envoy), "Envoy is not in serve's group"
            os.killpg(served.pid, signal.SIGINT)
        else:
            served.process.send_signal(signal.SIGTERM)
        answers = await asyncio.gather(*calls)
    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    assert len(set(served.call_pids()[logged:])) == 2, "both workers had calls in flight"
    assert await served.stop() == 0
    assert not [p for p in [*workers, *envoy] if alive(p)]
    assert b"aigne-hub stopped" in served.output


async def test_streams_open_past_the_grace_end_with_shutting_down_on_both_workers(upstream, tmp_path, started):
    upstream.chunk_delay = 0.3
    env = serve_env(upstream, tmp_path, AIGNE_HUB_AUTH_REQUIRED="false", AIGNE_HUB_SHUTDOWN_GRACE_S="2")
    served = started(env)
    await served.start()
    text = " ".join(["word"] * 60)  # 60 chunks of 0.3 s: far longer than the grace
    body = {"model": "openai/stream-slow", "stream": True, "messages": [{"role": "user", "content": text}]}
    sent = asyncio.Event()

    async def stream(client: httpx.AsyncClient) -> list[str]:
        events = []
        async with client.stream("POST", f"{served.rest_url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    await sent.wait()
        return events

    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        await until_both_workers_serve(served, client)
        logged = len(served.call_pids())
        streams = [asyncio.ensure_future(stream(client)) for _ in range(6)]
        await asyncio.sleep(1.5)
        assert served.process is not None
        served.process.send_signal(signal.SIGTERM)
        sent.set()
        results = await asyncio.gather(*streams)
    for events in results:
        assert "[DONE]" not in events
        assert json.loads(events[-1])["error"]["code"] == "SHUTTING_DOWN", events[-3:]
    assert await served.stop() == 0
    assert len(set(served.call_pids()[logged:])) == 2, "both workers had streams to interrupt"


async def test_a_key_revoked_through_one_worker_stops_at_once_on_both(upstream, tmp_path, started) -> None:
    token = "admin-" + "w" * 32
    # A long cache TTL: without the hub, the other worker would accept the key for a minute.
    env = serve_env(upstream, tmp_path, AIGNE_HUB_ADMIN_TOKEN=token, AIGNE_HUB_KEY_CACHE_TTL_S="60")
    served = started(env)
    await served.start()
    async with httpx.AsyncClient(base_url=served.rest_url, timeout=20, trust_env=False) as client:
        admin = {"authorization": f"Bearer {token}"}
        created = (await client.post("/admin/keys", json={"owner": "user:w", "name": "k"}, headers=admin)).json()
        user = {"authorization": f"Bearer {created['secret']}"}
        body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        deadline = time.monotonic() + 20
        while len(set(served.call_pids())) < 2:  # both workers have the key in their cache
            assert time.monotonic() < deadline
            answers = await asyncio.gather(
                *(client.post("/v1/chat/completions", json=body, headers=user) for _ in range(4))
            )
            assert {a.status_code for a in answers} == {200}
        revoked = await client.post(f"/admin/keys/{created['key']['id']}:revoke", json={}, headers=admin)
        assert revoked.status_code == 200, revoked.text
        answers = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body, headers=user) for _ in range(20))
        )
    assert {(a.status_code, a.json()["error"]["code"]) for a in answers} == {(401, "KEY_REVOKED")}


async def until_both_workers_serve(served: Served, client: httpx.AsyncClient) -> None:
    """Quick calls until both workers answered one: Envoy routes to both."""
    deadline = time.monotonic() + 20
    while len(set(served.call_pids())) < 2:
        assert time.monotonic() < deadline, f"one worker never got a call: {Counter(served.call_pids())}"
        await asyncio.gather(*(chat(client, served.rest_url) for _ in range(4)))
        await asyncio.sleep(0.1)


async def test_kill_9_of_serve_leaves_no_worker_and_no_envoy(upstream, tmp_path, started) -> None:
    served = started(serve_env(upstream, tmp_path, AIGNE_HUB_AUTH_REQUIRED="false"))
    await served.start()
    left = [*served.workers(), *served.envoy()]
    assert len(left) == 3
    await served.kill()
    await poll(lambda: not [p for p in left if alive(p)], 10, "workers and Envoy are gone")
    assert not re.search(rb"Traceback", served.output)
    # The next serve removes the killed one's run folder (its sockets) and serves.
    assert run_dirs(served.pid)
    again = started(serve_env(upstream, tmp_path, AIGNE_HUB_AUTH_REQUIRED="false"))
    await again.start()
    assert not run_dirs(served.pid)


async def test_the_hub_gives_workers_one_set_of_counters_and_cooldowns(tmp_path) -> None:
    """Two worker connections to one hub (a real Unix socket): a limit counts both; a
    deployment's failures from both trip it once, and both (and a worker connecting
    later, as a restarted one does) see it rest without asking."""
    from server.config import CooldownConfig
    from server.limits.counters import Counter as LimitCounter
    from server.serving.hub import Hub, HubClient, HubCooldowns, HubCounters

    config = CooldownConfig(failures=3, rest_s=30)
    hub = Hub(tmp_path / "hub.sock", config)
    await hub.start()
    first, second = await HubClient.connect(hub.path), await HubClient.connect(hub.path)
    try:
        rpm = LimitCounter("key:k1:*:requests", "requests", 3)
        slots = LimitCounter("key:k1:*:concurrency", "concurrency", 1)
        admitted = [
            (await HubCounters(client).admit([rpm], f"call-{i}", 60_000)).admitted
            for i, client in enumerate([first, second] * 3)
        ]
        assert admitted == [True, True, True, False, False, False]
        assert (await HubCounters(first).admit([slots], "a", 60_000)).admitted
        assert not (await HubCounters(second).admit([slots], "b", 60_000)).admitted
        await HubCounters(first).settle([slots], "a", [0])
        assert (await HubCounters(second).admit([slots], "b", 60_000)).admitted

        cooldowns = [HubCooldowns(first, config), HubCooldowns(second, config)]
        await cooldowns[0].success("openai/x")
        assert await cooldowns[0].failure("openai/x") is None
        assert await cooldowns[1].failure("openai/x") is None
        rest = await cooldowns[0].failure("openai/x")
        assert rest == 30
        await poll(lambda: "openai/x" in second.rests, 2, "the rest reaches the other worker")
        assert set(await cooldowns[1].resting(["openai/x", "openai/y"])) == {"openai/x"}
        later = await HubClient.connect(hub.path)
        assert "openai/x" in await HubCooldowns(later, config).resting(["openai/x"])
        await later.aclose()
    finally:
        await first.aclose()
        await second.aclose()
        await hub.close()


def log_pids(served: Served, message: str) -> list[int]:
    """The pid of each JSON log line whose message starts with `message`, in order."""
    pids = []
    for line in served.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if str(record.get("message", "")).startswith(message):
                pids.append(int(record["pid"]))
    return pids


def worker_index(pid: int) -> str:
    words = cmdline(pid).split()
    return words[words.index("--index") + 1]


async def test_one_worker_sweeps_and_rechecks_for_all_and_resumes_after_kill_9(upstream, tmp_path, started) -> None:
    """The sweep of expired reservations and the re-check of invalid credentials run in
    one worker of the two (they work on the shared database); killed with `kill -9`,
    that worker is restarted and the duty with it: a reservation left to expire is
    released afterwards too."""
    url = f"sqlite:///{tmp_path / 'data' / 'aigne-hub.db'}"
    db = await Database.open(url, migrate=True)
    # A process that reserves and never renews: its holds expire after 1 s.
    lapsing = CreditService(db, billing_enabled=True, reservation_lease_s=1.0)
    owner = await ensure_owner(db, "project", "sweep")
    await lapsing.grant(owner.id, 100 * CREDIT)
    sweeper, recheck = "sweeping expired credit reservations", "re-checking invalid provider credentials"
    env = serve_env(
        upstream,
        tmp_path,
        AIGNE_HUB_BILLING_ENABLED="true",
        AIGNE_HUB_RESERVATION_LEASE_S="3",  # a sweep every second
        AIGNE_HUB_CREDENTIAL_RECHECK_S="1",
        AIGNE_HUB_MASTER_KEY=base64.b64encode(os.urandom(32)).decode(),
    )

    async def lapsed_hold_is_released() -> None:
        await lapsing.reserve(owner.id, CREDIT)
        deadline = time.monotonic() + 15
        while await lapsing.list_reservations(owner.id):
            assert time.monotonic() < deadline, "no sweeper released the expired reservation"
            await asyncio.sleep(0.2)

    try:
        served = started(env)
        await served.start()
        workers = served.workers()
        assert len(workers) == 2
        await lapsed_hold_is_released()
        (duty,) = set(log_pids(served, sweeper))
        assert set(log_pids(served, recheck)) == {duty}, "one process re-checks credentials, the sweeper's"
        assert duty in workers and worker_index(duty) == "0"
        (other,) = set(workers) - {duty}

        os.kill(duty, signal.SIGKILL)
        await poll(lambda: len(served.workers()) == 2 and duty not in served.workers(), 30, "worker 0 restarts")
        (restarted,) = set(served.workers()) - {other}
        await poll(lambda: restarted in log_pids(served, sweeper), 60, "the restarted worker sweeps")
        await lapsed_hold_is_released()
        assert set(log_pids(served, sweeper)) == {duty, restarted}, "never the other worker"
        assert set(log_pids(served, recheck)) == {duty, restarted}
    finally:
        await db.close()
