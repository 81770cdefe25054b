"""AdminService: keys, credits and rates, provider credentials, rate limits
(server.limits) and usage reports over the accounts layer. Authorised by the admin credential in `server.api.auth`.

Every stored string is bounded (the limits are in `server.api.validation.LIMITS`, as
the contract documents them), credentials are taken only for providers the gateway
knows (configured, or built in), credit amounts must fit the ledger's 64-bit
micro-credits, and every list is paged (`server.api.paging`), so that no admin call
can grow the database or an answer without bound. An id that names nothing is
NOT_FOUND with reason RESOURCE_NOT_FOUND.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, TypeAlias, cast

import grpc
from google.protobuf import timestamp_pb2

from aigne.hub.v1 import admin_service_pb2 as admin_pb
from aigne.hub.v1 import admin_service_pb2_grpc as admin_grpc
from server.accounts.credentials import CredentialInfo
from server.accounts.credits import (
    RATE_AMOUNTS,
    Balance,
    Rate,
    RateAmountError,
    Reservation,
    credits_to_micros,
    rate_from_credits,
)
from server.accounts.errors import format_credits
from server.accounts.keys import KeyRecord
from server.accounts.ledger import GroupBy, StoredUsage, UsageTotals
from server.accounts.owners import ensure_owner, parse_owner
from server.accounts.service import Accounts
from server.api.calls import unary
from server.api.paging import page_request
from server.errors import InvalidRequest, ProviderNotConfigured, ResourceNotFound
from server.limits.limiter import listed_defaults
from server.limits.rules import DEFAULT_RULE_ID, LimitRule, LimitStore, Scope
from server.limits.windows import WindowKind, WindowSpend, spend_by_rule
from server.providers.registry import SPECS
from server.routing.cooldown import CooldownStore

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
GROUPS = frozenset({"key", "owner", "provider", "model", "day"})
# Credit amounts are stored as signed 64-bit micro-credits.
MAX_CREDITS = Decimal(2**63 - 1) / 10**6
MAX_AMOUNT_CHARS = 40
DEFAULT_HEALTH_WINDOW_MINUTES = 60
MAX_HEALTH_WINDOW_MINUTES = 7 * 24 * 60
# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
MAX_TIMESTAMP_SECONDS = 253_402_300_799


class AdminServicer(admin_grpc.AdminServiceServicer):
    def __init__(
        self,
        accounts: Accounts,
        providers: Iterable[str] = (),
        *,
        deployments: Iterable[str] = (),
        cooldowns: CooldownStore | None = None,
    ) -> None:
        self._accounts = accounts
        # For the health report: the configured deployments and the routing's cooldowns.
        self._deployments = frozenset(deployments)
        self._cooldowns = cooldowns
        # Credentials may be stored for the configured providers and the built-in ones.
        self._known_providers = frozenset({*providers, *SPECS})

    @unary
    async def CreateApiKey(
        self, request: admin_pb.CreateApiKeyRequest, context: Context
    ) -> admin_pb.CreateApiKeyResponse:
        if not request.name:
            raise InvalidRequest("name is required", field="name")
        expires = _expiry(request.expire_time) if request.HasField("expire_time") else None
        spend_cap = _credits(request.spend_cap, "spend_cap") if request.spend_cap else None
        owner = await self._owner(request.owner)
        record, secret = await self._accounts.keys.create_key(
            owner,
            request.name,
            expires_at=expires,
            allowed_models=list(request.allowed_models) or None,
            spend_cap_micros=spend_cap,
        )
        return admin_pb.CreateApiKeyResponse(key=key_message(record), secret=secret)

    @unary
    async def ListApiKeys(self, request: admin_pb.ListApiKeysRequest, context: Context) -> admin_pb.ListApiKeysResponse:
        page = page_request(request.page_size, request.page_token, (datetime, str), request.owner)
        records = await self._accounts.keys.list_keys(
            request.owner or None, after=cast(Any, page.after), limit=page.size + 1
        )
        next_token = page.next_token([(r.created_at, r.id) for r in records])
        return admin_pb.ListApiKeysResponse(
            keys=[key_message(r) for r in records[: page.size]], next_page_token=next_token
        )

    @unary
    async def RevokeApiKey(
        self, request: admin_pb.RevokeApiKeyRequest, context: Context
    ) -> admin_pb.RevokeApiKeyResponse:
        try:
            record = await self._accounts.keys.revoke_key(request.key_id)
        except KeyError as exc:
            raise ResourceNotFound(f"no API key has the id {request.key_id[:64]!r}", field="key_id") from exc
        return admin_pb.RevokeApiKeyResponse(key=key_message(record))

    @unary
    async def GrantCredits(
        self, request: admin_pb.GrantCreditsRequest, context: Context
    ) -> admin_pb.GrantCreditsResponse:
        amount = _credits(request.amount, "amount")
        if amount <= 0:
            raise InvalidRequest("amount must be positive", field="amount")
        owner = await self._owner(request.owner)
        balance = await self._accounts.credits.grant(owner, amount, request.note)
        return admin_pb.GrantCreditsResponse(balance=balance_message(balance))

    @unary
    async def GetBalance(self, request: admin_pb.GetBalanceRequest, context: Context) -> admin_pb.GetBalanceResponse:
        if not request.owner:
            raise InvalidRequest("owner is required", field="owner")
        return admin_pb.GetBalanceResponse(balance=balance_message(await self._accounts.credits.balance(request.owner)))

    @unary
    async def SetModelRate(
        self, request: admin_pb.SetModelRateRequest, context: Context
    ) -> admin_pb.SetModelRateResponse:
        rate = request.rate
        if not rate.model:
            raise InvalidRequest("rate.model is required", field="rate.model")
        amounts = {name: getattr(rate, name) for name in RATE_AMOUNTS}
        for name, text in amounts.items():
            if text:
                _credits(text, f"rate.{name}")
        try:
            stored = rate_from_credits(rate.model, amounts)
        except RateAmountError as exc:
            raise InvalidRequest(str(exc), field=f"rate.{exc.field}") from exc
        await self._accounts.credits.set_rate(stored)
        return admin_pb.SetModelRateResponse(rate=_rate(stored))

    @unary
    async def ListModelRates(
        self, request: admin_pb.ListModelRatesRequest, context: Context
    ) -> admin_pb.ListModelRatesResponse:
        page = page_request(request.page_size, request.page_token, (str,))
        after = cast(str, page.after[0]) if page.after else None
        rates = await self._accounts.credits.list_rates(after=after, limit=page.size + 1)
        next_token = page.next_token([(r.model,) for r in rates])
        return admin_pb.ListModelRatesResponse(rates=[_rate(r) for r in rates[: page.size]], next_page_token=next_token)

    @unary
    async def AddProviderCredential(
        self, request: admin_pb.AddProviderCredentialRequest, context: Context
    ) -> admin_pb.AddProviderCredentialResponse:
        if request.provider not in self._known_providers:
            raise InvalidRequest(
                f"provider {request.provider[:64]!r} is not one the gateway knows; "
                f"known: {', '.join(sorted(self._known_providers))}",
                field="provider",
            )
        info = await self._vault().add(request.provider, request.secret, label=request.label)
        return admin_pb.AddProviderCredentialResponse(credential=_credential(info))

    @unary
    async def ListProviderCredentials(
        self, request: admin_pb.ListProviderCredentialsRequest, context: Context
    ) -> admin_pb.ListProviderCredentialsResponse:
        page = page_request(request.page_size, request.page_token, (str, datetime, str), request.provider)
        infos = await self._vault().list_credentials(
            request.provider or None, after=cast(Any, page.after), limit=page.size + 1
        )
        next_token = page.next_token([(i.provider, i.created_at, i.id) for i in infos])
        return admin_pb.ListProviderCredentialsResponse(
            credentials=[_credential(i) for i in infos[: page.size]], next_page_token=next_token
        )

    @unary
    async def RemoveProviderCredential(
        self, request: admin_pb.RemoveProviderCredentialRequest, context: Context
    ) -> admin_pb.RemoveProviderCredentialResponse:
        return admin_pb.RemoveProviderCredentialResponse(removed=await self._vault().remove(request.credential_id))

    @unary
    async def DeleteProviderCredential(
        self, request: admin_pb.DeleteProviderCredentialRequest, context: Context
    ) -> admin_pb.DeleteProviderCredentialResponse:
        if not await self._vault().remove(request.credential_id):
            raise ResourceNotFound(
                f"no provider credential has the id {request.credential_id[:64]!r}", field="credential_id"
            )
        return admin_pb.DeleteProviderCredentialResponse()

    @unary
    async def ActivateProviderCredential(
        self, request: admin_pb.ActivateProviderCredentialRequest, context: Context
    ) -> admin_pb.ActivateProviderCredentialResponse:
        vault = self._vault()
        try:
            await vault.mark_active(request.credential_id)
            info = await vault.info(request.credential_id)
        except KeyError:
            raise ResourceNotFound(
                f"no provider credential has the id {request.credential_id[:64]!r}", field="credential_id"
            ) from None
        return admin_pb.ActivateProviderCredentialResponse(credential=_credential(info))

    @unary
    async def ListReservations(
        self, request: admin_pb.ListReservationsRequest, context: Context
    ) -> admin_pb.ListReservationsResponse:
        if request.owner:
            try:
                parse_owner(request.owner)
            except ValueError as exc:
                raise InvalidRequest(str(exc), field="owner") from exc
        page = page_request(request.page_size, request.page_token, (datetime, str), request.owner)
        held = await self._accounts.credits.list_reservations(
            request.owner or None, after=cast(Any, page.after), limit=page.size + 1
        )
        next_token = page.next_token([(r.created_at, r.id or "") for r in held])
        return admin_pb.ListReservationsResponse(
            reservations=[reservation_message(r) for r in held[: page.size]], next_page_token=next_token
        )

    @unary
    async def QueryUsage(self, request: admin_pb.QueryUsageRequest, context: Context) -> admin_pb.QueryUsageResponse:
        unknown = set(request.group_by) - GROUPS
        if unknown:
            raise InvalidRequest(
                f"group_by takes {', '.join(sorted(GROUPS))}, not {', '.join(sorted(unknown))}", field="group_by"
            )
        totals = await self._accounts.ledger.totals(
            cast(list[GroupBy], list(request.group_by)),
            since=parse_day(request.since, "since"),
            until=parse_day(request.until, "until"),
            key_id=request.key_id or None,
            owner_id=request.owner or None,
        )
        rows = [usage_total_message(t) for t in totals]
        return admin_pb.QueryUsageResponse(totals=rows)

    @unary
    async def ListCallRecords(
        self, request: admin_pb.ListCallRecordsRequest, context: Context
    ) -> admin_pb.ListCallRecordsResponse:
        calls, next_token = await recent_calls(
            self._accounts, request.page_size, request.page_token, owner_id=request.owner, key_id=request.key_id
        )
        return admin_pb.ListCallRecordsResponse(calls=calls, next_page_token=next_token)

    @unary
    async def GetProviderHealth(
        self, request: admin_pb.GetProviderHealthRequest, context: Context
    ) -> admin_pb.GetProviderHealthResponse:
        window = request.window_minutes or DEFAULT_HEALTH_WINDOW_MINUTES
        if not 1 <= window <= MAX_HEALTH_WINDOW_MINUTES:
            raise InvalidRequest(
                f"window_minutes must be 1 to {MAX_HEALTH_WINDOW_MINUTES}, got {window}", field="window_minutes"
            )
        since = datetime.now(UTC) - timedelta(minutes=window)
        # Provider health: the gateway's own refusals (credits, limits) are not its errors.
        totals = await self._accounts.ledger.totals(["provider", "model"], since=since, upstream_only=True)
        counts = {_deployment_name(t.provider or "", t.model or ""): t for t in totals}
        names = sorted({*self._deployments, *counts})
        credentials = await self._credential_ids({name.partition("/")[0] for name in names})
        # Each stored credential rests on its own, as `deployment@<credential id>`.
        cooldowns = [*names, *(f"{n}@{c}" for n in names for c in credentials.get(n.partition("/")[0], ()))]
        resting = await self._cooldowns.resting(cooldowns) if self._cooldowns is not None and names else {}
        deployments = []
        for name in names:
            own = credentials.get(name.partition("/")[0], [])
            rests = {c: resting[f"{name}@{c}"] for c in own if f"{name}@{c}" in resting}
            # Every stored credential resting: the deployment takes no calls until one is back.
            all_rest = bool(own) and len(rests) == len(own)
            left = resting.get(name, min(rests.values()) if all_rest else 0.0)
            deployments.append(
                admin_pb.DeploymentHealth(
                    deployment=name,
                    provider=name.partition("/")[0],
                    resting=name in resting or all_rest,
                    rest_seconds_left=round(left, 1),
                    calls=counts[name].calls if name in counts else 0,
                    errors=counts[name].errors if name in counts else 0,
                    resting_credentials=[
                        admin_pb.RestingCredential(credential_id=c, seconds_left=round(s, 1))
                        for c, s in sorted(rests.items())
                    ],
                )
            )
        return admin_pb.GetProviderHealthResponse(deployments=deployments, window_minutes=window)

    async def _credential_ids(self, providers: set[str]) -> dict[str, list[str]]:
        """The ids of the active stored credentials of each of `providers` (none
        without a vault)."""
        vault = self._accounts.vault
        if vault is None:
            return {}
        return {provider: [c.id for c in await vault.active(provider)] for provider in sorted(providers)}

    async def _owner(self, text: str) -> str:
        """The owner's id, created if new (owners are bounded by the request limits)."""
        try:
            kind, name = parse_owner(text)
        except ValueError as exc:
            raise InvalidRequest(str(exc), field="owner") from exc
        return (await ensure_owner(self._accounts.db, kind, name)).id

    def _vault(self) -> Any:
        if self._accounts.vault is None:
            raise ProviderNotConfigured(
                "provider credentials need AIGNE_HUB_MASTER_KEY (base64 of 32 random bytes) to be encrypted at rest"
            )
        return self._accounts.vault

    def _limits(self) -> LimitStore:
        """The running limiter's store (its cache then sees a change at once)."""
        limiter = self._accounts.limiter
        return limiter.store if limiter is not None else LimitStore(self._accounts.db)

    @unary
    async def SetRateLimit(
        self, request: admin_pb.SetRateLimitRequest, context: Context
    ) -> admin_pb.SetRateLimitResponse:
        rule = await self._limits().set(_limit_rule(request.limit))
        spend = await spend_by_rule(self._accounts.db, [rule], self._accounts.credits.clock())
        return admin_pb.SetRateLimitResponse(limit=rate_limit_message(rule, spend))

    @unary
    async def ListRateLimits(
        self, request: admin_pb.ListRateLimitsRequest, context: Context
    ) -> admin_pb.ListRateLimitsResponse:
        scope: Scope | None = None
        subject = request.key_id or request.owner or None
        if subject is not None:
            scope, subject = _subject(request.key_id, request.owner)
        page = page_request(request.page_size, request.page_token, (str, str, str), f"{scope}:{subject}")
        rules = await self._limits().find(scope, subject, after=cast(Any, page.after), limit=page.size + 1)
        next_token = page.next_token([(r.scope, r.subject, r.model) for r in rules])
        shown = rules[: page.size]
        if not next_token:  # the last page: the config file's defaults follow the rules
            shown += await configured_limits(self._accounts, scope, subject)
        # A default listed for every key or owner (subject `*`) has no spend of its own.
        counted = [r for r in shown if r.subject != "*"]
        spend = await spend_by_rule(self._accounts.db, counted, self._accounts.credits.clock())
        return admin_pb.ListRateLimitsResponse(
            limits=[rate_limit_message(r, spend) for r in shown], next_page_token=next_token
        )

    @unary
    async def RemoveRateLimit(
        self, request: admin_pb.RemoveRateLimitRequest, context: Context
    ) -> admin_pb.RemoveRateLimitResponse:
        scope, subject = _subject(request.key_id, request.owner)
        await self._limits().remove(scope, subject, request.model or "*")
        return admin_pb.RemoveRateLimitResponse()


def _credits(text: str, field: str) -> int:
    """Micro-credits of a decimal string, checked to fit the ledger before converting
    (an exponent such as "1e999999999" would otherwise build a huge integer)."""
    try:
        amount = Decimal(text) if len(text) <= MAX_AMOUNT_CHARS else None
    except InvalidOperation:
        amount = None
    # adjusted(): the exponent of the leading digit, safe to read on any Decimal.
    if amount is None or not amount.is_finite() or amount.adjusted() > 13 or abs(amount) > MAX_CREDITS:
        raise InvalidRequest(
            f"{field} must be a decimal number of credits of at most {MAX_CREDITS:.0f}, not {text[:64]!r}",
            field=field,
        )
    return credits_to_micros(amount)


def _expiry(stamp: timestamp_pb2.Timestamp) -> datetime:
    """A key's expiry: a valid Timestamp in the future."""
    if not 0 <= stamp.nanos <= 999_999_999:
        raise InvalidRequest(f"expire_time.nanos must be 0 to 999999999, got {stamp.nanos}", field="expire_time")
    if not 0 < stamp.seconds <= MAX_TIMESTAMP_SECONDS:
        raise InvalidRequest("expire_time must be a time before year 10000 and after 1970", field="expire_time")
    expires = stamp.ToDatetime(UTC)
    if expires <= datetime.now(UTC):
        raise InvalidRequest(f"expire_time {expires.isoformat()} is in the past", field="expire_time")
    return expires


def parse_day(text: str, field: str) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.combine(date.fromisoformat(text), datetime.min.time(), tzinfo=UTC)
    except ValueError as exc:
        raise InvalidRequest(f"{field} must be a day YYYY-MM-DD, not {text[:64]!r}", field=field) from exc


def _subject(key_id: str, owner: str) -> tuple[Scope, str]:
    """The rule's scope and subject: exactly one of key_id and owner."""
    if bool(key_id) == bool(owner):
        raise InvalidRequest("set exactly one of key_id and owner", field="key_id" if key_id else "owner")
    return ("key", key_id) if key_id else ("owner", owner)


def _limit_rule(limit: admin_pb.RateLimit) -> LimitRule:
    scope, subject = _subject(limit.key_id, limit.owner)
    return LimitRule(
        scope,
        subject,
        limit.model or "*",
        rpm=limit.rpm if limit.HasField("rpm") else None,
        tpm=limit.tpm if limit.HasField("tpm") else None,
        concurrency=limit.concurrency if limit.HasField("concurrency") else None,
        daily_credits_micros=_positive_credits(limit.daily_credits, "limit.daily_credits"),
        monthly_credits_micros=_positive_credits(limit.monthly_credits, "limit.monthly_credits"),
    )


def _positive_credits(text: str, field: str) -> int | None:
    if not text:
        return None
    amount = _credits(text, field)
    if amount <= 0:
        raise InvalidRequest(f"{field} must be positive", field=field)
    return amount


def rate_limit_message(
    rule: LimitRule, spend: dict[tuple[str, str, str, WindowKind], WindowSpend]
) -> admin_pb.RateLimit:
    """The rule, with what its credit windows hold now."""
    daily, monthly = rule.daily_credits_micros, rule.monthly_credits_micros
    shown: dict[str, str] = {}
    for kind in ("daily_credits", "monthly_credits"):
        window = spend.get((rule.scope, rule.subject, rule.model, kind))
        if window is not None:
            shown[f"{kind}_spent"] = format_credits(window.spent_micros)
            shown[f"{kind}_held"] = format_credits(window.reserved_micros)
    return admin_pb.RateLimit(
        **shown,
        key_id=rule.subject if rule.scope == "key" else "",
        owner=rule.subject if rule.scope == "owner" else "",
        model=rule.model,
        rpm=rule.rpm,
        tpm=rule.tpm,
        concurrency=rule.concurrency,
        daily_credits=format_credits(daily) if daily is not None else "",
        monthly_credits=format_credits(monthly) if monthly is not None else "",
        update_time=timestamp_message(rule.updated_at),
        source="config" if rule.id == DEFAULT_RULE_ID else "rule",
    )


async def configured_limits(accounts: Accounts, scope: Scope | None, subject: str | None) -> list[LimitRule]:
    """The config file's defaults (`limits.default_key`, `limits.default_owner`) as they
    apply: to every key and owner (subject `*`) without a subject; to the key or owner
    named, kind by kind where its own rules for all models leave them in force (as the
    limiter enforces them); none for a key or owner that does not exist."""
    limiter = accounts.limiter
    if limiter is None:
        return []
    own: list[LimitRule] = []
    if scope is not None and subject is not None:
        if not await limiter.store.exists(scope, subject):
            return []
        own = await limiter.store.find(scope, subject)
    return configured_limits_of(accounts, scope, subject, own)


def configured_limits_of(
    accounts: Accounts, scope: Scope | None, subject: str | None, own: list[LimitRule]
) -> list[LimitRule]:
    """`configured_limits` for a key or owner known to exist whose own rules (`own`,
    all of them) are at hand: no query."""
    limiter = accounts.limiter
    if limiter is None:
        return []
    return listed_defaults(own, scope, subject, limiter.defaults, limiter.owner_defaults)


def timestamp_message(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return stamp


def key_message(record: KeyRecord) -> admin_pb.ApiKey:
    return admin_pb.ApiKey(
        id=record.id,
        display=record.display,
        name=record.name,
        owner=record.owner_id,
        allowed_models=list(record.allowed_models or ()),
        spend_cap=format_credits(record.spend_cap_micros) if record.spend_cap_micros is not None else "",
        create_time=timestamp_message(record.created_at),
        expire_time=timestamp_message(record.expires_at),
        revoke_time=timestamp_message(record.revoked_at),
    )


def balance_message(balance: Balance) -> admin_pb.Balance:
    return admin_pb.Balance(
        owner=balance.owner_id,
        balance=format_credits(balance.balance_micros),
        reserved=format_credits(balance.reserved_micros),
        available=format_credits(balance.available_micros),
    )


def _rate(rate: Rate) -> admin_pb.ModelRate:
    return admin_pb.ModelRate(
        model=rate.model,
        input_per_million=format_credits(rate.input_per_million_micros),
        output_per_million=format_credits(rate.output_per_million_micros),
        cached_input_per_million=format_credits(rate.cached_input_per_million_micros),
        per_image=format_credits(rate.per_image_micros),
        per_audio_second=format_credits(rate.per_audio_second_micros),
        per_character=format_credits(rate.per_character_micros),
    )


def reservation_message(held: Reservation) -> admin_pb.Reservation:
    return admin_pb.Reservation(
        id=held.id or "",
        owner=held.owner_id,
        key_id=held.key_id or "",
        amount=format_credits(held.amount_micros),
        request_id=held.request_id or "",
        create_time=timestamp_message(held.created_at),
        expire_time=timestamp_message(held.expires_at),
        kind=admin_pb.RESERVATION_KIND_BLOCK if held.is_block else admin_pb.RESERVATION_KIND_CALL,
    )


def _credential(info: CredentialInfo) -> admin_pb.ProviderCredential:
    return admin_pb.ProviderCredential(
        id=info.id,
        provider=info.provider,
        label=info.label,
        masked=info.masked,
        status=info.status,
        status_reason=info.invalid_reason or "",
    )


def _deployment_name(provider: str, model: str) -> str:
    """`provider/model` of a ledger record (whose model may already carry the provider)."""
    return model if model.startswith(f"{provider}/") else f"{provider}/{model}"


def usage_total_message(total: UsageTotals) -> admin_pb.UsageTotal:
    return admin_pb.UsageTotal(
        key_id=total.key_id or "",
        owner=total.owner_id or "",
        provider=total.provider or "",
        model=total.model or "",
        day=total.day.isoformat() if total.day else "",
        calls=total.calls,
        errors=total.errors,
        input_tokens=total.input_tokens,
        output_tokens=total.output_tokens,
        cached_tokens=total.cached_tokens,
        images=total.image_count,
        audio_ms=total.audio_ms,
        characters=total.characters,
        credits=format_credits(total.credits_micros),
    )


def call_record_message(usage: StoredUsage) -> admin_pb.CallRecord:
    return admin_pb.CallRecord(
        request_id=usage.request_id,
        create_time=timestamp_message(usage.created_at),
        key_id=usage.key_id or "",
        owner=usage.owner_id or "",
        provider=usage.provider,
        model=usage.model,
        operation=usage.operation,
        outcome=usage.outcome,
        error_reason=usage.error_reason or "",
        latency_ms=usage.latency_ms,
        ttft_ms=usage.ttft_ms,
        attempts=usage.attempts,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        images=usage.image_count,
        audio_ms=usage.audio_ms,
        characters=usage.characters,
        credits=format_credits(usage.credits_micros),
        credential_id=usage.credential_id or "",
    )


async def recent_calls(
    accounts: Accounts, page_size: int, page_token: str, *, owner_id: str = "", key_id: str = ""
) -> tuple[list[admin_pb.CallRecord], str]:
    """A page of the ledger's records, newest first, and the next page's token. The
    cursor is the last record's (time, row id); the id travels as a string."""
    page = page_request(page_size, page_token, (datetime, str), f"{owner_id}|{key_id}")
    before = None
    if page.after is not None:
        stamp, row_id = page.after
        if not str(row_id).isdigit():
            raise InvalidRequest("page_token is not a token this list returned", field="page_token")
        before = (cast(datetime, stamp), int(str(row_id)))
    rows = await accounts.ledger.recent(
        owner_id=owner_id or None, key_id=key_id or None, before=before, limit=page.size + 1
    )
    next_token = page.next_token([(usage.created_at, str(row_id)) for row_id, usage in rows])
    return [call_record_message(usage) for _, usage in rows[: page.size]], next_token
