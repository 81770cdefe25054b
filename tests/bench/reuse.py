"""Connection reuse, from the Envoys' counters: requests per connection on each hop.

A hop that reconnects per request pays TCP (and, against a real upstream, TLS) set-up
each time: an Envoy `direct_response` that answers before reading a POST body closes
the connection, for instance, and a client that closes a response before reading it to
the end cannot reuse the connection. These counters make such costs visible."""

from __future__ import annotations

import httpx

from tests.bench.stack import Stack

_COUNTERS = {
    # (admin, counter prefix): which hop
    "client -> bridge": ("bridge", "http.openai_rest.downstream_"),
    "bridge -> gRPC server": ("bridge", "cluster.aigne_grpc.upstream_"),
}


async def report(stack: Stack) -> None:
    admins = {"bridge": stack.bridge_admin, "fake": stack.fake_admin}
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
        stats = {name: await _stats(client, url) for name, url in admins.items()}
    print("\nConnection reuse over the whole run (requests / connections opened; upstream: see 'fake cx'):")
    for hop, (admin, prefix) in _COUNTERS.items():
        requests, connections = stats[admin].get(prefix + "rq_total"), stats[admin].get(prefix + "cx_total")
        if requests is None or connections is None:
            print(f"  {hop}: counters not found")
            continue
        warning = "  <-- reconnecting per request!" if connections > 1 and requests < 4 * connections else ""
        print(f"  {hop}: {requests} / {connections}{warning}")


async def fake_connections(stack: Stack) -> int | None:
    """Connections the fake upstream has accepted so far (from wrk in (c), else the gateway)."""
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
        return (await _stats(client, stack.fake_admin)).get("http.fake_openai.downstream_cx_total")


async def _stats(client: httpx.AsyncClient, admin_url: str) -> dict[str, int]:
    try:
        text = (await client.get(f"{admin_url}/stats", params={"filter": "(rq|cx)_total$"})).text
    except httpx.HTTPError:
        return {}
    counters = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.isdigit():
            counters[name] = int(value)
    return counters
