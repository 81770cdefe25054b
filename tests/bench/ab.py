"""Paired A/B: is one gateway cheaper than another, beyond this machine's noise?

`make bench` compares targets measured within a minute of each other; a code change
moves CPU per call by a few percent, less than these shared machines drift in a minute.
This starts two gateways at once (A and B, each `aigne-hub serve` of a checkout of its
own, with variables of its own) on one fake upstream and loads them in turn, A then B
then A..., with wrk at one concurrency, `--rounds` times. Each round gives B/A ratios of
CPU per call (the gateway's processes: serve, workers, Envoy), req/s and p50; a drift of
the machine moves both sides of a round alike. Printed: each round, then the mean of
the rounds' ratios with two standard errors (a ratio whose interval excludes 1.00 is a
change).

    python -m tests.bench.ab --b-repo ../wt-b --kind chat --conns 16
    python -m tests.bench.ab --b-env AIGNE_HUB_CREDIT_BLOCK_CALLS=0 --billing --conns 1

A checkout for the other side: `git worktree add ../wt-b <rev> --detach` and link this
checkout's `.venv` into it (both sides run this checkout's interpreter; each runs its
own `server/`). PostgreSQL: `--postgres a|b|both` gives each such side a new database
of its own on BENCH_POSTGRES_URL's server (migrated first, dropped at the end), and its
CPU column then counts the PostgreSQL backends serving it too (the share printed as
"db"); `--a-env AIGNE_HUB_DATABASE_URL=...` uses a database you made (its backends not
counted).

    python -m tests.bench.ab --postgres both --billing b --conns 16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import math
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.bench import stack, wrk
from tests.bench.measure import Phase, Target, gateway_targets, measure


@dataclass(frozen=True)
class Side:
    name: str
    repo: Path
    env: dict[str, str]
    billing: bool
    postgres: bool


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--a-repo", type=Path, default=stack.REPO, help="checkout A runs (default: this one)")
    parser.add_argument("--b-repo", type=Path, default=stack.REPO, help="checkout B runs (default: this one)")
    parser.add_argument("--a-env", action="append", default=[], metavar="NAME=VALUE", help="a variable for A")
    parser.add_argument("--b-env", action="append", default=[], metavar="NAME=VALUE", help="a variable for B")
    parser.add_argument("--billing", choices=("none", "a", "b", "both"), default="none", help="which side bills")
    parser.add_argument(
        "--postgres", choices=("none", "a", "b", "both"), default="none", help="which side gets a PostgreSQL database"
    )
    parser.add_argument("--kind", choices=("chat", "sse", "status"), default="chat", help="request kind")
    parser.add_argument("--conns", type=int, default=16, help="wrk connections")
    parser.add_argument("--rounds", type=int, default=8, help="rounds (A then B, or B then A)")
    parser.add_argument("--seconds", type=int, default=4, help="measured window per run, whole seconds")
    parser.add_argument("--workers", type=int, default=1, help="gRPC workers per gateway")
    args = parser.parse_args(argv)
    if args.conns < 1 or args.rounds < 2 or args.seconds < 1 or args.workers < 1:
        parser.error("--conns >= 1, --rounds >= 2, --seconds >= 1, --workers >= 1")
    return args


def _env(pairs: list[str]) -> dict[str, str]:
    found = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"expected NAME=VALUE, got {pair!r}")
        found[name] = value
    return found


async def _side(
    running: contextlib.AsyncExitStack, side: Side, work: Path, fake_url: str, args: argparse.Namespace
) -> Target:
    """Starts `side`'s gateway (with a key of its own) and returns its target of `args.kind`."""
    home = work / side.name
    home.mkdir()
    env = dict(side.env)
    backends = None
    if side.postgres:
        url = await running.enter_async_context(stack.postgres_database(f"aigne_ab_{side.name.lower()}"))
        env["AIGNE_HUB_DATABASE_URL"] = url
        backends = functools.partial(stack.postgres_backends, url)
    if "AIGNE_HUB_DATABASE_URL" in env:
        await stack.cli(home, "migrate", repo=side.repo, env=env)
    key = await stack.create_key(home, side.repo, env)
    gateway = await running.enter_async_context(
        stack.gateway(home, fake_url, key, args.workers, billing=side.billing, repo=side.repo, env=env, name=side.name)
    )
    found = gateway_targets(side.name, gateway.url, key, gateway.pids, status=True, also_cpu=backends)
    return next(t for t in found if t.key == f"{side.name}-{args.kind}")


Ratios = tuple[float, float, float]  # B/A: CPU per call, req/s, p50


def _ratios(a: Phase, b: Phase) -> Ratios:
    def cpu(phase: Phase) -> float:
        return phase.cpu_s / max(phase.result.requests, 1)

    return cpu(b) / cpu(a), b.result.rps / max(a.result.rps, 1e-9), b.result.p50_s / max(a.result.p50_s, 1e-9)


def _mean_2se(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = 2 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{mean:.3f}x (+-{spread:.3f})"


def _line(phase: Phase) -> str:
    result = phase.result
    cpu_ms = 1e3 * phase.cpu_s / max(result.requests, 1)
    p50_ms = result.p50_s * 1e3
    db = f" (db {1e3 * phase.also_cpu_s / max(result.requests, 1):4.2f})" if phase.target.also_cpu else ""
    return f"{result.rps:8.0f} req/s  p50 {p50_ms:7.2f} ms  CPU {cpu_ms:5.2f}{db} ms/req  failed {result.failures}"


async def _round(index: int, loads: list[tuple[Target, Path]], wrk_path: str, args: argparse.Namespace) -> Ratios:
    """One round: A then B (B then A in odd rounds, so neither always goes first)."""
    phases: dict[int, Phase] = {}
    for which in (0, 1) if index % 2 == 0 else (1, 0):
        target, script = loads[which]
        phases[which] = await measure(target, script, wrk_path, args.conns, args.seconds, settle_s=1)
    ratios = _ratios(phases[0], phases[1])
    print(f"round {index + 1}:  A {_line(phases[0])}", flush=True)
    print(f"          B {_line(phases[1])}   B/A CPU {ratios[0]:.3f}x", flush=True)
    return ratios


async def run(args: argparse.Namespace) -> int:
    wrk_path = wrk.ensure_installed()
    sides = [
        Side(name, repo.resolve(), _env(env), args.billing in (side, "both"), args.postgres in (side, "both"))
        for name, side, repo, env in (("A", "a", args.a_repo, args.a_env), ("B", "b", args.b_repo, args.b_env))
    ]
    with tempfile.TemporaryDirectory(prefix="aigne-ab-") as tmp:
        work = Path(tmp)
        async with contextlib.AsyncExitStack() as running:
            fake = await running.enter_async_context(stack.fake(work))
            loads = []
            for side in sides:
                target = await _side(running, side, work, fake.url, args)
                loads.append((target, wrk.write_script(target.request, work, target.key)))
            for target, script in loads:
                # Warms both (caches, connections, a first block of credits) before counting.
                await measure(target, script, wrk_path, args.conns, 1, settle_s=1)
            ratios = [await _round(index, loads, wrk_path, args) for index in range(args.rounds)]
    cpu, rps, p50 = (list(column) for column in zip(*ratios, strict=True))
    print(f"B/A over {args.rounds} rounds of {args.seconds} s, {args.kind}, c={args.conns}, {args.workers} worker(s):")
    print(f"  CPU per call {_mean_2se(cpu)}   req/s {_mean_2se(rps)}   p50 {_mean_2se(p50)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
