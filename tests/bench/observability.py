"""`python -m tests.bench.observability [--calls N]`: the CPU cost of the metrics per
call, two ways.

1. The hooks alone: what one chat call adds (in-flight up and down, one upstream
   attempt, the call's histograms and counters), timed over many calls; and the
   per-call log line, formatted as text and as JSON and written to /dev/null.
2. End to end: unary chat calls over gRPC to an in-process gateway with a fake
   upstream, with metrics on and off (alternating rounds, alternating which goes first), as process CPU time per call
   (client, gateway and fake upstream together; the difference is the metrics' share).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import grpc

from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from server.accounts.ledger import UsageRecord
from server.accounts.observer import FinishedCall
from server.app import start_gateway
from server.config import CooldownConfig, GatewayConfig, ProviderConfig, RoutingConfig, Settings
from server.observability.logs import CALLS_LOGGER, CallLog, JsonFormatter, TextFormatter
from server.observability.metrics import GatewayMetrics
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import chat_request


def hooks_us_per_call(calls: int) -> float:
    metrics = GatewayMetrics({"openai/gpt-4o-mini"}, {"openai"})
    record = UsageRecord(
        request_id="r",
        provider="openai",
        model="openai/gpt-4o-mini",
        operation="chat",
        input_tokens=12,
        output_tokens=30,
        latency_ms=80,
        attempts=1,
    )
    call = FinishedCall(record, "openai/gpt-4o-mini", 0.08, 0.07, None, 1200)
    started = time.process_time()
    for _ in range(calls):
        metrics.call_started("chat")
        metrics.attempt("openai/gpt-4o-mini", "ok")
        metrics.call_finished(call)
    return (time.process_time() - started) / calls * 1e6


def log_line_us_per_call(calls: int, log_format: str) -> float:
    """The per-call log line, formatted and written (to /dev/null)."""
    record = UsageRecord(
        request_id="0b7f3c2e-6a55-4c1e-9a7e-3f1d2c4b5a69:1a2b3c4d5e6f",
        provider="openai",
        model="openai/gpt-4o-mini",
        operation="chat",
        key_id="key_123",
        owner_id="own_456",
        input_tokens=12,
        output_tokens=30,
        attempts=1,
    )
    call = FinishedCall(record, "openai/gpt-4o-mini", 0.08, 0.07, None, 1200)
    with open(os.devnull, "w") as sink:
        handler = logging.StreamHandler(sink)
        handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
        logger = logging.getLogger(CALLS_LOGGER)
        logger.addHandler(handler)
        logger.propagate, logger.level = False, logging.INFO
        try:
            started = time.process_time()
            for _ in range(calls):
                CallLog().call_finished(call)
            return (time.process_time() - started) / calls * 1e6
        finally:
            logger.removeHandler(handler)
            logger.propagate = True


async def end_to_end_us_per_call(calls: int, rounds: int) -> tuple[float, float]:
    fake = FakeOpenAI(api_key="sk-bench")
    await fake.start()
    config = GatewayConfig(
        routing=RoutingConfig(max_attempts=1, cooldown=CooldownConfig(enabled=False)),
        providers={"openai": ProviderConfig(base_url=fake.base_url, api_key="sk-bench")},
    )
    results: dict[bool, list[float]] = {True: [], False: []}
    try:
        with tempfile.TemporaryDirectory() as data:
            gateways = {}
            for enabled in (True, False):
                settings = Settings(
                    grpc_port=0,
                    metrics_port=0,
                    metrics_enabled=enabled,
                    auth_required=False,
                    data_dir=Path(data) / str(enabled),
                )
                gateways[enabled] = await start_gateway(settings, config)
            for index in range(rounds * 2):
                # Alternating which goes first: the second of a pair runs measurably cheaper.
                for enabled in (True, False) if index % 2 else (False, True):
                    results[enabled].append(await _calls_cpu_us(gateways[enabled].port, calls))
            for gateway in gateways.values():
                await gateway.stop(0.5)
    finally:
        await fake.stop()
    pairs = [on - off for on, off in zip(results[True], results[False], strict=True)]
    print(f"  per-round differences (on - off), us: {', '.join(f'{d:+.0f}' for d in pairs)}")
    return statistics.median(results[True]), statistics.median(results[False])


async def _calls_cpu_us(port: int, calls: int) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = chat_grpc.ChatServiceStub(channel)
        await stub.CreateChatCompletion(chat_request())  # warm the connection
        started = time.process_time()
        for _ in range(calls):
            await stub.CreateChatCompletion(chat_request())
        return (time.process_time() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.observability", description=__doc__)
    parser.add_argument("--calls", type=int, default=300, help="calls per end-to-end round (default 300)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    args = parser.parse_args()
    hooks = statistics.median(hooks_us_per_call(20_000) for _ in range(5))
    print(f"metrics hooks alone: {hooks:.1f} us CPU per chat call")
    for log_format in ("text", "json"):
        line = statistics.median(log_line_us_per_call(20_000, log_format) for _ in range(3))
        print(f"per-call log line ({log_format}): {line:.1f} us CPU per call")
    on, off = asyncio.run(end_to_end_us_per_call(args.calls, args.rounds))
    print(f"end to end (client + gateway + fake upstream, one process): metrics on {on:.0f} us, off {off:.0f} us")
    print(f"  difference of the medians: {on - off:+.0f} us CPU per call (compare with the rounds' spread)")


if __name__ == "__main__":
    main()
