"""What the accounts layer tells an observer (metrics, logs) about each call, without
knowing who listens: `server.observability` implements `CallObserver`.

Every call that leaves a ledger record is reported once, when its record is written
(refusals before the meter started too); calls the meter started are also reported
as they start, for the in-flight gauge. Reporting is synchronous and must be cheap: it
runs on the request path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from server.accounts.ledger import UsageRecord


@dataclass(frozen=True, slots=True)
class FinishedCall:
    """One call as its ledger record has it, plus what the record does not keep."""

    record: UsageRecord
    # The model the caller asked for (alias or catalog name); the record names the deployment.
    public_model: str
    # None for a call refused before its meter started (no start time is known).
    duration_s: float | None
    # Time spent waiting on upstream attempts (for streams: until the first chunk).
    upstream_s: float = 0.0
    ttft_s: float | None = None
    credits_micros: int = 0
    # The call's trace id (32 hex digits) when tracing is on.
    trace_id: str | None = None
    # The stored provider credential (its id) the last attempt used, if any.
    credential_id: str | None = None


class CallObserver(Protocol):
    def call_started(self, operation: str) -> None: ...

    def call_finished(self, call: FinishedCall) -> None: ...
