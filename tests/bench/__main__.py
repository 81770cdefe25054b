"""`python -m tests.bench [--quick] [--duration S] [--connections 1,16,64]`."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from server.bridge.envoy_config import envoy_executable
from tests.bench import procstat, report, reuse, stack, wrk
from tests.bench.measure import Phase, Target, measure, targets

DEFAULT_SECONDS, QUICK_SECONDS = 8.0, 1.0
DEFAULT_WARMUP, QUICK_WARMUP = 2.0, 1.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--duration", type=float, help=f"seconds per measurement (default {DEFAULT_SECONDS:g})")
    parser.add_argument("--warmup", type=float, help=f"seconds of warm-up per target (default {DEFAULT_WARMUP:g})")
    parser.add_argument("--connections", default="1,16,64", help="concurrent connections, comma-separated")
    parser.add_argument("--quick", action="store_true", help="a ~20 s smoke run (1 s measurements)")
    parser.add_argument("--only", default="abcd", help="which targets to run, e.g. 'ab' (default abcd)")
    args = parser.parse_args(argv)
    args.duration = args.duration or (QUICK_SECONDS if args.quick else DEFAULT_SECONDS)
    args.warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP)
    try:
        args.connections = sorted({int(n) for n in args.connections.split(",")})
    except ValueError:
        parser.error(f"--connections must be integers separated by commas, got {args.connections!r}")
    if min(args.connections) < 1 or args.duration < 1:
        parser.error("connections must be >= 1 and --duration at least 1 s (wrk counts whole seconds)")
    return args


def print_conditions(args: argparse.Namespace, wrk_path: str) -> None:
    runs = len(args.only) * len(args.connections)
    estimate = runs * max(1, round(args.duration)) + len(args.only) * max(1, round(args.warmup)) + 5
    print(f"AIGNE Hub benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}  on {platform.node()}")
    print(
        f"  machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; Python {platform.python_version()}"
    )
    print(f"  {_first_line([envoy_executable(), '--version'])}")
    print(f"  {_first_line([wrk_path, '--version'])}")
    print(
        f"  each run: wrk {args.duration:g} s (after a {args.warmup:g} s warm-up per target), "
        f"connections {','.join(map(str, args.connections))}; expected total ~{estimate} s"
    )
    print("  wrk, both Envoys and the gRPC server share these CPUs: compare ratios more than absolutes.\n", flush=True)


def _first_line(command: list[str]) -> str:
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{command[0]}: {exc}"
    lines = (output.stdout + output.stderr).strip().splitlines()
    return next((line.strip() for line in lines if line.strip()), command[0])


async def run_target(
    running: stack.Stack, target: Target, args: argparse.Namespace, wrk_path: str, work_dir: Path
) -> list[Phase]:
    script = wrk.write_script(target.request, work_dir, target.key)
    # Warm-up at the highest concurrency: fills the connection pools (client -> Envoy ->
    # gRPC, gateway -> upstream) and the interpreter's caches before anything counts.
    await wrk.run(wrk_path, target.request.url, script, connections=max(args.connections), seconds=args.warmup)
    phases = []
    for connections in args.connections:
        phase = await measure(running, target, script, wrk_path, connections, args.duration)
        print(report.row(phase), flush=True)
        phases.append(phase)
    return phases


async def run_all(args: argparse.Namespace, wrk_path: str, work_dir: Path) -> list[Phase]:
    async with stack.running(work_dir) as running:
        rss_mib = procstat.rss_bytes(running.gateway_pid) / report.MIB
        print(f"stack ready: gRPC server pid {running.gateway_pid}, RSS {rss_mib:.1f} MiB at start\n")
        print(report.HEADER + "\n" + "-" * len(report.HEADER), flush=True)
        phases: list[Phase] = []
        for target in targets(running):
            if target.key in args.only:
                phases += await run_target(running, target, args, wrk_path, work_dir)
        report.legend()
        report.streams(phases)
        report.reconnects(phases)
        await reuse.report(running)
        return phases


def summarize(phases: list[Phase], connections: list[int]) -> bool:
    by_key = {(p.target.key, p.connections): p for p in phases}
    report.ratios(by_key, connections)
    report.checks(by_key, connections)
    return report.failures(phases)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk_path = wrk.ensure_installed()
    print_conditions(args, wrk_path)
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
    failed = summarize(phases, args.connections)
    print(f"\n(logs: {work_dir})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
