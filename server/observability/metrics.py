"""Prometheus metrics of the gateway, named after OpenTelemetry's GenAI semantic
conventions (`gen_ai.server.request.duration` is exported as
`gen_ai_server_request_duration_seconds`, with the spec's bucket boundaries) plus the
gateway's own `aigne_hub_*` metrics.

What feeds them: the accounts layer reports every call once, when its ledger record is
written (`server.accounts.observer`), so the counters and the ledger agree by
construction (token histogram sums equal the ledger's token totals); the routing
reports each deployment tried or passed over; the ledger reports each group commit.

Label values stay bounded: the model label is a model of the gateway's catalog (a
configured model, alias or catalog entry) or `other`, the provider a configured
provider or `other`, reasons are the error tree's reasons, deployments come from the
configuration. No key ids or owners, unless per-owner series are turned on
(AIGNE_HUB_METRICS_OWNER_LABELS): then `aigne_hub_owner_requests_total` and
`aigne_hub_owner_tokens_total` carry `owner_id` (the owner's id, never a key).

Cost: each label combination's child is looked up once and kept in a dict keyed by a
tuple, so a call costs a few dict lookups and the observations themselves (see
`tests/bench_metrics.py` for the figures).

`aigne_hub_gateway_overhead_seconds`: the call's time from the meter's start (after
authentication and validation) minus the time spent in upstream attempts; for streams
up to the first token only (after it, the time is the upstream's pace).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.accounts.observer import FinishedCall

# Bucket boundaries given by the GenAI semantic conventions (metrics spec).
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))  # 1, 4, 16, ... 67108864
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# The ledger's operations as GenAI operation names (the spec's well-known values).
GEN_AI_OPERATIONS = {
    "chat": "chat",
    "chat_stream": "chat",
    "embedding": "embeddings",
    "image": "generate_content",
    "speech": "generate_content",
    "transcription": "generate_content",
}
RATE_LIMIT_REASONS = frozenset({"UPSTREAM_RATE_LIMITED", "RATE_LIMITED", "SPENDING_CAP_REACHED"})
OTHER = "other"
GEN_AI_LABELS = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "error_type")


class GatewayMetrics:
    """The gateway's collectors in their own registry, and the hooks that feed them."""

    def __init__(
        self, known_models: Iterable[str] = (), known_providers: Iterable[str] = (), *, owner_labels: bool = False
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._models = frozenset(known_models)
        self._providers = frozenset(known_providers)
        self._children: dict[tuple[Any, ...], Any] = {}
        self._define()
        self._owners: tuple[Counter, Counter] | None = None
        if owner_labels:
            self._owners = (
                Counter("aigne_hub_owner_requests", "Calls per owner", ("owner_id", "outcome"), registry=self.registry),
                Counter(
                    "aigne_hub_owner_tokens",
                    "Tokens per owner",
                    ("owner_id", "gen_ai_token_type"),
                    registry=self.registry,
                ),
            )

    def _define(self) -> None:
        r = self.registry
        self.duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "GenAI server request duration (gen_ai.server.request.duration)",
            GEN_AI_LABELS,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        gen_ai_ok = GEN_AI_LABELS[:3]
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to the first token of streams (gen_ai.server.time_to_first_token)",
            gen_ai_ok,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first, streams (gen_ai.server.time_per_output_token)",
            gen_ai_ok,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.tokens = Histogram(
            "gen_ai_client_token_usage",
            "Tokens used per call (gen_ai.client.token.usage), by gen_ai_token_type input|output",
            (*gen_ai_ok, "gen_ai_token_type"),
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "aigne_hub_requests",
            "Calls by RPC (ledger operation), outcome and reason",
            ("rpc", "outcome", "reason"),
            registry=r,
        )
        self.in_flight = Gauge("aigne_hub_in_flight", "Calls and streams in progress", ("kind",), registry=r)
        self.overhead = Histogram(
            "aigne_hub_gateway_overhead_seconds",
            "Time in the gateway, upstream time excluded (streams: until the first token)",
            ("rpc",),
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.attempts = Counter(
            "aigne_hub_upstream_attempts",
            "Deployments tried (outcome ok or the failure's reason) or passed over (resting, refused)",
            ("deployment", "outcome"),
            registry=r,
        )
        self.rate_limited = Counter(
            "aigne_hub_rate_limited",
            "Calls refused or failed for a rate limit or spending cap",
            ("reason",),
            registry=r,
        )
        self.credits = Counter(
            "aigne_hub_credits_charged", "Credits charged (in credits, not micros)", ("model",), registry=r
        )
        self.ledger_commit = Histogram(
            "aigne_hub_ledger_commit_seconds",
            "Duration of one ledger group commit",
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        self.ledger_queue = Gauge(
            "aigne_hub_ledger_queue_depth", "Usage records waiting for the next group commit", registry=r
        )

    # -- hooks -------------------------------------------------------------------------

    def watch_ledger_queue(self, depth: Callable[[], int]) -> None:
        self.ledger_queue.set_function(depth)

    def ledger_committed(self, seconds: float) -> None:
        self.ledger_commit.observe(seconds)

    def attempt(self, deployment: str, outcome: str) -> None:
        self._child(self.attempts, "a", deployment, outcome).inc()

    def call_started(self, operation: str) -> None:
        self._child(self.in_flight, "f", _kind(operation)).inc()

    def call_finished(self, call: FinishedCall) -> None:
        record = call.record
        if call.duration_s is not None:
            self._child(self.in_flight, "f", _kind(record.operation)).dec()
        reason = record.error_reason or ""
        self._child(self.requests, "r", record.operation, record.outcome, reason).inc()
        if reason in RATE_LIMIT_REASONS:
            self._child(self.rate_limited, "l", reason).inc()
        operation = GEN_AI_OPERATIONS.get(record.operation, OTHER)
        provider = record.provider if record.provider in self._providers else OTHER
        model = call.public_model if call.public_model in self._models else OTHER
        if call.duration_s is not None:
            self._child(self.duration, "d", operation, provider, model, reason).observe(call.duration_s)
            self._observe_overhead(call)
        if record.input_tokens:
            self._child(self.tokens, "t", operation, provider, model, "input").observe(record.input_tokens)
        if record.output_tokens:
            self._child(self.tokens, "t", operation, provider, model, "output").observe(record.output_tokens)
        if call.ttft_s is not None and record.outcome == "ok":
            self._child(self.ttft, "ft", operation, provider, model).observe(call.ttft_s)
            if call.duration_s is not None and record.output_tokens > 1:
                per_token = (call.duration_s - call.ttft_s) / (record.output_tokens - 1)
                self._child(self.tpot, "pt", operation, provider, model).observe(per_token)
        if call.credits_micros:
            self._child(self.credits, "c", model).inc(call.credits_micros / 1_000_000)
        if self._owners is not None and record.owner_id:
            self._per_owner(self._owners, call)

    def _per_owner(self, owners: tuple[Counter, Counter], call: FinishedCall) -> None:
        record = call.record
        owner = record.owner_id or ""
        requests, tokens = owners
        self._child(requests, "or", owner, record.outcome).inc()
        if record.input_tokens:
            self._child(tokens, "ot", owner, "input").inc(record.input_tokens)
        if record.output_tokens:
            self._child(tokens, "ot", owner, "output").inc(record.output_tokens)

    def _observe_overhead(self, call: FinishedCall) -> None:
        if call.record.attempts == 0 or call.duration_s is None:
            return
        spent = call.ttft_s if call.ttft_s is not None else call.duration_s
        self._child(self.overhead, "o", call.record.operation).observe(max(spent - call.upstream_s, 0.0))

    def _child(self, metric: Any, tag: str, *labels: str) -> Any:
        """The child for these label values, made once (prometheus-client's `labels`
        validates and locks on every call)."""
        key = (tag, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child


def _kind(operation: str) -> str:
    return "stream" if operation.endswith("_stream") else "call"
