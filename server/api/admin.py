"""AdminService: keys, credits and rates, provider credentials and usage reports over
the accounts layer. Authorised by the admin credential in `server.api.auth`."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import InvalidOperation
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
from server.accounts.ledger import GroupBy
from server.accounts.owners import ensure_owner, parse_owner
from server.accounts.service import Accounts
from server.api.calls import unary
from server.errors import InvalidRequest, ModelNotFound, ProviderNotConfigured

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
GROUPS = frozenset({"key", "owner", "provider", "model", "day"})


class AdminServicer(admin_grpc.AdminServiceServicer):
    def __init__(self, accounts: Accounts) -> None:
        self._accounts = accounts

    @unary
    async def CreateApiKey(
        self, request: admin_pb.CreateApiKeyRequest, context: Context
    ) -> admin_pb.CreateApiKeyResponse:
        if not request.name:
            raise InvalidRequest("name is required", field="name")
        owner = await self._owner(request.owner)
        expires = request.expire_time.ToDatetime(UTC) if request.HasField("expire_time") else None
        record, secret = await self._accounts.keys.create_key(
            owner,
            request.name,
            expires_at=expires,
            allowed_models=list(request.allowed_models) or None,
            spend_cap_micros=_credits(request.spend_cap, "spend_cap") if request.spend_cap else None,
        )
        return admin_pb.CreateApiKeyResponse(key=_key(record), secret=secret)

    @unary
    async def ListApiKeys(self, request: admin_pb.ListApiKeysRequest, context: Context) -> admin_pb.ListApiKeysResponse:
        records = await self._accounts.keys.list_keys(owner_id=request.owner or None)
        return admin_pb.ListApiKeysResponse(keys=[_key(r) for r in records])

    @unary
    async def RevokeApiKey(
        self, request: admin_pb.RevokeApiKeyRequest, context: Context
    ) -> admin_pb.RevokeApiKeyResponse:
        try:
            record = await self._accounts.keys.revoke_key(request.key_id)
        except KeyError as exc:
            raise ModelNotFound(f"no API key {request.key_id!r}", field="key_id") from exc
        return admin_pb.RevokeApiKeyResponse(key=_key(record))

    @unary
    async def GrantCredits(
        self, request: admin_pb.GrantCreditsRequest, context: Context
    ) -> admin_pb.GrantCreditsResponse:
        amount = _credits(request.amount, "amount")
        if amount <= 0:
            raise InvalidRequest("amount must be positive", field="amount")
        owner = await self._owner(request.owner)
        balance = await self._accounts.credits.grant(owner, amount, request.note)
        return admin_pb.GrantCreditsResponse(balance=_balance(balance))

    @unary
    async def GetBalance(self, request: admin_pb.GetBalanceRequest, context: Context) -> admin_pb.GetBalanceResponse:
        if not request.owner:
            raise InvalidRequest("owner is required", field="owner")
        return admin_pb.GetBalanceResponse(balance=_balance(await self._accounts.credits.balance(request.owner)))

    @unary
    async def SetModelRate(
        self, request: admin_pb.SetModelRateRequest, context: Context
    ) -> admin_pb.SetModelRateResponse:
        rate = request.rate
        if not rate.model:
            raise InvalidRequest("rate.model is required", field="rate.model")
        amounts = {name: getattr(rate, name) for name in RATE_AMOUNTS}
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
        return admin_pb.ListModelRatesResponse(rates=[_rate(r) for r in await self._accounts.credits.list_rates()])

    @unary
    async def AddProviderCredential(
        self, request: admin_pb.AddProviderCredentialRequest, context: Context
    ) -> admin_pb.AddProviderCredentialResponse:
        if not request.provider or not request.secret:
            raise InvalidRequest("provider and secret are required", field="secret")
        info = await self._vault().add(request.provider, request.secret, label=request.label)
        return admin_pb.AddProviderCredentialResponse(credential=_credential(info))

    @unary
    async def ListProviderCredentials(
        self, request: admin_pb.ListProviderCredentialsRequest, context: Context
    ) -> admin_pb.ListProviderCredentialsResponse:
        infos = await self._vault().list_credentials(request.provider or None)
        return admin_pb.ListProviderCredentialsResponse(credentials=[_credential(i) for i in infos])

    @unary
    async def RemoveProviderCredential(
        self, request: admin_pb.RemoveProviderCredentialRequest, context: Context
    ) -> admin_pb.RemoveProviderCredentialResponse:
        return admin_pb.RemoveProviderCredentialResponse(removed=await self._vault().remove(request.credential_id))

    @unary
    async def ActivateProviderCredential(
        self, request: admin_pb.ActivateProviderCredentialRequest, context: Context
    ) -> admin_pb.ActivateProviderCredentialResponse:
        vault = self._vault()
        try:
            await vault.mark_active(request.credential_id)
            info = await vault.info(request.credential_id)
        except KeyError:
            raise ModelNotFound(f"no provider credential {request.credential_id!r}", field="credential_id") from None
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
        held = await self._accounts.credits.list_reservations(request.owner or None)
        return admin_pb.ListReservationsResponse(reservations=[_reservation(r) for r in held])

    @unary
    async def QueryUsage(self, request: admin_pb.QueryUsageRequest, context: Context) -> admin_pb.QueryUsageResponse:
        unknown = set(request.group_by) - GROUPS
        if unknown:
            raise InvalidRequest(
                f"group_by takes {', '.join(sorted(GROUPS))}, not {', '.join(sorted(unknown))}", field="group_by"
            )
        totals = await self._accounts.ledger.totals(
            cast(list[GroupBy], list(request.group_by)),
            since=_day(request.since, "since"),
            until=_day(request.until, "until"),
            key_id=request.key_id or None,
            owner_id=request.owner or None,
        )
        rows = [
            admin_pb.UsageTotal(
                key_id=t.key_id or "",
                owner=t.owner_id or "",
                provider=t.provider or "",
                model=t.model or "",
                day=t.day.isoformat() if t.day else "",
                calls=t.calls,
                errors=t.errors,
                input_tokens=t.input_tokens,
                output_tokens=t.output_tokens,
                cached_tokens=t.cached_tokens,
                images=t.image_count,
                audio_ms=t.audio_ms,
                characters=t.characters,
                credits=format_credits(t.credits_micros),
            )
            for t in totals
        ]
        return admin_pb.QueryUsageResponse(totals=rows)

    async def _owner(self, text: str) -> str:
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


def _credits(text: str, field: str) -> int:
    try:
        return credits_to_micros(text)
    except (InvalidOperation, ValueError) as exc:
        raise InvalidRequest(f"{field} must be a decimal number of credits, not {text!r}", field=field) from exc


def _day(text: str, field: str) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.combine(date.fromisoformat(text), datetime.min.time())
    except ValueError as exc:
        raise InvalidRequest(f"{field} must be a day YYYY-MM-DD, not {text!r}", field=field) from exc


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return stamp


def _key(record: KeyRecord) -> admin_pb.ApiKey:
    return admin_pb.ApiKey(
        id=record.id,
        display=record.display,
        name=record.name,
        owner=record.owner_id,
        allowed_models=list(record.allowed_models or ()),
        spend_cap=format_credits(record.spend_cap_micros) if record.spend_cap_micros is not None else "",
        create_time=_timestamp(record.created_at),
        expire_time=_timestamp(record.expires_at),
        revoke_time=_timestamp(record.revoked_at),
    )


def _balance(balance: Balance) -> admin_pb.Balance:
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


def _reservation(held: Reservation) -> admin_pb.Reservation:
    return admin_pb.Reservation(
        id=held.id or "",
        owner=held.owner_id,
        key_id=held.key_id or "",
        amount=format_credits(held.amount_micros),
        request_id=held.request_id or "",
        create_time=_timestamp(held.created_at),
        expire_time=_timestamp(held.expires_at),
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
