"""Runs one client call over its plan: balancing, retries, fallbacks, cooldowns and
timeouts, so that one provider's outage, rate limit or silence is not the caller's.

For each model of the plan (the model itself, then its fallbacks) the deployments are
ordered by the model's strategy, deployments at rest are left out, and attempts are
made until one answers, up to the plan's `max_attempts` per model:

- a failure worth retrying (see `server.routing.policy`) moves to the next deployment
  not yet tried at once; once every deployment was tried, the next attempt waits a
  full-jitter exponential backoff, or the provider's retry hint when it gave one (up to
  `max_retry_after_s`: a longer hint sends the call to the fallbacks instead);
- a failure not worth retrying ends the call with that error, except a prompt too long
  for the model's context window or a content-policy refusal, which go to the model's
  `context_window_fallbacks` / `content_policy_fallbacks` when it has them;
- every attempt is bounded by the call's deadline (the smallest of the model's
  `total_s`, the caller's `x-aigne-hub-timeout-s`, and the gRPC deadline); a stream's
  first chunk by `first_token_s` (later chunks: `idle_s`, see `idle_bounded`).

When every deployment of the plan rests, the call fails at once with 503
UPSTREAM_UNAVAILABLE and the time until the first one is back as its retry hint.
A stream is only retried before its first chunk reached the client: the servicer
takes the first chunk inside the attempt.

The call (`server.calls.Call`) travels through here: its deadline bounds the attempts,
and each attempt gets its own copy (`Call.for_attempt`) with its number and the
credential `before_attempt` chose for it (the meter's pick of a stored credential), which
the adapter hands to the transport.

`Routing.on_attempt` (metrics) is told of each deployment tried (its outcome) or passed
over (resting, refused by the meter).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from server import errors
from server.calls import NO_CALL, Call, CallCredential
from server.config import RoutingConfig
from server.routing import balance, policy
from server.routing.cooldown import CooldownStore
from server.routing.router import ModelGroup, Plan, Target
from server.watchdog import Watchdog

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Served(Generic[T, R]):
    """What answered a call: the result, the deployment, and the attempts it took."""

    result: R
    target: Target[T]
    attempts: int


class Routing:
    """The process's routing state (cooldowns, balancing statistics) and the loop that
    runs a call's attempts."""

    def __init__(self, config: RoutingConfig, cooldowns: CooldownStore, rng: random.Random | None = None) -> None:
        self.config = config
        self.cooldowns = cooldowns
        self.stats = balance.Stats()
        self._rng = rng or random.Random()
        # Told of each deployment tried or passed over: (deployment, outcome), where the
        # outcome is "ok", the failure's reason, "resting" or "refused" (metrics).
        self.on_attempt: Callable[[str, str], None] | None = None

    async def aclose(self) -> None:
        await self.cooldowns.aclose()

    async def run(
        self,
        plan: Plan[T],
        attempt: Callable[[Target[T], Call], Awaitable[R]],
        *,
        call: Call = NO_CALL,
        before_attempt: Callable[[Target[T], str], Awaitable[CallCredential | None]] | None = None,
    ) -> Served[T, R]:
        """Tries `attempt(target, attempt's call)` over the plan until one succeeds.

        `call.deadline` (an event-loop time) bounds them all. `before_attempt(target,
        public_model)` runs before each attempt (the meter checks the allow-list,
        reserves credits for the target's model and picks a stored credential, which it
        returns); a deployment it refuses is skipped, and when it refuses every
        deployment of the model the caller asked for, its error is the answer."""
        run = _Run(self, plan, attempt, call, before_attempt)
        return await run.go()

    def deadline_for(
        self, plan: Plan[T], caller_timeout_s: float | None, grpc_time_left_s: float | None
    ) -> float | None:
        """The call's deadline as an event-loop time: the smallest of the bounds."""
        bounds = [b for b in (plan.timeouts.total_s, caller_timeout_s, grpc_time_left_s) if b is not None]
        return asyncio.get_running_loop().time() + min(bounds) if bounds else None


class _Run(Generic[T, R]):
    """The state of one call's attempts."""

    def __init__(
        self,
        routing: Routing,
        plan: Plan[T],
        attempt: Callable[[Target[T], Call], Awaitable[R]],
        call: Call,
        before_attempt: Callable[[Target[T], str], Awaitable[CallCredential | None]] | None,
    ) -> None:
        self._routing = routing
        self._plan = plan
        self._attempt = attempt
        self._call = call
        self._deadline = call.deadline
        self._before = before_attempt
        self._loop = asyncio.get_running_loop()
        self.attempts = 0
        self._last_error: BaseException | None = None
        self._soonest_rest: float | None = None

    async def go(self) -> Served[T, R]:
        queue: list[ModelGroup[T]] = [self._plan.primary, *self._plan.fallbacks]
        while queue:
            group = queue.pop(0)
            served, special = await self._group(group)
            if served is not None:
                return served
            if special is not None:  # context window / content policy: their own chain
                queue = special
        raise self._final_error()

    async def _group(self, group: ModelGroup[T]) -> tuple[Served[T, R] | None, list[ModelGroup[T]] | None]:
        routing = self._routing
        names = [t.name for t in group.targets]
        resting = await routing.cooldowns.resting(names)
        order = balance.order(names, [t.weight for t in group.targets], group.strategy, routing.stats, routing._rng)
        fresh = [group.targets[i] for i in order if names[i] not in resting]
        if routing.on_attempt is not None:
            for name in resting:
                routing.on_attempt(name, "resting")
        if not fresh:
            self._note_rest(min(resting.values()))
            log.info("every deployment of %s rests; skipping it", group.model)
            return None, None
        tried: dict[str, float | None] = {}  # deployment -> its retry hint
        attempts_here = 0
        refusal: BaseException | None = None
        while attempts_here < self._plan.max_attempts:
            target, wait = self._next(fresh, tried, attempts_here)
            if target is None:
                break
            if wait > 0:
                await asyncio.sleep(wait)
            if self._time_left() is not None and (self._time_left() or 0) <= 0:
                break
            credential = None
            if self._before is not None:
                try:
                    credential = await self._before(target, group.model)
                except errors.GatewayError as exc:
                    fresh.remove(target)
                    if group is self._plan.primary and self.attempts == 0 and not fresh:
                        raise  # the caller may not (or cannot pay to) use the model it asked for
                    log.info("skipping %s for %s: %s", target.name, group.model, exc.message)
                    if routing.on_attempt is not None:
                        routing.on_attempt(target.name, "refused")
                    refusal = exc
                    continue
            attempts_here += 1
            self.attempts += 1
            try:
                result = await self._one(target, self._call.for_attempt(self.attempts, credential))
            except errors.GatewayError as exc:
                if routing.on_attempt is not None:
                    routing.on_attempt(target.name, exc.reason)
                special, rest = await self._failed(group, target, exc)
                if special is not None:
                    return None, special
                hint = max(getattr(exc, "retry_after_seconds", None) or 0.0, rest or 0.0)
                tried[target.name] = hint or None
                continue
            await routing.cooldowns.success(target.name)
            if routing.on_attempt is not None:
                routing.on_attempt(target.name, "ok")
            return Served(result, target, self.attempts), None
        if refusal is not None and self._last_error is None:
            self._last_error = refusal
        return None, None

    def _next(
        self, fresh: list[Target[T]], tried: dict[str, float | None], attempts_here: int
    ) -> tuple[Target[T] | None, float]:
        """The next deployment and how long to wait before trying it."""
        untried = [t for t in fresh if t.name not in tried]
        if untried:
            return untried[0], 0.0
        if not fresh:
            return None, 0.0
        config = self._routing.config
        # Every deployment failed once: retry the one free soonest (its retry hint, or
        # the rest it was sent to by this call's own failures).
        target = min(fresh, key=lambda t: tried.get(t.name) or 0.0)
        hint = tried.get(target.name)
        if hint is not None and hint > config.max_retry_after_s:
            return None, 0.0
        wait = max(
            hint or 0.0, policy.backoff_s(attempts_here, base_s=config.backoff_base_s, max_s=config.max_backoff_s)
        )
        left = self._time_left()
        if left is not None and wait >= left:
            return None, 0.0
        return target, wait

    async def _one(self, target: Target[T], call: Call) -> R:
        stats = self._routing.stats.of(target.name)
        stats.in_flight += 1
        started = self._loop.time()
        try:
            left = self._time_left()
            async with asyncio.timeout(left):
                result = await self._attempt(target, call)
        except TimeoutError:
            raise errors.UpstreamTimeout(
                f"{target.name} did not answer in time (the call's deadline passed)",
                provider=target.route.provider.name,
            ) from None
        finally:
            stats.in_flight -= 1
        stats.observe_ttft(self._loop.time() - started)
        return result

    async def _failed(
        self, group: ModelGroup[T], target: Target[T], exc: errors.GatewayError
    ) -> tuple[list[ModelGroup[T]] | None, float | None]:
        """Counts a failed attempt; returns a special fallback chain to switch to (or
        None) and how long the deployment now rests (or None), or raises when the
        failure is final."""
        self._last_error = exc
        retryable = policy.is_retryable(exc)
        reason = getattr(exc, "reason", type(exc).__name__)
        log.warning(
            "attempt %d (%s for %s) failed: %s%s",
            self.attempts,
            target.name,
            group.model,
            reason,
            "; retrying" if retryable else "",
        )
        rest = None
        if policy.counts_against_deployment(exc):
            rest = await self._routing.cooldowns.failure(
                target.name,
                retry_after_s=getattr(exc, "retry_after_seconds", None),
                rate_limited=isinstance(exc, errors.UpstreamRateLimited),
            )
            if rest is not None:
                log.warning("deployment %s rests for %.1f s", target.name, rest)
        if retryable:
            return None, rest
        if policy.is_context_window_exceeded(exc) and self._plan.context_window_fallbacks:
            return list(self._plan.context_window_fallbacks), rest
        if policy.is_content_policy_refusal(exc) and self._plan.content_policy_fallbacks:
            return list(self._plan.content_policy_fallbacks), rest
        raise exc

    def _time_left(self) -> float | None:
        return None if self._deadline is None else self._deadline - self._loop.time()

    def _note_rest(self, seconds: float) -> None:
        self._soonest_rest = seconds if self._soonest_rest is None else min(self._soonest_rest, seconds)

    def _final_error(self) -> BaseException:
        if self._last_error is not None:
            return self._last_error
        provider = self._plan.primary.targets[0].route.provider.name
        rest = self._soonest_rest or 1.0
        return errors.UpstreamUnavailable(
            f"every deployment of {self._plan.primary.model} is resting after repeated failures; retry in {rest:.0f} s",
            provider=provider,
            retry_after_seconds=max(rest, 0.001),
        )


async def idle_bounded(chunks: AsyncIterator[R], idle_s: float | None, provider: str) -> AsyncIterator[R]:
    """The chunks of a stream, failing with UPSTREAM_TIMEOUT when the upstream stays
    silent for `idle_s` between two of them (one timer for the stream, see
    server.watchdog)."""
    iterator = aiter(chunks)
    if idle_s is None:
        async for chunk in iterator:
            yield chunk
        return
    watchdog = Watchdog(idle_s=idle_s)
    try:
        while True:
            try:
                chunk = await watchdog.wait(anext(iterator))
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise errors.UpstreamTimeout(
                    f"{provider} sent nothing for {idle_s:g} s in the middle of the stream", provider=provider
                ) from None
            yield chunk
    finally:
        watchdog.close()
