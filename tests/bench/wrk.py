"""Runs wrk (the load generator) and parses what it prints."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Lua run inside wrk. The request is static (wrk.method/body/headers), so wrk builds it
# once. `response` checks every body, so a run where requests "succeed" with the wrong
# content is caught, and counts responses per wall-clock second (`os.time`, the same
# clock as Python's `time.time`), so that a caller can read the rate of a window of the
# run (`Result.per_second`); `done` sums the per-thread counters and prints parsable lines.
_SCRIPT = """\
wrk.method = {method}
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
{auth}local expect = {expect}
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) bad = 0; events = 0; responses = 0; seconds = {{}} end
function response(status, headers, body)
  responses = responses + 1
  local now = os.time()
  seconds[now] = (seconds[now] or 0) + 1
  if not string.find(body, expect, 1, true) then bad = bad + 1 end
  local _, n = string.gsub(body, "data: ", "")
  events = events + n
end
function done(summary, latency, requests)
  local b, e, r = 0, 0, 0
  local all = {{}}
  for _, t in ipairs(threads) do
    b = b + t:get("bad"); e = e + t:get("events"); r = r + t:get("responses")
    for second, n in pairs(t:get("seconds")) do all[second] = (all[second] or 0) + n end
  end
  for second, n in pairs(all) do io.write(string.format("BENCH_SECOND %d %d\\n", second, n)) end
  io.write(string.format("BENCH_CHECK bad=%d events=%d responses=%d\\n", b, e, r))
end
"""

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


@dataclass(frozen=True)
class Request:
    """One HTTP request that wrk repeats, and a substring every good response contains."""

    url: str
    expect: str
    method: str = "GET"
    body: str = ""
    # The gateway's API key, sent as `Authorization: Bearer` (not to the fake).
    api_key: str = ""


@dataclass(frozen=True)
class Result:
    requests: int
    seconds: float
    rps: float
    p50_s: float
    p99_s: float
    non_2xx: int  # wrk counts statuses outside 200-399
    socket_errors: int  # connect + read + write + timeout
    bad_bodies: int
    events: int  # "data: " lines seen in all bodies (SSE events)
    # Responses by the wall-clock second (Unix time) they arrived in.
    per_second: dict[int, int] = field(default_factory=dict)

    @property
    def failures(self) -> int:
        return self.non_2xx + self.socket_errors + self.bad_bodies


def ensure_installed() -> str:
    """wrk's path, installing the Debian package if it is missing (needs root)."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        sys.exit("bench: wrk is not installed and this is not root: run `apt-get install -y wrk` as root")
    print("bench: wrk not found, installing it: apt-get install -y wrk", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "wrk"]
    # The package lists may be missing or stale in a fresh container: update once, retry.
    if subprocess.run(install, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=False)
        subprocess.run(install, env=env, check=False)
    found = shutil.which("wrk")
    if not found:
        sys.exit("bench: could not install wrk with apt-get (see the output above); install it and rerun")
    return found


def write_script(request: Request, directory: Path, name: str) -> Path:
    path = directory / f"{name}.lua"
    path.write_text(
        _SCRIPT.format(
            method=_lua_str(request.method),
            body=_lua_str(request.body),
            expect=_lua_str(request.expect),
            auth=f'wrk.headers["Authorization"] = {_lua_str("Bearer " + request.api_key)}\n' if request.api_key else "",
        )
    )
    return path


def _lua_str(value: str) -> str:
    # A Lua long bracket string takes the text verbatim (JSON quotes and backslashes).
    assert "]==]" not in value
    return f"[==[{value}]==]"


async def run(wrk: str, url: str, script: Path, *, connections: int, seconds: float) -> Result:
    # One wrk thread per core at most: wrk shares the machine with what it measures.
    threads = 1 if connections == 1 else min(2, connections)
    args = [wrk, f"-t{threads}", f"-c{connections}", f"-d{_duration(seconds)}", "--timeout", "10s"]
    args += ["--latency", "-s", str(script), url]
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL
    )
    try:
        output, _ = await process.communicate()
    finally:
        if process.returncode is None:  # cancelled (Ctrl-C): do not leave wrk running
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    text = output.decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"wrk exited with {process.returncode}:\n{text}")
    return parse(text)


def _duration(seconds: float) -> str:
    # wrk takes whole units; milliseconds are not accepted, so round to whole seconds.
    return f"{max(1, round(seconds))}s"


def parse(text: str) -> Result:
    totals = _search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    check = _search(r"BENCH_CHECK bad=(\d+) events=(\d+) responses=(\d+)", text)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return Result(
        requests=int(totals[1]),
        seconds=float(totals[2]) * _UNITS[totals[3]],
        rps=float(_search(r"Requests/sec:\s+([\d.]+)", text)[1]),
        p50_s=_percentile(text, "50"),
        p99_s=_percentile(text, "99"),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        bad_bodies=int(check[1]),
        events=int(check[2]),
        per_second={int(m[1]): int(m[2]) for m in re.finditer(r"^BENCH_SECOND (\d+) (\d+)$", text, re.MULTILINE)},
    )


def _percentile(text: str, which: str) -> float:
    # From the "Latency Distribution" block that --latency adds, e.g. "  99%    2.31ms".
    match = _search(rf"^\s+{which}%\s+([\d.]+)(us|ms|s|m)\s*$", text)
    return float(match[1]) * _UNITS[match[2]]


def _search(pattern: str, text: str) -> re.Match[str]:
    match = re.search(pattern, text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"unexpected wrk output (no match for {pattern!r}):\n{text}")
    return match
