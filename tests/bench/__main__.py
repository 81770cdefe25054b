"""`python -m tests.bench [--quick] [--duration S] [--connections 1,16,64] [--workers N]
[--only fake,1w,Nw,billing,pg,litellm]`: one table for the fake upstream called directly,
the gateway (`aigne-hub serve`) with 1 and N workers (a trivial RPC through Envoy, chat, a
20-chunk SSE stream), chat with one worker and billing on (rates, a balance: each call
reserves and settles credits), chat with one worker on PostgreSQL (billing off and on;
`pg`, when PostgreSQL is reachable at BENCH_POSTGRES_URL), and LiteLLM when the side-by-side kit (../shared/bench) is
set up; under it, each one's time to a stream's first event at one connection
(first_chunk.py). All targets run at once and are loaded in turn, those compared next to
each other (measure.py says how each row's window is counted)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from server.bridge.envoy_config import envoy_executable
from server.config import cores
from tests.bench import procstat, report, stack, wrk
from tests.bench.first_chunk import FirstChunk, PacedFake, first_chunk
from tests.bench.first_chunk import report as first_chunk_report
from tests.bench.measure import Phase, Target, fake_targets, gateway_targets, litellm_targets, measure

DEFAULT_SECONDS, QUICK_SECONDS = 8.0, 1.0
DEFAULT_WARMUP, QUICK_WARMUP = 2.0, 1.0
# The fake always runs: it is every other row's baseline.
GROUPS = ("fake", "1w", "Nw", "billing", "pg", "litellm")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--duration", type=float, help=f"seconds per measurement (default {DEFAULT_SECONDS:g})")
    parser.add_argument(
        "--warmup",
        type=float,
        help=f"seconds of each run before its measured window (default {DEFAULT_WARMUP:g}; twice the median "
        "latency where that is longer)",
    )
    parser.add_argument("--connections", default="1,16,64", help="concurrent connections, comma-separated")
    parser.add_argument("--workers", type=int, default=cores(), help="N of the N-worker rows (default: cores)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (1 s measurements)")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"groups to run, from {','.join(GROUPS)}")
    args = parser.parse_args(argv)
    args.duration = args.duration or (QUICK_SECONDS if args.quick else DEFAULT_SECONDS)
    args.warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP)
    args.only = {g.strip() for g in args.only.split(",") if g.strip()}
    if not args.only <= set(GROUPS):
        parser.error(f"--only takes groups from {', '.join(GROUPS)}, got {sorted(args.only)}")
    try:
        args.connections = sorted({int(n) for n in args.connections.split(",")})
    except ValueError:
        parser.error(f"--connections must be integers separated by commas, got {args.connections!r}")
    if min(args.connections) < 1 or args.duration < 1 or args.workers < 2:
        parser.error("connections >= 1, --duration >= 1 s (wrk counts whole seconds), --workers >= 2")
    return args


def conditions(args: argparse.Namespace, wrk_path: str) -> str:
    return "\n".join(
        [
            f"AIGNE Hub benchmark  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  on {platform.node()}",
            f"  machine: {os.cpu_count()} CPUs ({_cpu_model()}), load average {os.getloadavg()[0]:.2f} at start; "
            f"Python {platform.python_version()}",
            f"  {_first_line([envoy_executable(), '--version'])}",
            f"  {_first_line([wrk_path, '--version'])}",
            f"  each row: a window of {args.duration:g} s of wrk load, counted after {args.warmup:g} s of it (twice "
            f"the median latency where longer); connections {','.join(map(str, args.connections))}; every target "
            "runs throughout, loaded in turn (by concurrency, then request kind); gateway: API key + ledger on "
            "(SQLite), billing off but in the billing rows, JSON and SSE from an Envoy direct_response fake",
            "  wrk, the fake and the target share these CPUs: compare ratios within a run more than absolutes.",
        ]
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _first_line(command: list[str]) -> str:
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{command[0]}: {exc}"
    lines = (output.stdout + output.stderr).strip().splitlines()
    return next((line.strip() for line in lines if line.strip()), command[0])


async def run_interleaved(
    targets: list[Target], args: argparse.Namespace, wrk_path: str, work_dir: Path
) -> list[Phase]:
    """Every target at every concurrency, compared ones next to each other in time (all
    targets run at once; each concurrency, then each kind of request, then each target),
    so that the VM's drift during a run moves the ratios less than it moves the rows.
    Returns the phases in the table's order: by target, then concurrency."""
    scripts = {target.key: wrk.write_script(target.request, work_dir, target.key) for target in targets}
    phases = []
    for connections in args.connections:
        for kind in ("status", "chat", "sse"):
            for target in (t for t in targets if _kind(t) == kind):
                phase = await measure(
                    target, scripts[target.key], wrk_path, connections, args.duration, settle_s=args.warmup
                )
                print(
                    f"  {target.label} at {connections}: {phase.result.rps:.0f} req/s, "
                    f"{phase.cpu_ms_per_request:.2f} CPU ms/req",
                    flush=True,
                )
                phases.append(phase)
    order = {target.key: index for index, target in enumerate(targets)}
    return sorted(phases, key=lambda phase: (order[phase.target.key], phase.connections))


def _kind(target: Target) -> str:
    return next((kind for kind in ("status", "sse") if target.key.endswith(kind)), "chat")


async def run_all(args: argparse.Namespace, wrk_path: str, work_dir: Path) -> list[Phase]:
    streams = 20 if args.quick else 200
    async with contextlib.AsyncExitStack() as running:
        fake = await running.enter_async_context(stack.fake(work_dir))
        paced = await running.enter_async_context(PacedFake())
        targets = fake_targets(fake.url, fake.pid)
        gateways = []
        for group, workers, billing in (("1w", 1, False), ("Nw", args.workers, False), ("billing", 1, True)):
            if group not in args.only:
                continue
            # Each gateway its own data dir and key: they run side by side.
            home = work_dir / group
            home.mkdir()
            key = await stack.create_key(home)
            gateway = await running.enter_async_context(
                stack.gateway(home, fake.url, key, workers, paced.url, billing=billing)
            )
            gateways.append(gateway)
            found = gateway_targets(
                gateway.name,
                gateway.url,
                key,
                gateway.pids,
                status=not billing,
                label="1w billing on" if billing else None,
            )
            targets += [t for t in found if not billing or t.key.endswith("-chat")]
        if "pg" in args.only:
            try:
                targets += await postgres_targets(running, work_dir, fake.url, gateways)
            except RuntimeError as exc:
                print(f"  (PostgreSQL rows skipped: {exc})", flush=True)
        if "litellm" in args.only:
            if stack.litellm_installed():
                lite = await running.enter_async_context(stack.litellm(fake.port))
                targets += litellm_targets(lite.url, lite.api_key, lite.pids)
            else:
                print(f"  (LiteLLM skipped: the kit is not set up; see {stack.KIT}/README.md)", flush=True)
        phases = await run_interleaved(targets, args, wrk_path, work_dir)
        FIRST.append(await first_chunk("fake", f"{paced.url}/v1/chat/completions", "x", requests=streams))
        for gateway in gateways:
            MEMORY.append(f"  {gateway.name}: " + ", ".join(procstat.describe(gateway.pids())))
            if not gateway.name.endswith("billing") and "-pg" not in gateway.name:
                chat_url = f"{gateway.url}/v1/chat/completions"
                FIRST.append(await first_chunk(gateway.name, chat_url, "paced/gpt-4o-mini", gateway.api_key, streams))
    return phases


async def postgres_targets(
    running: contextlib.AsyncExitStack, work_dir: Path, fake_url: str, gateways: list[stack.Gateway]
) -> list[Target]:
    """Chat with one worker on PostgreSQL, billing off and on, each gateway with a
    database of its own; their CPU counts PostgreSQL's backends serving them too."""
    targets = []
    for billing in (False, True):
        name = "1w-pg-billing" if billing else "1w-pg"
        url = await running.enter_async_context(stack.postgres_database())
        env = {"AIGNE_HUB_DATABASE_URL": url}
        home = work_dir / name
        home.mkdir()
        await stack.cli(home, "migrate", env=env)
        key = await stack.create_key(home, env=env)
        gateway = await running.enter_async_context(
            stack.gateway(home, fake_url, key, 1, billing=billing, env=env, name=name)
        )
        gateways.append(gateway)
        label = "1w PostgreSQL" + (" billing on" if billing else "")
        backends = functools.partial(stack.postgres_backends, url)
        found = gateway_targets(name, gateway.url, key, gateway.pids, status=False, label=label, also_cpu=backends)
        targets += [t for t in found if t.key.endswith("-chat")]
    return targets


# RSS of each process of each gateway after its runs, printed under the table.
MEMORY: list[str] = []
# Each target's time to a stream's first event at one connection.
FIRST: list[FirstChunk] = []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk_path = wrk.ensure_installed()
    header = conditions(args, wrk_path)
    print(header + "\n", flush=True)
    work_dir = Path(tempfile.mkdtemp(prefix="aigne-hub-bench-"))
    try:
        phases = asyncio.run(run_all(args, wrk_path, work_dir))
    except KeyboardInterrupt:
        print("\nbench: interrupted; processes stopped", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, TimeoutError) as exc:
        print(f"\nbench: FAILED: {exc}\n(logs in {work_dir})", file=sys.stderr)
        return 1
    finally:
        leftovers = procstat.terminate_children()
        if leftovers:
            print(f"bench: had to stop leftover child processes {leftovers}", file=sys.stderr)
    print("\n" + header + "\n")
    print(report.table(phases))
    print(report.LEGEND)
    print(report.ratios(phases, args.workers, args.connections))
    if MEMORY:
        print("RSS per process after the runs:\n" + "\n".join(MEMORY))
    if FIRST:
        print(first_chunk_report(FIRST))
    failed = report.failures(phases)
    if failed:
        print(failed)
    print(f"\n(logs: {work_dir})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
