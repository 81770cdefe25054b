"""Prints the benchmark's one table, and the ratios read from it."""

from __future__ import annotations

from collections.abc import Sequence

from tests.bench.measure import Phase

MIB = 1024 * 1024
HEADER = (
    f"{'target':<34}{'conns':>6}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}{'+p99 ms':>9}"
    f"{'CPU ms/req':>12}{'RSS MiB':>9}{'busy':>6}{'failed':>8}"
)
LEGEND = (
    "  req/s: requests completed (whole streams for SSE) per second in the row's window, once the load has\n"
    "  settled (tests/bench/measure.py); p50/p99: wrk's latency to the last byte, over the whole run;\n"
    "  +p50/+p99: over the fake called directly with the same body and connections (the latency the target adds);\n"
    "  CPU ms/req: CPU time of ALL the target's processes (gateway: serve + its workers + its Envoy; LiteLLM: its\n"
    "  processes; fake: its Envoy; PostgreSQL rows: also the PostgreSQL backends serving the gateway, not the\n"
    "  server's background writers) in the window, per request completed in it; RSS: their resident memory\n"
    "  (the gateway's only) summed after the runs (pages they share, such as forked workers' code, count in\n"
    "  each); busy: cores the whole machine kept busy in the window (wrk, the fake and the idle targets\n"
    "  included); failed: non-2xx + socket errors + unexpected bodies, over the whole run."
)


def table(phases: Sequence[Phase]) -> str:
    by_key = {(p.target.key, p.connections): p for p in phases}
    lines = [HEADER, "-" * len(HEADER)]
    for phase in phases:
        r = phase.result
        base = by_key.get((phase.target.baseline, phase.connections))
        added_p50 = f"{(r.p50_s - base.result.p50_s) * 1e3:.2f}" if base else "-"
        added_p99 = f"{(r.p99_s - base.result.p99_s) * 1e3:.2f}" if base else "-"
        lines.append(
            f"{phase.target.label:<34}{phase.connections:>6}{r.rps:>9.0f}{r.p50_s * 1e3:>9.2f}{r.p99_s * 1e3:>9.2f}"
            f"{added_p50:>9}{added_p99:>9}{phase.cpu_ms_per_request:>12.2f}{phase.rss_bytes / MIB:>9.0f}"
            f"{phase.machine_busy_cores:>6.2f}{r.failures:>8}"
        )
    return "\n".join(lines)


def ratios(phases: Sequence[Phase], workers: int, connections: Sequence[int]) -> str:
    by_key = {(p.target.key, p.connections): p for p in phases}
    lines = ["Ratios within this run (req/s):"]
    for n in connections:
        parts = []
        for kind in ("chat", "sse"):
            one, many = by_key.get((f"1w-{kind}", n)), by_key.get((f"{workers}w-{kind}", n))
            if one and many and one.result.rps:
                parts.append(f"{kind} {workers}w/1w {many.result.rps / one.result.rps:.2f}x")
            lite = by_key.get((f"litellm-{kind}", n))
            if lite and lite.result.rps and one:
                parts.append(f"{kind} 1w/litellm {one.result.rps / lite.result.rps:.1f}x")
            if lite and lite.result.rps and many:
                parts.append(f"{kind} {workers}w/litellm {many.result.rps / lite.result.rps:.1f}x")
            if lite and one and one.cpu_ms_per_request:
                parts.append(f"{kind} CPU/req litellm/1w {lite.cpu_ms_per_request / one.cpu_ms_per_request:.1f}x")
        billed, chat = by_key.get(("1w-billing-chat", n)), by_key.get(("1w-chat", n))
        if billed and chat and chat.result.rps and chat.cpu_ms_per_request:
            parts.append(
                f"chat billing on/off (1w) CPU/req {billed.cpu_ms_per_request / chat.cpu_ms_per_request:.2f}x, "
                f"req/s {billed.result.rps / chat.result.rps:.2f}x"
            )
        pg, pg_billed = by_key.get(("1w-pg-chat", n)), by_key.get(("1w-pg-billing-chat", n))
        if pg and chat and chat.result.rps and chat.cpu_ms_per_request:
            parts.append(
                f"chat PostgreSQL/SQLite (1w) CPU/req {pg.cpu_ms_per_request / chat.cpu_ms_per_request:.2f}x, "
                f"req/s {pg.result.rps / chat.result.rps:.2f}x"
            )
        if pg and pg_billed and pg.result.rps and pg.cpu_ms_per_request:
            parts.append(
                f"chat billing on/off (1w, PostgreSQL) CPU/req "
                f"{pg_billed.cpu_ms_per_request / pg.cpu_ms_per_request:.2f}x, "
                f"req/s {pg_billed.result.rps / pg.result.rps:.2f}x"
            )
        status = by_key.get(("1w-status", n))
        if status and chat and status.result.rps:
            parts.append(f"chat/trivial RPC (1w) {chat.result.rps / status.result.rps:.2f}")
        if parts:
            lines.append(f"  {n:>3} conns: " + "; ".join(parts))
    return "\n".join(lines)


def failures(phases: Sequence[Phase]) -> str:
    failed = [p for p in phases if p.result.failures]
    lines = [
        f"!!! {p.target.label} at {p.connections} conns: {p.result.failures} FAILED of {p.result.requests} "
        f"({p.result.non_2xx} non-2xx, {p.result.socket_errors} socket errors, {p.result.bad_bodies} bad bodies)"
        for p in failed
    ]
    if failed:
        lines.append("!!! Some requests failed: those rows do not measure what they claim.")
    return "\n".join(lines)
