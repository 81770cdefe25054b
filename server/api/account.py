"""AccountService: what the owner of the calling API key may see of its own account
(the web dashboard's owner view): its keys, balance, reservations, rate limits, usage
and recent calls.

The owner is taken from the authenticated key (`server.api.auth.CURRENT_KEY`), never
from the request, so a key can only ever read its own owner's data. A call without a
key (possible when AIGNE_HUB_AUTH_REQUIRED=false serves anonymous calls) is
UNAUTHENTICATED: there is no account to show. Lists are bounded: an owner's keys,
reservations and rules at most `MAX_LISTED` each, calls paged as in the admin API.
"""

from __future__ import annotations

from typing import Any, TypeAlias, cast

import grpc

from aigne.hub.v1 import account_service_pb2 as account_pb
from aigne.hub.v1 import account_service_pb2_grpc as account_grpc
from server.accounts.errors import Unauthenticated
from server.accounts.keys import KeyRecord
from server.accounts.ledger import GroupBy
from server.accounts.service import Accounts
from server.api.admin import (
    balance_message,
    configured_limits,
    configured_limits_of,
    key_message,
    parse_day,
    rate_limit_message,
    recent_calls,
    reservation_message,
    usage_total_message,
)
from server.api.auth import CURRENT_KEY
from server.api.calls import unary
from server.errors import InvalidRequest
from server.limits.rules import LimitStore
from server.limits.windows import spend_by_rule

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
# An owner sees its own totals: grouping by owner would say nothing more.
GROUPS = frozenset({"key", "provider", "model", "day"})
MAX_LISTED = 1000


class AccountServicer(account_grpc.AccountServiceServicer):
    def __init__(self, accounts: Accounts) -> None:
        self._accounts = accounts

    @unary
    async def GetAccount(
        self, request: account_pb.GetAccountRequest, context: Context
    ) -> account_pb.GetAccountResponse:
        key = _caller()
        keys = await self._accounts.keys.list_keys(key.owner_id, limit=MAX_LISTED)
        held = await self._accounts.credits.list_reservations(key.owner_id, limit=MAX_LISTED)
        store = self._limits()
        rules = await store.find("owner", key.owner_id, limit=MAX_LISTED)
        rules += await configured_limits(self._accounts, "owner", key.owner_id)
        # The keys' rules in a few queries, not three per key.
        by_key = await store.find_each("key", [owned.id for owned in keys])
        for owned in keys:
            own = by_key[owned.id]
            rules += own[:MAX_LISTED]
            rules += configured_limits_of(self._accounts, "key", owned.id, own)
        rules = rules[:MAX_LISTED]
        spend = await spend_by_rule(self._accounts.db, rules, self._accounts.credits.clock())
        return account_pb.GetAccountResponse(
            key=key_message(key),
            keys=[key_message(k) for k in keys],
            balance=balance_message(await self._accounts.credits.balance(key.owner_id)),
            reservations=[reservation_message(r) for r in held],
            limits=[rate_limit_message(r, spend) for r in rules],
            billing_enabled=self._accounts.credits.billing_enabled,
        )

    @unary
    async def QueryAccountUsage(
        self, request: account_pb.QueryAccountUsageRequest, context: Context
    ) -> account_pb.QueryAccountUsageResponse:
        key = _caller()
        unknown = set(request.group_by) - GROUPS
        if unknown:
            raise InvalidRequest(
                f"group_by takes {', '.join(sorted(GROUPS))}, not {', '.join(sorted(unknown))}", field="group_by"
            )
        totals = await self._accounts.ledger.totals(
            cast(list[GroupBy], list(request.group_by)),
            since=parse_day(request.since, "since"),
            until=parse_day(request.until, "until"),
            owner_id=key.owner_id,
        )
        return account_pb.QueryAccountUsageResponse(totals=[usage_total_message(t) for t in totals])

    @unary
    async def ListAccountCalls(
        self, request: account_pb.ListAccountCallsRequest, context: Context
    ) -> account_pb.ListAccountCallsResponse:
        key = _caller()
        calls, next_token = await recent_calls(
            self._accounts, request.page_size, request.page_token, owner_id=key.owner_id
        )
        return account_pb.ListAccountCallsResponse(calls=calls, next_page_token=next_token)

    def _limits(self) -> LimitStore:
        limiter = self._accounts.limiter
        return limiter.store if limiter is not None else LimitStore(self._accounts.db)


def _caller() -> KeyRecord:
    key = CURRENT_KEY.get()
    if key is None:
        raise Unauthenticated("the account API needs an API key: send 'Authorization: Bearer <key>'")
    return key
