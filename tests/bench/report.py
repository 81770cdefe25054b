"""Prints the benchmark's figures: one table row per phase, ratios, target checks."""

from __future__ import annotations

from collections.abc import Iterable

from tests.bench.measure import Phase

MIB = 1024 * 1024
HEADER = (
    f"{'target':<28}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'failed':>8}"
    f"{'gw us/req':>11}{'bridge us':>11}{'fake us':>9}{'gw CPU%':>9}{'gw RSS MiB':>12}{'fake cx':>9}"
)


def legend() -> None:
    print(
        "  req/s: completed requests (streams for d) per second; failed: non-2xx + socket errors + bad bodies;\n"
        "  us/req: CPU microseconds per request of the gRPC server (gw), the bridge Envoy and the fake Envoy;\n"
        "  gw CPU%: the gRPC server's CPU over the run (100 = one core); RSS after the run;\n"
        "  fake cx: new connections the fake upstream accepted during the run (wrk's own for c)."
    )


def row(phase: Phase) -> str:
    r = phase.result
    cpu = phase.cpu_s
    gw_cpu = cpu["gateway"]
    gw_pct = "?" if gw_cpu is None else f"{100 * gw_cpu / r.seconds:.0f}"
    return (
        f"({phase.target.key}) {phase.target.label:<24}{phase.connections:>6}{r.rps:>10.0f}"
        f"{r.p50_s * 1e3:>9.2f}{r.p99_s * 1e3:>9.2f}{r.failures:>8}"
        f"{_per_request(gw_cpu, r.requests):>11}{_per_request(cpu['bridge'], r.requests):>11}"
        f"{_per_request(cpu['fake'], r.requests):>9}{gw_pct:>9}{phase.gateway_rss / MIB:>12.1f}"
        f"{'?' if phase.fake_connections is None else phase.fake_connections:>9}"
    )


def _per_request(cpu_s: float | None, requests: int) -> str:
    if cpu_s is None or requests == 0:
        return "?"
    return f"{cpu_s / requests * 1e6:.0f}"


def streams(phases: Iterable[Phase]) -> None:
    for phase in phases:
        if phase.target.key == "d" and phase.result.requests:
            per_stream = phase.result.events / max(1, phase.result.requests)
            print(f"  (d) at {phase.connections} conns: {per_stream:.1f} SSE events per stream ([DONE] included)")


def reconnects(phases: Iterable[Phase]) -> None:
    """Warns where the gateway opened upstream connections per request instead of reusing them."""
    for p in phases:
        new = p.fake_connections
        if p.target.key != "c" and new is not None and new > 2 * p.connections + 10 and new > p.result.requests / 10:
            print(
                f"!!! ({p.target.key}) at {p.connections} conns: the gateway opened {new} upstream connections "
                f"for {p.result.requests} requests (no keep-alive reuse: each pays a TCP/TLS handshake)"
            )


def ratios(by_key: dict[tuple[str, int], Phase], connections: list[int]) -> None:
    print(f"\n{'conns':>6}{'b/a req/s':>12}{'b-c p50 ms':>13}{'b-c p99 ms':>13}{'d/b':>8}")
    for n in connections:
        a, b, c, d = (by_key.get((key, n)) for key in "abcd")
        throughput = f"{b.result.rps / a.result.rps:.2f}" if a and b and a.result.rps else "?"
        added_p50 = f"{(b.result.p50_s - c.result.p50_s) * 1e3:.2f}" if b and c else "?"
        added_p99 = f"{(b.result.p99_s - c.result.p99_s) * 1e3:.2f}" if b and c else "?"
        stream_ratio = f"{d.result.rps / b.result.rps:.2f}" if b and d and b.result.rps else "?"
        print(f"{n:>6}{throughput:>12}{added_p50:>13}{added_p99:>13}{stream_ratio:>8}")
    print("  b/a: chat throughput over the /status ceiling; b-c: latency the gateway adds to the upstream's;")
    print("  d/b: streams per second over plain chats per second.")


def checks(by_key: dict[tuple[str, int], Phase], connections: list[int]) -> None:
    """The two targets, reported (never enforced: one run on a shared machine is noisy)."""
    print("\nTarget checks (reported, not enforced):")
    top = max(connections)
    a, b = by_key.get(("a", top)), by_key.get(("b", top))
    if a and b and a.result.rps:
        ratio = b.result.rps / a.result.rps
        verdict = "MET" if ratio >= 0.5 else "NOT MET"
        print(
            f"  b at half of a or better ({top} conns): b/a = {ratio:.2f} "
            f"({b.result.rps:.0f} vs {a.result.rps:.0f} req/s) -> {verdict}"
        )
    b16, c16 = by_key.get(("b", 16)), by_key.get(("c", 16))
    if b16 and c16:
        added_ms = (b16.result.p50_s - c16.result.p50_s) * 1e3
        verdict = "MET" if added_ms < 1.0 else "NOT MET"
        print(f"  b-c under 1 ms at 16 concurrent (p50): {added_ms:.2f} ms -> {verdict}")
    else:
        print("  b-c under 1 ms at 16 concurrent: not measured (needs b and c at 16 connections)")


def failures(phases: Iterable[Phase]) -> bool:
    """Says loudly which phases had failed requests; True if any did."""
    failed = [p for p in phases if p.result.failures]
    for p in failed:
        r = p.result
        print(
            f"!!! ({p.target.key}) at {p.connections} conns: {r.failures} FAILED of {r.requests} "
            f"({r.non_2xx} non-2xx, {r.socket_errors} socket errors, {r.bad_bodies} unexpected bodies)"
        )
    if failed:
        print("!!! Some requests failed: the figures above do not measure what they claim.")
    return bool(failed)
