"""The accounts layer as the request path sees it: who is calling, may they use this
model, can they pay for it, and what did the call consume.

`Accounts` is opened once per process; each call gets a `Meter`:

    async with accounts.meter(key, provider, model, "chat", worst_case) as meter:
        answer = await adapter...
        meter.usage = Usage(...)

The meter reserves the worst-case cost before the upstream call (when billing is on),
and on exit commits one usage record (settling the reservation in the same
transaction) before the servicer hands the response back: a client never holds an
answer the ledger does not know about. A call cut short by the client is recorded as
"cancelled" with what it consumed so far; one the gateway ends while shutting down
(the servicer raises ShuttingDown inside the meter) as "interrupted". A call the meter
refuses as it starts (RATE_LIMITED by `server.limits`, checked first so a refusal costs
no database work; INSUFFICIENT_CREDITS, SPENDING_CAP_REACHED, RATE_LIMITED by a credit
limit per day or month, held with the credits; a model without a rate)
is recorded by the meter too, as an error with that reason: once the meter has
started, it alone records the call, so every call leaves exactly one record (the error
it recorded is marked `recorded`, which the servicer's refusal path checks).

When the provider answers a stored credential with "invalid key"
(`UpstreamCredentialRejected`), the meter has `server.accounts.credential_checks`
confirm it with a probe before the call ends; a 403 leaves the credential alone.

When the database fails, the ledger spools the record (server.accounts.spool) and the
call is answered. When the spool fails too, that call fails with STORAGE_UNAVAILABLE
and the meter refuses new calls on entry, before a provider is called, until a record
can be written again. The one remaining window: a stream that has already sent content
when its record fails gets an error event after that content (sent text cannot be
taken back). Only streams already under way when the database and the local disk fail
together are exposed: the first failed record turns the ledger unwritable and every
later call is refused on entry; a stream that fails at its end sees the error event, so
an SDK raises instead of taking the answer as complete.

An `observer` (server.accounts.observer; metrics and the per-call log line) is told
when a meter starts and when each record (refusals too) has been written.

Usage estimates when the provider reported none: output from the streamed text (4
characters per token) and, for a call that produced output or was cut short
(cancelled, interrupted), input from the prompt (`prompt_tokens`, estimated by the
servicer the same way): the provider read the prompt, so a cut stream pays for it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import TracebackType

from server.accounts.credential_checks import CredentialChecker, Probe
from server.accounts.credentials import Credential, CredentialVault, load_master_key
from server.accounts.credits import CreditService, Rate, Reservation, Usage, cost_of
from server.accounts.keys import KeyRecord, KeyStore, authorize
from server.accounts.ledger import Ledger, Outcome, Recorded, UsageRecord
from server.accounts.observer import CallObserver, FinishedCall
from server.accounts.spool import Spool, SpoolReplayer
from server.calls import CallCredential
from server.errors import (
    GatewayError,
    ProviderNotConfigured,
    ShuttingDown,
    StorageUnavailable,
    UpstreamCredentialRejected,
)
from server.limits import Admission, Limiter
from server.storage import Database
from server.storage.settings import StorageSettings

log = logging.getLogger(__name__)
# How a call's end reaches its meter when the client stopped listening: the task was
# cancelled while waiting, or the stream was closed while it waited at a `yield`
# (its consumer went away and closed it: GeneratorExit). Both are "cancelled".
CLIENT_LEFT = (asyncio.CancelledError, GeneratorExit)
CHARS_PER_TOKEN = 4


@dataclass
class Accounts:
    """Keys, ledger and credits over one database."""

    db: Database
    keys: KeyStore
    ledger: Ledger
    credits: CreditService
    auth_required: bool
    # Provider credentials stored through the admin API; None without a master key.
    vault: CredentialVault | None = None
    # Where the ledger keeps records the database cannot take (None: nowhere).
    spool: Spool | None = None
    # Confirms and re-checks invalid credentials (see `watch_credentials`).
    credential_checker: CredentialChecker | None = None
    # Rate limits per key, owner and model (server.limits); None: no limits.
    limiter: Limiter | None = None
    # Told of every call as it starts and as its record is written (metrics, logs).
    observer: CallObserver | None = None

    @classmethod
    async def open(
        cls,
        storage: StorageSettings,
        *,
        auth_required: bool,
        billing_enabled: bool,
        key_cache_ttl_s: float = 5.0,
        key_negative_cache_ttl_s: float = 1.0,
        key_cache_outage_grace_s: float = 300.0,
        key_pepper: bytes | None = None,
        master_key: str | None = None,
        reservation_lease_s: float = 120.0,
        credit_block_calls: int = 0,
        migrate: bool | None = None,
    ) -> Accounts:
        db = await Database.open_with(storage, migrate=migrate)
        keys = KeyStore(
            db,
            pepper=key_pepper,
            cache_ttl_s=key_cache_ttl_s,
            negative_ttl_s=key_negative_cache_ttl_s,
            outage_grace_s=key_cache_outage_grace_s,
        )
        vault = CredentialVault(db, load_master_key(master_key)) if master_key else None
        credits = CreditService(db, billing_enabled=billing_enabled, reservation_lease_s=reservation_lease_s)
        credits.use_blocks(credit_block_calls)
        spool = Spool(storage.resolved_spool_dir())
        return cls(db, keys, Ledger(db, spool=spool, credits=credits), credits, auth_required, vault, spool)

    def spool_replayer(self, interval_s: float) -> SpoolReplayer | None:
        """The task body that replays spooled records (None without a spool)."""
        return None if self.spool is None else SpoolReplayer(self.ledger, self.spool, interval_s=interval_s)

    def watch_credentials(
        self, probes: Mapping[str, Probe], recheck_interval_s: float, *, recheck: bool = True
    ) -> None:
        """With a vault: confirms provider rejections of stored credentials with these
        probes (by provider name) and, with `recheck`, re-checks invalid ones every
        `recheck_interval_s` (one process per `serve` does: the status is shared)."""
        if self.vault is not None and self.credential_checker is None:
            self.credential_checker = CredentialChecker(self.vault, probes, recheck_interval_s=recheck_interval_s)
            if recheck:
                self.credential_checker.start()

    async def close(self) -> None:
        """Commits what the ledger still holds, then disconnects."""
        if self.credential_checker is not None:
            await self.credential_checker.stop()
        if self.limiter is not None:
            await self.limiter.aclose()
        await self.ledger.close()
        if self.credits.blocks is not None:  # every record is written: nothing draws from them
            await self.credits.blocks.give_back_all()
        if self.spool is not None:
            await asyncio.to_thread(self.spool.rotate)
        await self.db.close()

    async def authenticate(self, secret: str | None) -> KeyRecord | None:
        """The caller's key. With auth off, a call without a valid key is served
        anonymously (a valid key still gets its allow-list and its usage)."""
        if self.auth_required:
            return await self.keys.authenticate(secret)
        if secret is None:
            return None
        try:
            return await self.keys.authenticate(secret)
        except StorageUnavailable:
            raise  # not "no valid key": serving anonymously would drop its allow-list
        except GatewayError:
            return None

    async def record_refusal(
        self, key: KeyRecord | None, operation: str, model: str, exc: GatewayError, request_id: str | None = None
    ) -> None:
        """Records a call refused before it reached a provider (bad input, unknown model,
        allow-list, credits), so that every call with a key leaves one record."""
        exc.recorded = True
        provider = model.partition("/")[0] if "/" in model else ""
        record = UsageRecord(
            request_id=request_id or uuid.uuid4().hex,
            provider=provider,
            model=model,
            outcome="error",
            key_id=key.id if key else None,
            owner_id=key.owner_id if key else None,
            operation=operation,
            error_reason=exc.reason,
            attempts=0,
        )
        try:
            await asyncio.shield(self.ledger.record(record))
        except StorageUnavailable:
            # Nothing was answered: the caller gets its refusal even if it cannot be kept.
            log.warning("could not record a refused %s call (%s): storage unavailable", operation, exc.reason)
        if self.observer is not None:
            self.observer.call_finished(FinishedCall(record, model, None))

    def meter(
        self,
        key: KeyRecord | None,
        provider: str,
        model: str,
        operation: str,
        worst_case: WorstCase,
        credential_header: tuple[str, str] | None = None,
        prompt_tokens: PromptTokens = 0,
        public_model: str | None = None,
        request_id: str | None = None,
    ) -> Meter:
        """The meter of one call to `provider/model` (its first deployment; see
        `Meter.use` for the others); checks the key's allow-list now. `prompt_tokens`
        estimates the input, for a cut call that reports no usage and for a token rate
        limit: a number, or a function worked out only when one of those needs it (a
        long conversation's estimate walks every message)."""
        if key is not None:
            authorize(key, f"{provider}/{model}", public_model)
        return Meter(
            self,
            key,
            provider,
            model,
            operation,
            worst_case,
            credential_header,
            prompt_tokens,
            public_model,
            request_id,
        )


# A prompt's estimated input tokens, and a call's worst case (for credit reservations
# and token limits), or how to work them out when needed: for a long prompt each
# walks or measures the whole request, and most calls need neither.
PromptTokens = int | Callable[[], int]
WorstCase = Usage | Callable[[], Usage]


class Meter:
    """Measures one call and records it on exit (see the module docstring)."""

    def __init__(
        self,
        accounts: Accounts,
        key: KeyRecord | None,
        provider: str,
        model: str,
        operation: str,
        worst_case: WorstCase,
        credential_header: tuple[str, str] | None = None,
        prompt_tokens: PromptTokens = 0,
        public_model: str | None = None,
        request_id: str | None = None,
    ) -> None:
        self.request_id = request_id if request_id is not None else uuid.uuid4().hex
        self.usage = Usage()
        self._accounts = accounts
        self._key = key
        self._provider = provider
        self._model = f"{provider}/{model}"
        self._operation = operation
        self._worst_case_given = worst_case
        self._reservation: Reservation | None = None
        # The model's rate as of the call's start: pricing the record needs no database.
        self._rate: Rate | None = None
        self._started = time.monotonic()
        self._first_token: float | None = None
        self._streamed_chars = 0
        self._prompt_tokens_given = prompt_tokens
        self._credential_header = credential_header
        # The stored credential chosen for the current attempt (None: the adapter's
        # configured key); each attempt's `Call` carries it to the transport.
        self.credential: CallCredential | None = None
        # Upstream attempts so far (the routing sets it); 0 until one is made.
        self.attempts = 0
        # For the observer: the model asked for, and the time spent in upstream attempts.
        self.public_model = public_model or self._model
        self.upstream_s = 0.0
        self.trace_id: str | None = None
        # The call's ledger record once written (or once its write was tried).
        self.last_record: UsageRecord | None = None
        self._observed = False
        self._public_model = public_model
        # The call's hold on its rate limits (server.limits), released on exit.
        self._admission: Admission | None = None

    def limit_headers(self) -> tuple[tuple[str, str], ...]:
        """OpenAI's x-ratelimit-* headers of the call's tightest limits (none: no limit)."""
        return self._admission.headers() if self._admission is not None else ()

    def first_token(self) -> None:
        if self._first_token is None:
            self._first_token = time.monotonic()

    def add_streamed_chars(self, count: int) -> None:
        """Text streamed to the client so far: the estimate of a cut stream's output."""
        if count:
            self.first_token()
            self._streamed_chars += count

    async def _choose_credential(self) -> None:
        """The next stored credential of the provider, when the vault has any; else the
        adapter's configured key is used."""
        vault = self._accounts.vault
        if vault is None or self._credential_header is None:
            return
        try:
            credential = await vault.select(self._provider)
        except ProviderNotConfigured:
            return
        self.credential = CallCredential(credential.secret, credential.id)

    @functools.cached_property
    def _worst_case(self) -> Usage:
        given = self._worst_case_given
        return given if isinstance(given, Usage) else given()

    @functools.cached_property
    def _prompt_tokens(self) -> int:
        given = self._prompt_tokens_given
        return given if isinstance(given, int) else given()

    def _final_usage(self, exc: BaseException | None) -> Usage:
        usage = self.usage
        if usage.output_tokens == 0 and self._streamed_chars:
            # No usage arrived (the stream was cut): about 4 characters per token.
            usage = replace(usage, output_tokens=-(-self._streamed_chars // CHARS_PER_TOKEN))
        cut = isinstance(exc, (*CLIENT_LEFT, ShuttingDown))
        if usage.input_tokens == 0 and (self._streamed_chars or cut):
            # The provider read the prompt even if it never said how long it was.
            usage = replace(usage, input_tokens=self._prompt_tokens)
        return usage

    async def __aenter__(self) -> Meter:
        if not self._accounts.ledger.writable:
            # Refused before any provider is called: its answer could not be recorded.
            raise StorageUnavailable(
                "the gateway cannot record usage right now (database and spool failing); retry later"
            )
        observer = self._accounts.observer
        if observer is not None:
            observer.call_started(self._operation)
            self._observed = True
        try:
            await self._admit()
            await self._choose_credential()
            await self._reserve()
        except BaseException as exc:
            # A call refused here (out of credits, cap reached, no rate) is recorded
            # by its meter, once: `recorded` tells the servicer's refusal path it is done.
            await self._record_refusal(exc)
            raise
        return self

    async def use(
        self,
        provider: str,
        model: str,
        public_model: str,
        credential_header: tuple[str, str] | None,
        credential: Credential | None = None,
    ) -> None:
        """Points the meter at the deployment the next attempt goes to (a retry on
        another deployment, a fallback): checks the key's allow-list for it, and when
        its model differs, takes that provider's credential and reserves for that
        model instead (the old hold is released once the new one is taken). Raises
        what refuses it; the meter then still holds what it held. `credential`: the
        stored credential the deployment uses (see server.api.credential_deployments)."""
        target = f"{provider}/{model}"
        if self._key is not None:
            authorize(self._key, target, public_model)
        if target != self._model:
            await self._switch_model(provider, target, credential_header, chosen=credential is not None)
        if credential is not None and credential_header is not None:
            self._set_credential(credential_header, credential)

    def _set_credential(self, header: tuple[str, str], credential: Credential) -> None:
        """The call's next attempts use `credential` (in `header`)."""
        self._credential_header = header
        self.credential = CallCredential(credential.secret, credential.id)

    async def _switch_model(
        self, provider: str, target: str, credential_header: tuple[str, str] | None, *, chosen: bool
    ) -> None:
        """Reserves for the model `target` instead (when billing) and, unless the
        deployment `chosen` its credential, takes the provider's next credential."""
        previous, previous_model, previous_rate = self._reservation, self._model, self._rate
        if self._key is not None and self._accounts.credits.billing_enabled:
            self._model = target
            try:
                await self._reserve()
            except BaseException:
                self._model, self._reservation, self._rate = previous_model, previous, previous_rate
                raise
            if previous is not None:
                await self._accounts.credits.release(previous)
        self._provider, self._model, self._credential_header = provider, target, credential_header
        self.credential = None
        if not chosen:
            await self._choose_credential()

    async def _admit(self) -> None:
        """Takes the call's rate limits (RPM, concurrency, a TPM reservation of the
        prompt plus the output limit) before anything else: a refused call costs no
        database work. Raises RateLimited when a limit is reached."""
        limiter = self._accounts.limiter
        if limiter is None or self._key is None:
            return

        def tokens() -> int:  # worked out only when a token limit applies to the call
            worst = self._worst_case  # (it walks the whole request: not for every call)
            return (self._prompt_tokens or worst.input_tokens) + worst.output_tokens

        self._admission = await limiter.admit(self._key.id, self._key.owner_id, self._model, self._public_model, tokens)

    async def _reserve(self) -> None:
        """Holds the call's worst-case cost of the owner's balance, the key's cap and
        the credit limits per day and month the call falls under (server.limits.windows)."""
        key, credits, limiter = self._key, self._accounts.credits, self._accounts.limiter
        if key is not None and credits.billing_enabled:
            worst = await credits.price(self._model, self._worst_case)
            self._rate = await credits.rate_for(self._model)
            windows = (
                await limiter.credit_windows(key.id, key.owner_id, self._model, self._public_model)
                if limiter is not None
                else []
            )
            self._reservation = await credits.reserve(
                key.owner_id, worst, key_id=key.id, request_id=self.request_id, windows=windows
            )

    async def _record_refusal(self, exc: BaseException) -> None:
        """Records the call refused by `exc`; a failure to record is logged, so that
        the client still learns why it was refused."""
        try:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
        except Exception as failure:  # noqa: BLE001 - the refusal is the error to report
            log.error("could not record the refused call %s: %s", self.request_id, failure)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, GatewayError):
            exc.recorded = True  # this meter records it, whatever happens below
        checker = self._accounts.credential_checker
        credential_id = self.credential.id if self.credential else None
        if isinstance(exc, UpstreamCredentialRejected) and credential_id and checker:
            # "Invalid key" (not a 403): out of rotation if a probe confirms it.
            await asyncio.shield(checker.confirm_rejection(self._provider, credential_id, exc))
        self.usage = self._final_usage(exc)
        if self._admission is not None:
            # Every path ends here (answers, errors, cancellations, shutdown): frees the
            # call's slots and corrects its token reservation with what it used.
            used = self.usage.input_tokens + self.usage.output_tokens
            await asyncio.shield(self._admission.finish(used))
        record = self._record(exc)
        recorded: Recorded | None = None
        try:
            if self._priced_at_once:
                # The ledger queues the record before its first wait and writes it
                # whatever becomes of this task: no shield (a task per call) is needed.
                recorded = await self._accounts.ledger.record(self._priced(record), reservation=self._reservation)
            else:
                # Shielded: the price is looked up first, and a cancelled call is
                # still recorded.
                recorded = await asyncio.shield(self._commit(record))
        finally:
            self._report(record, recorded)

    @property
    def operation(self) -> str:
        return self._operation

    def _report(self, record: UsageRecord, recorded: Recorded | None) -> None:
        self.last_record = record
        observer = self._accounts.observer
        if observer is None or not self._observed:
            return
        self._observed = False
        now = time.monotonic()
        ttft = self._first_token - self._started if self._first_token else None
        credits = recorded.credits_micros if recorded is not None else 0
        call = FinishedCall(
            record,
            self.public_model,
            now - self._started,
            self.upstream_s,
            ttft,
            credits,
            self.trace_id,
            self.credential.id if self.credential else None,
        )
        observer.call_finished(call)

    def _record(self, exc: BaseException | None) -> UsageRecord:
        outcome: Outcome = "ok"
        if isinstance(exc, CLIENT_LEFT):
            outcome = "cancelled"
        elif isinstance(exc, ShuttingDown):
            outcome = "interrupted"
        elif exc is not None:
            outcome = "error"
        if isinstance(exc, GatewayError):
            reason: str | None = exc.reason
        else:  # a cancellation reads the same however it reached the stream
            reason = "CancelledError" if isinstance(exc, CLIENT_LEFT) else (type(exc).__name__ if exc else None)
        now = time.monotonic()
        usage = self.usage
        return UsageRecord(
            request_id=self.request_id,
            provider=self._provider,
            model=self._model,
            outcome=outcome,
            key_id=self._key.id if self._key else None,
            owner_id=self._key.owner_id if self._key else None,
            operation=self._operation,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_tokens=usage.cached_tokens,
            image_count=usage.images,
            audio_ms=usage.audio_ms,
            characters=usage.characters,
            latency_ms=round((now - self._started) * 1000),
            ttft_ms=round((self._first_token - self._started) * 1000) if self._first_token else None,
            error_reason=None if outcome == "ok" else reason,
            attempts=self.attempts,
            credential_id=self.credential.id if self.credential else None,
        )

    @property
    def _priced_at_once(self) -> bool:
        """Whether the record's cost needs no lookup: billing off, nothing consumed
        (which costs nothing, and a refusal for a model without a rate must not fail
        again on its price), or the rate already known."""
        return not self._accounts.credits.billing_enabled or self.usage == Usage() or self._rate is not None

    def _priced(self, record: UsageRecord) -> UsageRecord:
        """`record` with its cost, when `_priced_at_once`."""
        if not self._accounts.credits.billing_enabled or self.usage == Usage() or self._rate is None:
            return record
        return replace(record, cost_micros=cost_of(self._rate, self.usage))

    async def _commit(self, record: UsageRecord) -> Recorded:
        """Prices `record` with a rate lookup, then records it."""
        credits = self._accounts.credits
        try:
            if credits.billing_enabled and self.usage != Usage():
                cost = cost_of(self._rate, self.usage) if self._rate else await credits.price(record.model, self.usage)
                record = replace(record, cost_micros=cost)
        except Exception:
            # No record will settle the hold: let its lease lapse (swept within a lease).
            if self._reservation is not None:
                credits.finished(self._reservation)
            raise
        return await self._accounts.ledger.record(record, reservation=self._reservation)
