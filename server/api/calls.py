"""What every servicer method shares: turning exceptions into statuses, reading
call metadata, and running a call over its routing plan with its meter.

A call that reaches providers goes: plan (the model's deployments and fallbacks, see
`server.routing.router`) -> meter (allow-list, credits, one ledger record) -> attempts
(`server.routing.attempts`: retries, fallbacks, cooldowns, timeouts), each attempt
pointing the meter at its deployment first. What the upstream request carries of the
call travels as one object, `server.calls.Call`, built here (request id, key, owner,
deadline), copied by the routing per attempt (number, the credential the meter picked),
given the attempt's trace context, and handed to the adapter, which hands it to the
transport. The key comes from the auth interceptor's context variable, read once here:
a gRPC interceptor can hand a handler nothing else. The answer carries which deployment
served it and after how many attempts (`x-aigne-hub-served-by`, `x-aigne-hub-attempts`,
and `x-aigne-hub-credential` with the id of the stored provider credential that served
it, if one did: each stored credential is a deployment, see
`server.api.credential_deployments`), as initial and trailing metadata, which the REST
bridge passes on as HTTP headers (a unary call's as trailing metadata only when the
bridge says it copies them from there: `x-aigne-answer-headers`), and,
when a rate limit applies to the key (server.limits), OpenAI's `x-ratelimit-*` headers
of its tightest limits.

The caller may send its own fallback chain (`x-aigne-hub-fallbacks: a/b,c/d`) and a
shorter limit for the whole call (`x-aigne-hub-timeout-s`; a gRPC deadline works too).
Each attempt is bounded by the model's `first_token_s` until its answer (unary) or its
first chunk (streams), and a stream by `idle_s` between chunks: the HTTP read timeout
applies to each socket read, so an upstream that trickles bytes would never hit it.
The server always decides before the REST bridge's longer limits cut the call.

Observability (server.observability): each call takes its request id from
`x-request-id` (Envoy's, or a gRPC client's) before anything else, runs in a SERVER
span when tracing is on, and each attempt is timed (the meter's upstream time, from
which the gateway's overhead is derived) and, when tracing is on, runs in a CLIENT span.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import Message
from grpc._cython import cygrpc

from server import errors
from server.accounts.credentials import Credential
from server.accounts.errors import ModelNotAllowed
from server.accounts.service import Accounts, Meter, PromptTokens, WorstCase
from server.api.auth import CURRENT_KEY
from server.api.call_metadata import FALLBACKS_HEADER, TIMEOUT_HEADER, call_metadata
from server.api.credential_deployments import with_credentials
from server.api.errors import to_grpc_status, unexpected_error_status
from server.api.validation import check_request
from server.calls import Call, CallCredential
from server.config import CooldownConfig, RoutingConfig
from server.observability import tracing
from server.observability.logs import current_request_id, ledger_request_id, take_request_id
from server.providers.base import JSON, Capability
from server.routing.attempts import Routing, Served, idle_bounded
from server.routing.cooldown import MemoryCooldowns
from server.routing.router import Plan, Router, Target

S = TypeVar("S")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
T = TypeVar("T")
R = TypeVar("R")

# The ledger's operation names of the RPCs that call providers.
OPERATIONS = {
    "CreateChatCompletion": "chat",
    "create_printed": "chat",  # ChatServicer's CreateChatCompletion for BridgeService
    "StreamChatCompletion": "chat_stream",
    "CreateEmbedding": "embedding",
    "CreateImage": "image",
    "CreateSpeech": "speech",
    "CreateTranscription": "transcription",
    "UploadTranscription": "transcription",
}

# Routing metadata: what the answer says (what the caller may ask for, and the REST
# bridge's markers, are read in server.api.call_metadata).
SERVED_BY_HEADER = "x-aigne-hub-served-by"
# The stored provider credential (its id, never the secret) that served the call.
CREDENTIAL_HEADER = "x-aigne-hub-credential"
ATTEMPTS_HEADER = "x-aigne-hub-attempts"
MAX_CALLER_FALLBACKS = 5
MAX_MODEL_NAME_CHARS = 200


async def abort_for(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> None:
    """Ends the call with the status for `exc` (never returns)."""
    if isinstance(exc, errors.GatewayError):
        await context.abort_with_status(to_grpc_status(exc))
    await context.abort_with_status(unexpected_error_status(exc))


def unary(
    method: Callable[[S, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[S, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    """Wraps a unary method so that the request is checked against the contract
    (REQUIRED fields, documented limits) first, and every exception becomes a proper
    status."""

    @functools.wraps(method)
    async def wrapper(self: S, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        take_request_id(call_metadata(context).marked)
        try:
            if isinstance(request, Message):
                check_request(request)
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            if isinstance(self, MeteredServicer):
                await self.record_refusal(method.__name__, request, exc)
            await abort_for(context, exc)
            raise  # unreachable: abort_for raises

    return wrapper


def from_rest(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """Whether the call came through the REST bridge (its answer is printed as JSON)."""
    return call_metadata(context).from_rest


def from_bridge(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """Whether the call came through the REST bridge as an SSE stream."""
    return call_metadata(context).from_bridge


def wants_json_nulls(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """Whether the answer goes to an OpenAI REST client, whose schemas want JSON nulls
    (the bridge marks OpenAI's chat requests only: AIGNE's protocol does not)."""
    return call_metadata(context).wants_json_nulls


@dataclass(frozen=True, slots=True)
class CallOptions:
    """What the caller asked of the routing, from its metadata."""

    fallbacks: tuple[str, ...] = ()
    timeout_s: float | None = None


def call_options(context: grpc.aio.ServicerContext[Any, Any]) -> CallOptions:
    """The caller's fallback chain and time limit; INVALID_ARGUMENT when malformed."""
    fallbacks: tuple[str, ...] = ()
    timeout_s = None
    for key, value in call_metadata(context).marked:
        if key == FALLBACKS_HEADER and isinstance(value, str):
            fallbacks = tuple(name.strip() for name in value.split(",") if name.strip())
            if len(fallbacks) > MAX_CALLER_FALLBACKS or any(len(n) > MAX_MODEL_NAME_CHARS for n in fallbacks):
                raise errors.InvalidRequest(
                    f"{FALLBACKS_HEADER} takes at most {MAX_CALLER_FALLBACKS} models of at most "
                    f"{MAX_MODEL_NAME_CHARS} characters, comma-separated",
                    field=FALLBACKS_HEADER,
                )
        elif key == TIMEOUT_HEADER and isinstance(value, str):
            timeout_s = _positive_seconds(value)
    return CallOptions(fallbacks, timeout_s)


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 86_400:  # also refuses NaN
        raise errors.InvalidRequest(
            f"{TIMEOUT_HEADER} must be a number of seconds above 0 and at most 86400, not {text[:40]!r}",
            field=TIMEOUT_HEADER,
        )
    return seconds


class Routed(Generic[T]):
    """One metered call running over its plan (see the module docstring). `call` is the
    call as the upstream sees it; the routing gives each attempt its copy with its
    number and the credential the meter chose for it; the trace context is added here."""

    def __init__(
        self,
        routing: Routing,
        plan: Plan[T],
        meter: Meter,
        context: grpc.aio.ServicerContext[Any, Any],
        call: Call,
        span: tracing.CallSpan | None = None,
        credentials: dict[str, Credential] | None = None,
    ) -> None:
        self.meter = meter
        # The stored credentials the plan's deployments use, by id.
        self._credentials = credentials or {}
        self._span = span
        self.plan = plan
        self.call = call
        self._routing = routing
        self._context = context

    async def run(
        self, attempt: Callable[[Target[T], Call], Awaitable[R]], *, headers_first: bool = True
    ) -> Served[T, R]:
        """Runs the attempts; the answer's metadata goes as trailing metadata and, with
        `headers_first`, ahead of the answer as initial metadata too."""
        served = await self._routing.run(self.plan, self._timed(attempt), call=self.call, before_attempt=self._use)
        credential = served.target.credential_id
        metadata = (
            (SERVED_BY_HEADER, served.target.route.public_model),
            (ATTEMPTS_HEADER, str(served.attempts)),
            *(((CREDENTIAL_HEADER, credential),) if credential else ()),
            *self.meter.limit_headers(),
        )
        try:
            if headers_first:
                await self._context.send_initial_metadata(metadata)
        except cygrpc.BaseError as exc:
            # grpc-core could not send the answer's headers: the call is gone (its client
            # left, or its connection broke, before grpc told this task). Nothing can
            # reach the client, so the call ends as a cancelled one (the meter records
            # it so) rather than as a gateway error.
            raise asyncio.CancelledError(f"the client left before the answer: {exc}") from exc
        self._context.set_trailing_metadata(metadata)
        return served

    def _timed(self, attempt: Callable[[Target[T], Call], Awaitable[R]]) -> Callable[[Target[T], Call], Awaitable[R]]:
        """`attempt` with its call, adding its time to the meter's upstream time (the
        gateway's own overhead is the rest)."""
        meter, call_span = self.meter, self._span

        async def timed(target: Target[T], call: Call) -> R:
            route = target.route
            started = time.perf_counter()
            try:
                with tracing.attempt_span(meter.operation, route.provider.name, route.upstream_model) as span:
                    # The attempt's span is current here: the upstream request continues it.
                    result = await attempt(target, call.with_trace(tracing.upstream_headers()))
                    if span is not None:
                        tracing.note_answer(span, call_span, result)
                    return result
            finally:
                meter.upstream_s += time.perf_counter() - started

        return timed

    async def unary(self, send: Callable[[T, str, Call], Awaitable[R]]) -> Served[T, R]:
        """Runs a unary call, `send(adapter, upstream model, call)` per attempt, each
        bounded by `first_token_s` until its answer. When the REST bridge makes the
        answer's headers from its trailers, they are not sent ahead of it: a separate
        send of initial metadata is a grpc batch of its own, and leaving it out took
        about 5 % off a chat call's CPU (server and Envoy, the bridge's copying
        included)."""
        limit = self.plan.timeouts.first_token_s

        async def attempt(target: Target[T], call: Call) -> R:
            provider = target.route.provider.name
            try:
                async with asyncio.timeout(limit):
                    return await send(target.adapter, target.route.upstream_model, call)
            except TimeoutError:
                raise errors.UpstreamTimeout(
                    f"{provider} did not answer in time (no answer within {limit:g} s)", provider=provider
                ) from None

        return await self.run(attempt, headers_first=not call_metadata(self._context).answer_headers_from_trailers)

    async def stream(
        self, open_stream: Callable[[T, str, Call], AsyncGenerator[JSON, None]]
    ) -> tuple[Served[T, JSON | None], AsyncGenerator[JSON, None]]:
        """Opens a stream: attempts are retried until one yields its first chunk (then
        no more: a chunk may have reached the client). Returns the first chunk and the
        rest, bounded by `idle_s` between chunks; the caller closes the rest."""
        limit = self.plan.timeouts.first_token_s
        opened: list[AsyncGenerator[JSON, None]] = []

        async def attempt(target: Target[T], call: Call) -> JSON | None:
            chunks = open_stream(target.adapter, target.route.upstream_model, call)
            provider = target.route.provider.name
            try:
                async with asyncio.timeout(limit):
                    first = await anext(chunks)
            except StopAsyncIteration:
                first = None
            except TimeoutError:
                await chunks.aclose()
                raise errors.UpstreamTimeout(
                    f"{provider} did not answer in time (no first chunk within {limit:g} s)", provider=provider
                ) from None
            except BaseException:
                await chunks.aclose()
                raise
            opened.append(chunks)
            return first

        served = await self.run(attempt)
        provider = served.target.route.provider.name
        return served, _rest_of(opened[-1], self.plan.timeouts.idle_s, provider)

    async def _use(self, target: Target[T], public_model: str) -> CallCredential | None:
        """Points the meter at the attempt's deployment; the credential it picked."""
        header = getattr(target.route.provider, "credential_header", None)
        credential = self._credentials.get(target.credential_id) if target.credential_id else None
        await self.meter.use(target.route.provider.name, target.route.upstream_model, public_model, header, credential)
        self.meter.attempts += 1
        return self.meter.credential


async def _rest_of(
    chunks: AsyncGenerator[JSON, None], idle_s: float | None, provider: str
) -> AsyncGenerator[JSON, None]:
    """The chunks after the first, each within `idle_s` of the one before; closes the
    upstream stream whatever happens (which is how a client's cancellation reaches it)."""
    async with aclosing(chunks):
        async for chunk in idle_bounded(chunks, idle_s, provider):
            yield chunk


class MeteredServicer:
    """Base of the servicers that call providers: routing plus the per-call meter."""

    def __init__(self, router: Router, accounts: Accounts, routing: Routing | None = None) -> None:
        self._router = router
        self._accounts = accounts
        if routing is None:
            config = RoutingConfig()
            routing = Routing(config, MemoryCooldowns(config.cooldown or CooldownConfig()))
        self._routing = routing

    def _plan(
        self,
        model: str,
        capability: Capability,
        interface: type[T],
        context: grpc.aio.ServicerContext[Any, Any],
        features: tuple[Capability, ...] = (),
    ) -> tuple[Plan[T], CallOptions]:
        """The call's plan, with the caller's own fallbacks checked against its key."""
        options = call_options(context)
        key = CURRENT_KEY.get()
        if key is not None:
            for fallback in options.fallbacks:
                if not key.allows(fallback) and not any(key.allows(d) for d in self._deployments(fallback)):
                    raise ModelNotAllowed(
                        f"the fallback {fallback!r} in {FALLBACKS_HEADER} is outside the API key's allow-list",
                        metadata={"model": fallback[:MAX_MODEL_NAME_CHARS]},
                    )
        return self._router.plan(model, capability, interface, features, options.fallbacks), options

    def _deployments(self, model: str) -> list[str]:
        try:
            return self._router.deployments(model)
        except errors.GatewayError:
            return []

    @asynccontextmanager
    async def _routed(
        self,
        plan: Plan[T],
        options: CallOptions,
        context: grpc.aio.ServicerContext[Any, Any],
        operation: str,
        worst_case: WorstCase,
        prompt_tokens: PromptTokens = 0,
    ) -> AsyncIterator[Routed[T]]:
        """The metered call over `plan`: the meter opens on the plan's first deployment
        (allow-list, reservation) and records the call when the block ends. Stored
        provider credentials become deployments of their provider first."""
        plan, credentials = await with_credentials(plan, self._accounts.vault)
        first = plan.primary.targets[0].route
        header = getattr(first.provider, "credential_header", None)
        key = CURRENT_KEY.get()  # the interceptor's hand-off: read once, then the call carries it
        deadline = self._routing.deadline_for(plan, options.timeout_s, context.time_remaining())
        call = Call(
            request_id=current_request_id(),
            key_id=key.id if key else None,
            owner_id=key.owner_id if key else None,
            deadline=deadline,
        )
        meter = self._accounts.meter(
            key,
            first.provider.name,
            first.upstream_model,
            operation,
            worst_case,
            header,
            prompt_tokens,
            public_model=plan.primary.model,
            request_id=ledger_request_id(call.request_id),
        )
        span = tracing.start_call(operation, plan.primary.model, call_metadata(context).marked)
        if span is None:
            async with meter:
                yield Routed(self._routing, plan, meter, context, call, credentials=credentials)
            return
        meter.trace_id = span.trace_id
        error: BaseException | None = None
        try:
            async with meter:
                yield Routed(self._routing, plan, meter, context, call, span, credentials)
        except BaseException as exc:
            error = exc
            raise
        finally:
            span.end(meter.last_record, error)

    async def record_refusal(self, method: str, request: Any, exc: Exception) -> None:
        """A call that failed before its meter started still leaves a ledger record."""
        if not isinstance(exc, errors.GatewayError) or exc.recorded:
            return  # the call's meter recorded it already
        if isinstance(exc, errors.StorageUnavailable):
            return  # the ledger is in that database: trying would only wait again
        model = getattr(request, "model", "") or ""
        operation = OPERATIONS.get(method, method)
        request_id = ledger_request_id(current_request_id())
        await self._accounts.record_refusal(CURRENT_KEY.get(), operation, model, exc, request_id)
