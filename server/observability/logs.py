"""Logs: readable text by default, JSON lines with AIGNE_HUB_LOG_FORMAT=json, and one
line per call (logger `aigne_hub.calls`, INFO) with its request id, key id (never the
key), owner, model asked for, served deployment (and the id of the stored provider
credential it used, if any), outcome, reason, latency, attempts and tokens.

The request id. Envoy gives every REST request an `x-request-id` (a fresh UUID: it
does not trust a client's, `use_remote_address`), passes it to the gRPC server as
metadata and logs it in its JSON access log; a gRPC client may send its own. The
gateway uses it for the call's log line, the upstream request (`x-request-id` header)
and the ledger record: the record's id is `<x-request-id>:<12 hex digits>`, so that a
client that sends one id twice cannot have its second call recorded as a duplicate
(the ledger keeps one record per id and would charge once). Without one the gateway
makes a UUID. An id longer than 64 characters or with characters outside
`[A-Za-z0-9._-]` is replaced.

Secrets: the per-call line carries ids and names only. Other lines are free text
(which may quote an upstream message): the JSON formatter redacts them with
`server.redaction.redact` before writing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
import uuid
from contextvars import ContextVar
from typing import Any

from server.accounts.observer import FinishedCall
from server.redaction import redact

CALLS_LOGGER = "aigne_hub.calls"
REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_CHARS = 64
_REQUEST_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}")
# The current call's request id, for log records only (a logging filter cannot be
# handed the call): set once when a call starts, copied into its `server.calls.Call`,
# which is what carries it to the upstream request and the ledger.
REQUEST_ID: ContextVar[str | None] = ContextVar("aigne_hub_request_id", default=None)

call_log = logging.getLogger(CALLS_LOGGER)


def take_request_id(metadata: Any) -> str:
    """The call's request id: the caller's (or Envoy's) `x-request-id` when
    well-formed, else a new UUID; made current for the upstream request and the ledger."""
    request_id = None
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            request_id = value
    request_id = request_id or str(uuid.uuid4())
    REQUEST_ID.set(request_id)
    return request_id


def current_request_id() -> str | None:
    """The request id `take_request_id` set for the call running now (None outside one)."""
    return REQUEST_ID.get()


def ledger_request_id(request_id: str | None) -> str | None:
    """The ledger record's id for a call with `request_id` (see the module docstring)."""
    # 12 random hex digits, as uuid4().hex[:12] gave, without building a UUID per call.
    return None if request_id is None else f"{request_id}:{_SUFFIXES.take()}"


class _RandomHex:
    """12 hex digits of the system's random source per call, read 1,024 at a time: one
    getrandom syscall per call cost about 40 us on the shared test machines."""

    BATCH = 1024

    def __init__(self) -> None:
        self._hex = ""
        self._at = 0

    def take(self) -> str:
        at = self._at
        if at >= len(self._hex):
            self._hex, at = os.urandom(6 * self.BATCH).hex(), 0
        self._at = at + 12
        return self._hex[at : at + 12]

    def forget(self) -> None:
        self._hex, self._at = "", 0


_SUFFIXES = _RandomHex()
# A forked child must not hand out its parent's next suffixes.
os.register_at_fork(after_in_child=_SUFFIXES.forget)


class CallLog:
    """Writes one line per finished call (a `CallObserver`)."""

    def call_started(self, operation: str) -> None:
        return None

    def call_finished(self, call: FinishedCall) -> None:
        if not call_log.isEnabledFor(logging.INFO):
            return
        record = call.record
        fields = {
            "request_id": record.request_id,
            "key_id": record.key_id,
            "owner_id": record.owner_id,
            "operation": record.operation,
            "model": call.public_model,
            "deployment": record.model,
            "credential_id": call.credential_id,
            "outcome": record.outcome,
            "reason": record.error_reason,
            "latency_ms": round(call.duration_s * 1000, 1) if call.duration_s is not None else None,
            "ttft_ms": record.ttft_ms,
            "attempts": record.attempts,
            "input_tokens": record.input_tokens,
            "output_tokens": record.output_tokens,
            "trace_id": call.trace_id,
        }
        call_log.info("call %s %s %s", record.operation, record.outcome, record.model, extra={"call": fields})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a call's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            # Which process wrote it: `serve --workers N` runs several.
            "pid": record.process,
        }
        call = getattr(record, "call", None)
        if isinstance(call, dict):
            line["message"] = record.getMessage()
            line.update((k, v) for k, v in call.items() if v is not None)
        else:
            line["message"] = redact(record.getMessage())
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The readable default; a call's line gets its main fields appended."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        call = getattr(record, "call", None)
        if isinstance(call, dict):
            text += " " + " ".join(f"{k}={v}" for k, v in call.items() if v is not None)
        return text


class TurnBatchedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes the lines logged in one turn of the event loop
    together, at the end of that turn: stderr is line-buffered, so each line was its
    own write syscall (one per call for the call log, about 50 us each on the shared
    test machines). A line logged outside the loop's thread, or with no loop running,
    is written at once, as StreamHandler does; `flush` (at exit too) writes what waits."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._waiting: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write(line, record)
            return
        if not self._waiting:
            loop.call_soon(self.flush)
        self._waiting.append(line)

    def flush(self) -> None:
        waiting, self._waiting = self._waiting, []
        with self.lock:  # type: ignore[union-attr]
            try:
                if waiting:
                    self.stream.write("".join(waiting))
                self.stream.flush()
            except Exception:  # noqa: BLE001 - as StreamHandler: a closed stderr must not end a call
                pass

    def _write(self, line: str, record: logging.LogRecord) -> None:
        with self.lock:  # type: ignore[union-attr]
            try:
                self.stream.write(line)
                self.stream.flush()
            except Exception:  # noqa: BLE001 - logging's own contract
                self.handleError(record)


def configure_logging(level: str, log_format: str) -> None:
    """Sets up the root logger: `json` lines or readable `text`, on stderr.

    Neither format prints where a record was logged from, nor the thread: logging is
    told not to work them out for every record (the logging HOWTO's "Optimization":
    `_srcfile`, `logThreads`, `logMultiprocessing`), which halves the cost of a call's
    log line (about 33 -> 17 us on the shared test machines)."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = TurnBatchedHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
