"""The limiter: admits a call through every limit that applies to it, and settles it.

`Limiter.admit(key_id, owner_id, model, public_model, tokens)` gathers the rules of the
key and of its owner whose model glob matches the call (plus the configured defaults
for every key and every owner, `limits: {default_key: {...}, default_owner: {...}}`,
where the key or owner has no rule of its own for all models), turns them into
counters (server.limits.counters) and asks them, in one round trip, whether the call
may go. Refused: `RateLimited` (429) naming the limit, with the real wait. Admitted:
an `Admission`, whose `finish(used_tokens)` corrects the token reservation with the
call's usage and frees its slots; the meter calls it on every path (answer, error,
cancellation, shutdown).

Tokens per minute are reserved before the call from an estimate (the prompt plus the
output limit, see `Meter`), capped at the limit itself, and corrected when the call
ends. So concurrent calls cannot overshoot a TPM limit by more than what their
reservations underestimated.

A call is admitted once, against the model the caller named and its first deployment
(a retry or fallback to another model is not admitted again: the call already counts).

Credits per UTC day and per calendar month are not counted here but by the credits
module, in the database, beside the balance they are charged from
(server.limits.windows): `credit_windows` tells the meter which of them a call falls
under, and the meter reserves its worst-case charge against them with its credits.

Redis faults: when Redis does not answer within `budget_s` (default 50 ms) or fails,
the `on_redis_failure` policy decides. "open" (default): the call is served through
this process's own counters (each replica then enforces each limit alone), a warning
is logged at most once a minute and `redis_failures` counts the faults. "closed": the
call is refused with RATE_LIMITS_UNAVAILABLE (503). Why open by default: the limits
protect against runaway use, which per-replica counters still stop, while refusing
every call because a cache is down would make Redis a single point of failure of the
whole gateway. redis-py's pool reconnects by itself; each call tries Redis again.
A script that timed out on our side may still have run on Redis: its slot then
lapses with its lease, and its request counts (the conservative side).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Literal

from server.errors import RateLimited, RateLimitsUnavailable
from server.limits.counters import Counter, Counters, CounterState, Kind, MemoryCounters, RedisCounters, Verdict
from server.limits.rules import DEFAULT_RULE_ID, LIMIT_FIELDS, LimitRule, LimitStore, Scope
from server.limits.windows import CreditWindow, windows_of

if TYPE_CHECKING:  # a type only: server.config imports accounts, which import this module
    from server.config import KeyLimitsConfig

log = logging.getLogger(__name__)
Policy = Literal["open", "closed"]
_KINDS: tuple[tuple[str, Kind], ...] = (("rpm", "requests"), ("tpm", "tokens"), ("concurrency", "concurrency"))
_WINDOWS = {"requests": "60", "tokens": "60", "concurrency": "0"}


def _duration(ms: int) -> str:
    """OpenAI's form of a reset time: `350ms`, `3s`, `1.5s`."""
    return f"{ms}ms" if ms < 1000 else f"{ms / 1000:g}s"


@dataclass
class Admission:
    """One admitted call's hold on its counters."""

    limiter: Limiter
    backend: Counters
    counters: tuple[Counter, ...]
    states: tuple[CounterState, ...]
    member: str
    finished: bool = False

    def headers(self) -> tuple[tuple[str, str], ...]:
        return openai_headers(self.counters, self.states)

    async def finish(self, used_tokens: int) -> None:
        """Corrects the token reservations with `used_tokens` and frees the slots."""
        if self.finished:
            return
        self.finished = True
        await self.limiter.settle(self, used_tokens)


def openai_headers(counters: Sequence[Counter], states: Sequence[CounterState]) -> tuple[tuple[str, str], ...]:
    """`x-ratelimit-{limit,remaining,reset}-{requests,tokens}` of the tightest limit of each kind."""
    headers: list[tuple[str, str]] = []
    for kind, suffix in (("requests", "requests"), ("tokens", "tokens")):
        pairs = [(c, s) for c, s in zip(counters, states, strict=True) if c.kind == kind]
        if not pairs:
            continue
        counter, state = min(pairs, key=lambda pair: (pair[1].remaining, -pair[1].reset_ms))
        headers += [
            (f"x-ratelimit-limit-{suffix}", str(counter.limit)),
            (f"x-ratelimit-remaining-{suffix}", str(state.remaining)),
            (f"x-ratelimit-reset-{suffix}", _duration(state.reset_ms)),
        ]
    return tuple(headers)


@dataclass(frozen=True, slots=True)
class DefaultLimits:
    """Limits of every key that has no rule of its own for all models."""

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    daily_credits_micros: int | None = None
    monthly_credits_micros: int | None = None

    @classmethod
    def from_config(cls, config: KeyLimitsConfig) -> DefaultLimits:
        """The config file's `limits.default_key` (credits as micro-credits)."""

        def micros(credits: Decimal | None) -> int | None:
            return None if credits is None else int((credits * 1_000_000).to_integral_value())

        return cls(
            config.rpm,
            config.tpm,
            config.concurrency,
            micros(config.daily_credits),
            micros(config.monthly_credits),
        )

    def rule(self, scope: Scope, subject: str, overridden: frozenset[str] = frozenset()) -> LimitRule | None:
        """The defaults as the rule of one key or owner for all models (id "default"),
        None when the config sets none: counted and refused exactly like an explicit
        rule, in the counters and spend windows its own rule for `*` would use.
        `overridden`: the kinds (LIMIT_FIELDS) the subject's own `*` rules set, which
        replace the default of that kind and leave the others in force."""
        limits = {name: None if name in overridden else getattr(self, name) for name in LIMIT_FIELDS}
        if not any(limits.values()):
            return None
        return LimitRule(scope, subject, "*", **limits, id=DEFAULT_RULE_ID)


def with_defaults(
    rules: Sequence[LimitRule], key_id: str | None, owner_id: str | None, key: DefaultLimits, owner: DefaultLimits
) -> list[LimitRule]:
    """The default rules that apply beside `rules` (the key's and its owner's), kind by
    kind: a key's own rule for `*` setting `rpm` replaces the default rpm and keeps the
    default daily credits (so `keys create --rpm` never silently lifts a spend default);
    the owner's likewise. Narrower rules (`openai/*`) apply beside the defaults."""
    added = []
    pairs: tuple[tuple[Scope, str | None, DefaultLimits], ...] = (("key", key_id, key), ("owner", owner_id, owner))
    for scope, subject, defaults in pairs:
        if subject is None:
            continue
        own = frozenset(kind for r in rules if r.scope == scope and r.model == "*" for kind in r.limits())
        if (rule := defaults.rule(scope, subject, own)) is not None:
            added.append(rule)
    return added


def listed_defaults(
    rules: Sequence[LimitRule], scope: Scope | None, subject: str | None, key: DefaultLimits, owner: DefaultLimits
) -> list[LimitRule]:
    """The config file's defaults as the lists of rules show them (`limits show`, the
    admin and account APIs): for every key and every owner (subject `*`) when no subject
    is named; for the key or owner named, each kind its own rules for all models
    (`rules`) do not set, under its id, as the limiter enforces them (`with_defaults`)."""
    if not subject:
        listed = (key.rule("key", "*"), owner.rule("owner", "*"))
        return [rule for rule in listed if rule is not None]
    if scope == "key":
        return with_defaults(rules, subject, None, key, owner)
    return with_defaults(rules, None, subject, key, owner)


@dataclass
class Limiter:
    store: LimitStore
    shared: Counters
    local: MemoryCounters = field(default_factory=MemoryCounters)
    defaults: DefaultLimits = field(default_factory=DefaultLimits)
    owner_defaults: DefaultLimits = field(default_factory=DefaultLimits)
    on_redis_failure: Policy = "open"
    budget_s: float = 0.05
    lease_s: float = 60.0
    redis_failures: int = 0
    _warned_at: float = -1e9
    _held: dict[str, Admission] = field(default_factory=dict)
    _renewer: asyncio.Task[None] | None = None

    async def admit(
        self, key_id: str, owner_id: str, model: str, public_model: str | None, tokens: int | Callable[[], int]
    ) -> Admission | None:
        """Admits the call or raises RateLimited / RateLimitsUnavailable; None when no
        limit applies. `tokens`, the call's token reservation, may be a function: it is
        then worked out only when a token limit applies (a long prompt's estimate walks it)."""
        rules = [r for r in await self._rules(key_id, owner_id) if r.matches(model, public_model)]
        if not rules:
            return None
        if not isinstance(tokens, int):
            # Only a token limit reads it (an RPM or concurrency limit counts the call).
            tokens = tokens() if any(rule.tpm is not None for rule in rules) else 1
        counters = tuple(self._counters(rules, max(tokens, 1)))
        if not counters:
            return None
        member = uuid.uuid4().hex
        backend, verdict = await self._decide(counters, member)
        if not verdict.admitted:
            raise self._refusal(rules, counters, verdict)
        admission = Admission(self, backend, counters, verdict.states, member)
        if any(c.kind == "concurrency" for c in counters):
            self._held[member] = admission
            self._start_renewing()
        return admission

    async def credit_windows(
        self, key_id: str, owner_id: str, model: str, public_model: str | None
    ) -> list[CreditWindow]:
        """The credit limits per day and month of the key and its owner that apply to a
        call of `model` (rules read through the store's cache)."""
        return windows_of(await self._rules(key_id, owner_id), model, public_model)

    async def settle(self, admission: Admission, used_tokens: int) -> None:
        self._held.pop(admission.member, None)
        if all(c.kind == "requests" for c in admission.counters):
            return  # nothing to give back: a call limited by RPM alone costs one round trip
        deltas = [max(used_tokens, 0) - c.cost if c.kind == "tokens" else 0 for c in admission.counters]
        try:
            async with asyncio.timeout(max(self.budget_s * 4, 0.5)):
                await admission.backend.settle(admission.counters, admission.member, deltas)
        except Exception as exc:  # noqa: BLE001 - the call is over; its slots lapse with their lease
            self._redis_failed(exc)

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        for admission in list(self._held.values()):
            await admission.finish(0)
        await self.shared.aclose()

    async def _rules(self, key_id: str, owner_id: str) -> list[LimitRule]:
        """The key's and owner's rules, plus the configured defaults of each of the two
        that has no rule of its own for all models (such a rule replaces them all; a
        narrower one applies beside them)."""
        rules = await self.store.rules_for(key_id, owner_id)
        return [*rules, *with_defaults(rules, key_id, owner_id, self.defaults, self.owner_defaults)]

    def _counters(self, rules: Sequence[LimitRule], tokens: int) -> list[Counter]:
        counters = []
        for rule in rules:
            for column, kind in _KINDS:
                limit = getattr(rule, column)
                if limit is None:
                    continue
                cost = min(tokens, limit) if kind == "tokens" else 1
                name = f"{rule.scope}:{rule.subject}:{rule.model}:{kind}"
                counters.append(Counter(name, kind, int(limit), cost))
        return counters

    async def _decide(self, counters: tuple[Counter, ...], member: str) -> tuple[Counters, Verdict]:
        lease_ms = int(self.lease_s * 1000)
        if self.shared is not self.local:
            try:
                async with asyncio.timeout(self.budget_s):
                    return self.shared, await self.shared.admit(counters, member, lease_ms)
            except Exception as exc:  # noqa: BLE001 - Redis down or slow: the policy decides
                self._redis_failed(exc)
                if self.on_redis_failure == "closed":
                    raise RateLimitsUnavailable(
                        "the gateway cannot check rate limits right now (Redis unreachable); retry shortly"
                    ) from None
        return self.local, await self.local.admit(counters, member, lease_ms)

    def _refusal(self, rules: Sequence[LimitRule], counters: Sequence[Counter], verdict: Verdict) -> RateLimited:
        counter = counters[verdict.refused]
        scope, _, _ = counter.name.partition(":")
        glob = next(r.model for r in rules if counter.name.startswith(f"{r.scope}:{r.subject}:{r.model}:"))
        wait_s = max(verdict.retry_after_ms, 1) / 1000
        unit = {"requests": "requests per minute", "tokens": "tokens per minute", "concurrency": "calls in flight"}
        message = (
            f"rate limit reached: {counter.limit} {unit[counter.kind]} on this {scope}"
            f"{'' if glob == '*' else f' for models {glob!r}'}; retry in {wait_s:g} s"
        )
        if counter.kind == "tokens" and counter.cost >= counter.limit:
            message += " (this call's token estimate alone fills the limit)"
        metadata = {
            "scope": scope,
            "limit_kind": counter.kind,
            "limit": str(counter.limit),
            "window_seconds": _WINDOWS[counter.kind],
            "model": glob,
        }
        return RateLimited(
            message,
            retry_after_seconds=wait_s,
            metadata=metadata,
            headers=openai_headers(counters, verdict.states),
        )

    def _start_renewing(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_forever(), name="limit-slot-leases")

    async def _renew_forever(self) -> None:
        """Renews the leases of this process's slots every third of a lease."""
        while self._held:
            await asyncio.sleep(self.lease_s / 3)
            by_backend: dict[int, tuple[Counters, dict[str, Sequence[Counter]]]] = {}
            for member, admission in list(self._held.items()):
                entry = by_backend.setdefault(id(admission.backend), (admission.backend, {}))
                entry[1][member] = admission.counters
            for backend, held in by_backend.values():
                try:
                    await backend.renew(held, int(self.lease_s * 1000))
                except Exception as exc:  # noqa: BLE001 - try again next round
                    self._redis_failed(exc)

    def _redis_failed(self, exc: BaseException) -> None:
        self.redis_failures += 1
        now = time.monotonic()
        if now - self._warned_at >= 60:
            self._warned_at = now
            log.warning(
                "Redis unreachable or slow for rate limits (%s); %s",
                type(exc).__name__,
                "refusing calls (fail closed)"
                if self.on_redis_failure == "closed"
                else "using this process's counters",
            )


def open_limiter(
    store: LimitStore,
    redis_url: str | None,
    *,
    defaults: DefaultLimits | None = None,
    owner_defaults: DefaultLimits | None = None,
    on_redis_failure: Policy = "open",
    budget_s: float = 0.05,
    lease_s: float = 60.0,
    shared: Counters | None = None,
) -> Limiter:
    """Counters in Redis when a URL is set, else `shared` (the counters the worker
    processes of one `serve` share in their supervisor), else in this process (one
    replica). A failure of `shared` is handled as Redis's (`on_redis_failure`)."""
    local = MemoryCounters()
    if redis_url:
        shared = RedisCounters(redis_url)
    elif shared is None:
        shared = local
    else:
        # The hub is a local socket, but a busy machine may delay its answer well past
        # a Redis budget; falling back to per-process counters would over-admit.
        budget_s = max(budget_s, 2.0)
    return Limiter(
        store,
        shared,
        local,
        defaults or DefaultLimits(),
        owner_defaults or DefaultLimits(),
        on_redis_failure=on_redis_failure,
        budget_s=budget_s,
        lease_s=lease_s,
    )
