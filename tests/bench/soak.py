"""`python -m tests.bench.soak [--requests N] [--workers W] [--connections C] [--sse S]`
(`make soak`): is the gateway's memory flat over a long run?

The issue's goal is RSS <= 150 MB per server process, flat over 1M requests; the main
benchmark (`make bench`) runs ~6,000 requests per target, too few to see a leak of a
few bytes per call. This starts the stack `make bench` starts (tests/bench/stack.py:
the Envoy fake upstream, `aigne-hub serve --workers W` with its Envoy, a key) and
drives it with two wrk loads at once, chat on C - S connections and a 20-chunk SSE
stream on S, in slices of about 5 % of the requests. After each slice it prints the
RSS of every process (serve, each worker, Envoy), and at the end the slope of each
over the second half of the run (MB per 100k requests: the first half includes
warm-up, pools and caches filling) and a verdict against the goal. The run slows no
test: it is not part of `make test`.

`--tracemalloc` starts the workers with AIGNE_HUB_TRACEMALLOC_DIR (server.memory):
each writes a tracemalloc snapshot on SIGUSR2, which this sends after the first
half and at the end; the lines that grew most in between are printed per worker.
Tracing allocations slows the workers several times: use it to find a leak, not to
measure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from server.config import cores
from tests.bench import procstat, stack, wrk
from tests.bench.measure import DONE, FAKE_CONTENT, chat_body

GOAL_MB = 150.0
# Under this growth per 100k requests over the second half, RSS counts as flat: 1M
# requests would add at most 5 MB.
FLAT_MB_PER_100K = 0.5
SLICES = 20
MB = 1e6


@dataclass
class Process:
    """One process of the gateway, by role: its RSS (MB) at each sample."""

    role: str
    pid: int
    samples: list[tuple[int, float]] = field(default_factory=list)  # (requests so far, RSS MB)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.soak", description=__doc__.split("\n\n")[1])
    parser.add_argument("--requests", type=int, default=1_000_000, help="requests in all (default 1,000,000)")
    parser.add_argument("--workers", type=int, default=cores(), help="gRPC workers of serve (default: cores)")
    parser.add_argument("--connections", type=int, default=16, help="concurrent connections in all (default 16)")
    parser.add_argument("--sse", type=int, default=2, help="of those, connections streaming SSE (default 2)")
    parser.add_argument("--tracemalloc", action="store_true", help="snapshot allocations in the workers (slow)")
    args = parser.parse_args(argv)
    if args.requests < 10_000 or args.workers < 1 or not 0 <= args.sse < args.connections:
        parser.error("--requests >= 10000, --workers >= 1, 0 <= --sse < --connections")
    return args


def role(pid: int) -> str | None:
    """serve, worker-<i>, envoy, or None for a process that is none of these."""
    try:
        words = [w.decode(errors="replace") for w in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if w]
    except OSError:
        return None
    if "worker" in words and "--index" in words:
        return f"worker-{words[words.index('--index') + 1]}"
    if "serve" in words:
        return "serve"
    if any(w.endswith("envoy") for w in words):
        return "envoy"
    return None


def sample(gateway: stack.Gateway, processes: dict[str, Process], requests: int) -> None:
    """Reads every process's RSS; a restarted worker (new pid) starts a new series."""
    for pid in gateway.pids():
        name = role(pid)
        if name is None:
            continue
        try:
            rss = procstat.rss_bytes(pid) / MB
        except OSError:
            continue
        current = processes.get(name)
        if current is None or current.pid != pid:
            if current is not None:
                print(f"  ! {name} has a new pid {pid} (was {current.pid}): restarted", flush=True)
            current = processes[name] = Process(name, pid)
        current.samples.append((requests, rss))


def slope_per_100k(samples: list[tuple[int, float]]) -> float | None:
    """Least-squares growth (MB per 100k requests) over the second half of the samples."""
    half = samples[len(samples) // 2 :]
    if len(half) < 3:
        return None
    xs, ys = [x for x, _ in half], [y for _, y in half]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return None
    return 1e5 * sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread


async def load_slice(wrk_path: str, loads: list[tuple[wrk.Request, Path, int]], seconds: float) -> list[wrk.Result]:
    """The chat and SSE loads side by side for `seconds`."""
    return list(
        await asyncio.gather(
            *(wrk.run(wrk_path, r.url, script, connections=c, seconds=seconds) for r, script, c in loads)
        )
    )


def snapshot(processes: dict[str, Process]) -> None:
    """Asks every worker for a tracemalloc snapshot (server.memory)."""
    for process in processes.values():
        if process.role.startswith("worker"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGUSR2)


async def soak(args: argparse.Namespace, wrk_path: str, work_dir: Path) -> tuple[dict[str, Process], int, int]:
    processes: dict[str, Process] = {}
    failures = total = 0
    step = args.requests / SLICES
    if args.tracemalloc:
        os.environ["AIGNE_HUB_TRACEMALLOC_DIR"] = str(work_dir / "tracemalloc")
    async with stack.fake(work_dir) as fake:
        key = await stack.create_key(work_dir)
        async with stack.gateway(work_dir, fake.url, key, args.workers) as gateway:
            url = f"{gateway.url}/v1/chat/completions"
            chat = wrk.Request(url, FAKE_CONTENT, "POST", chat_body("json/gpt-4o-mini"), key)
            sse = wrk.Request(url, DONE, "POST", chat_body("sse/gpt-4o-mini", True), key)
            loads = [(chat, wrk.write_script(chat, work_dir, "soak-chat"), args.connections - args.sse)]
            if args.sse:
                loads.append((sse, wrk.write_script(sse, work_dir, "soak-sse"), args.sse))
            sample(gateway, processes, 0)
            print(f"{'requests':>10} {'req/s':>7} {'load':>5}  RSS MB per process", flush=True)
            _print_row(0, 0.0, processes)
            rate, snapped = 0.0, False
            while total < args.requests:
                # The first slice measures the rate; later ones last ~5 % of the run.
                seconds = 5.0 if rate == 0 else max(1.0, min(step, args.requests - total) / rate)
                started = time.monotonic()
                results = await load_slice(wrk_path, loads, seconds)
                rate = sum(r.requests for r in results) / (time.monotonic() - started)
                total += sum(r.requests for r in results)
                failures += sum(r.failures for r in results)
                sample(gateway, processes, total)
                _print_row(total, rate, processes)
                if args.tracemalloc and not snapped and total >= args.requests / 2:
                    snapshot(processes)
                    snapped = True
            if args.tracemalloc:
                snapshot(processes)
                await asyncio.sleep(5)
    return processes, total, failures


def _print_row(requests: int, rate: float, processes: dict[str, Process]) -> None:
    cells = "  ".join(f"{p.role} {p.samples[-1][1]:.1f}" for p in sorted(processes.values(), key=_order))
    print(f"{requests:>10,} {rate:>7.0f} {os.getloadavg()[0]:>5.2f}  {cells}", flush=True)


def _order(process: Process) -> tuple[int, str]:
    return ({"serve": 0, "envoy": 2}.get(process.role, 1), process.role)


def verdict(processes: dict[str, Process], total: int) -> tuple[str, bool]:
    """The summary lines, and whether every server process met the goal."""
    lines, ok = [f"after {total:,} requests (slope: MB per 100k requests over the second half):"], True
    for process in sorted(processes.values(), key=_order):
        values = [rss for _, rss in process.samples]
        slope = slope_per_100k(process.samples)
        server = process.role != "envoy"  # the goal is per server process; Envoy is shown
        met = max(values) <= GOAL_MB and (slope is None or slope < FLAT_MB_PER_100K)
        if server:
            ok = ok and met
        shown = "n/a" if slope is None else f"{slope:+.2f}"
        mark = "ok" if met else ("GROWS" if max(values) <= GOAL_MB else "OVER 150 MB")
        mark = mark if server else "(Envoy, not a server process)"
        lines.append(
            f"  {process.role:<9} start {values[0]:6.1f}  end {values[-1]:6.1f}  max {max(values):6.1f} MB  "
            f"slope {shown:>6} MB/100k  {mark}"
        )
    goal = f"<= {GOAL_MB:.0f} MB per server process and < {FLAT_MB_PER_100K} MB/100k over the second half"
    lines.append(f"verdict: {'MET' if ok else 'NOT MET'} ({goal})")
    return "\n".join(lines), ok


def print_tracemalloc(work_dir: Path) -> None:
    """Per worker: the allocation sites that grew most between its two snapshots."""
    import tracemalloc

    folder = work_dir / "tracemalloc"
    by_pid: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.snap")):
        by_pid.setdefault(path.name.split("-")[0], []).append(path)
    for pid, paths in by_pid.items():
        if len(paths) < 2:
            continue
        first, last = (tracemalloc.Snapshot.load(str(p)) for p in (paths[0], paths[-1]))
        print(f"\ntracemalloc, worker pid {pid}: grew most between the half and the end of the run")
        for stat in last.compare_to(first, "lineno")[:15]:
            print(f"  {stat}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk_path = wrk.ensure_installed()
    work_dir = Path(tempfile.mkdtemp(prefix="aigne-hub-soak-"))
    print(
        f"soak: {args.requests:,} requests, serve --workers {args.workers}, {args.connections - args.sse} chat + "
        f"{args.sse} SSE connections; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    try:
        processes, total, failures = asyncio.run(soak(args, wrk_path, work_dir))
    except KeyboardInterrupt:
        print("\nsoak: interrupted; processes stopped", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, TimeoutError) as exc:
        print(f"\nsoak: FAILED: {exc}\n(logs in {work_dir})", file=sys.stderr)
        return 1
    finally:
        procstat.terminate_children()
    summary, ok = verdict(processes, total)
    print("\n" + summary)
    if failures:
        print(f"failed requests: {failures} (non-2xx, socket errors or unexpected bodies)")
    if args.tracemalloc:
        print_tracemalloc(work_dir)
    print(f"\n(logs: {work_dir})")
    return 0 if ok and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
