"""Observability: Prometheus metrics on their own listener (`metrics`), one log line
per call and the request id (`logs`), and the hooks that connect them to the
accounts, routing and ledger layers.

The metrics listener is separate from the public REST port (Envoy never routes to it):
`/metrics` in Prometheus text format on AIGNE_HUB_METRICS_HOST:AIGNE_HUB_METRICS_PORT
(default 127.0.0.1:9464; port 0 picks a free one; AIGNE_HUB_METRICS_ENABLED=false turns
it off). Each server process has its own listener and registry: with several processes
on one host, give each its own port and scrape each (the documented choice: no shared
multiprocess files to clean up, and a process's counters restart with it, which
Prometheus's rate() handles).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_wsgi_server

from server.accounts.observer import CallObserver, FinishedCall
from server.accounts.service import Accounts
from server.observability.logs import CallLog
from server.observability.metrics import GatewayMetrics
from server.routing.attempts import Routing
from server.routing.router import Router

log = logging.getLogger(__name__)


@dataclass
class MetricsListener:
    """The running `/metrics` HTTP server (a daemon thread of prometheus-client)."""

    metrics: GatewayMetrics
    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class Observers:
    """Tells each of several observers, in turn."""

    def __init__(self, *observers: CallObserver) -> None:
        self._observers = observers

    def call_started(self, operation: str) -> None:
        for observer in self._observers:
            observer.call_started(operation)

    def call_finished(self, call: FinishedCall) -> None:
        for observer in self._observers:
            observer.call_finished(call)


def instrument(
    accounts: Accounts, routing: Routing, router: Router, *, metrics_on: bool, owner_labels: bool = False
) -> GatewayMetrics | None:
    """The per-call log line, and metrics (when on) fed by `accounts` (calls, ledger)
    and `routing` (attempts)."""
    if not metrics_on:
        accounts.observer = CallLog()
        return None
    known_models = {m.id for m in router.catalog()} | router.configured_models()
    metrics = GatewayMetrics(known_models, router.providers.keys(), owner_labels=owner_labels)
    accounts.observer = Observers(metrics, CallLog())
    accounts.ledger.on_commit = metrics.ledger_committed
    metrics.watch_ledger_queue(lambda: accounts.ledger.queue_depth)
    routing.on_attempt = metrics.attempt
    return metrics


def serve_metrics(metrics: GatewayMetrics, host: str, port: int) -> MetricsListener:
    """Starts the `/metrics` listener on host:port (0: any free port)."""
    try:
        server, thread = start_wsgi_server(port, host, metrics.registry)
    except OSError as exc:
        raise OSError(f"cannot listen for metrics on {host}:{port} (AIGNE_HUB_METRICS_PORT): {exc}") from exc
    bound = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return MetricsListener(metrics, host, int(bound), server, thread)
