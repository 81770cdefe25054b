"""`aigne-hub keys|credits|usage|credentials|limits|migrate`: account administration on the local database
(the one `AIGNE_HUB_DATA_DIR` / `AIGNE_HUB_DATABASE_URL` name, as the server uses).

Readable tables by default, `--json` for scripts. Key secrets are printed once, at
creation, and never again; provider credentials only ever masked (`credentials`
needs AIGNE_HUB_MASTER_KEY, as the server does). `credentials activate` puts a
credential back into rotation without probing it: running servers pick it up within
their credential cache TTL.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, date, datetime, timedelta
from typing import Any, cast

from server.accounts.credentials import CredentialInfo, CredentialVault, load_master_key
from server.accounts.credits import RATE_AMOUNTS, CreditService, RateAmountError, credits_to_micros, rate_from_credits
from server.accounts.errors import format_credits
from server.accounts.keys import KeyRecord, KeyStore
from server.accounts.ledger import GroupBy, Ledger
from server.accounts.owners import ensure_owner, parse_owner
from server.config import ConfigError, Settings, load_gateway_config
from server.limits import cli as limits_cli
from server.limits.limiter import DefaultLimits
from server.limits.rules import LimitRule, LimitStore
from server.storage import Database


def add_commands(sub: Any) -> None:
    """Registers the account commands on the `aigne-hub` parser's subparsers."""
    keys = sub.add_parser("keys", help="create, list and revoke API keys").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", help="create a key and print its secret (shown once)")
    create.add_argument("--owner", required=True, help="user:NAME or project:NAME")
    create.add_argument("--name", required=True, help="what the key is for")
    create.add_argument("--models", nargs="*", help="allowed models, globs such as openai/* (default: all)")
    create.add_argument("--expires-in-days", type=float, help="expiry, in days from now")
    create.add_argument("--cap", help="spending cap in credits (default: none)")
    create.add_argument("--rpm", type=limits_cli.positive_int, help="requests per minute (a `limits set` shortcut)")
    create.add_argument("--tpm", type=limits_cli.positive_int, help="tokens per minute (a `limits set` shortcut)")
    listing = keys.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--owner", help="only this owner's keys")
    revoke = keys.add_parser("revoke", help="revoke a key (every replica within the key cache TTL)")
    revoke.add_argument("key_id")

    credits = sub.add_parser("credits", help="grant and show credit balances, set rates").add_subparsers(
        dest="action", required=True
    )
    grant = credits.add_parser("grant", help="add credits to an owner's balance")
    grant.add_argument("owner", help="user:NAME or project:NAME")
    grant.add_argument("amount", help="credits, e.g. 25 or 0.5")
    grant.add_argument("--note", default="")
    show = credits.add_parser("show", help="an owner's balance")
    show.add_argument("owner")
    rate = credits.add_parser("rate", help="set a model's rates (credits per million tokens, per image, ...)")
    rate.add_argument("model", help="provider/model or a glob such as openai/* or *")
    flags = ("input", "output", "cached-input", "image", "audio-second", "character")
    for flag, amount in zip(flags, RATE_AMOUNTS, strict=True):
        rate.add_argument(f"--{flag}", dest=amount, default="0", help=f"credits ({amount.replace('_', ' ')})")
    credits.add_parser("rates", help="list the rates")
    held = credits.add_parser("reservations", help="credits held by calls in flight, oldest first")
    held.add_argument("--owner", help="only this owner's reservations (user:NAME or project:NAME)")
    release = credits.add_parser(
        "release-expired", help="give back reservations whose lease ended (their server died mid-call)"
    )

    usage = sub.add_parser("usage", help="usage totals from the ledger")
    usage.add_argument(
        "--by", nargs="*", default=["key", "model", "day"], choices=["key", "owner", "provider", "model", "day"]
    )
    usage.add_argument("--since", type=date.fromisoformat, help="first UTC day (YYYY-MM-DD)")
    usage.add_argument("--until", type=date.fromisoformat, help="day after the last (YYYY-MM-DD)")

    credentials = sub.add_parser("credentials", help="list stored provider credentials, reactivate one")
    credential_actions = credentials.add_subparsers(dest="action", required=True)
    credential_list = credential_actions.add_parser("list", help="list credentials (masked) and their status")
    credential_list.add_argument("--provider", help="only this provider's credentials")
    activate = credential_actions.add_parser("activate", help="put an invalid credential back into rotation")
    activate.add_argument("credential_id")

    limits_cli.add_commands(sub)
    sub.add_parser("migrate", help="bring the database schema up to date (PostgreSQL: run before serving)")
    for command in ("keys", "credits", "usage", "credentials", "migrate"):
        sub.choices[command].add_argument("--json", action="store_true", help="machine-readable output")
    for parser in (create, listing, revoke, grant, show, rate, held, release, credential_list, activate):
        parser.add_argument("--json", action="store_true", help="machine-readable output")


async def run(args: argparse.Namespace, settings: Settings) -> None:
    if args.command == "migrate":
        await (await Database.open_with(settings, migrate=True)).close()
        _print(args, {"migrated": True}, "database schema is up to date")
        return
    db = await Database.open_with(settings)
    try:
        if args.command == "keys":
            await _keys(args, db, settings)
        elif args.command == "credits":
            await _credits(args, CreditService(db, billing_enabled=True), db)
        elif args.command == "limits":
            defaults = _default_limits(settings) if args.action == "show" else None
            await limits_cli.run(args, db, billing_enabled=settings.billing_enabled, defaults=defaults)
        elif args.command == "credentials":
            master_key = settings.master_key.get_secret_value() if settings.master_key else None
            await _credentials(args, CredentialVault(db, load_master_key(master_key)))
        else:
            await _usage(args, Ledger(db))
    finally:
        await db.close()


def _default_limits(settings: Settings) -> tuple[DefaultLimits, DefaultLimits]:
    """The config file's defaults for every key and every owner (a bad file stops the
    CLI with its error)."""
    try:
        limits = load_gateway_config(settings.config).limits
    except ConfigError as exc:
        raise SystemExit(f"aigne-hub: {exc}") from exc
    return DefaultLimits.from_config(limits.default_key), DefaultLimits.from_config(limits.default_owner)


async def _keys(args: argparse.Namespace, db: Database, settings: Settings) -> None:
    pepper = settings.key_pepper.get_secret_value().encode() if settings.key_pepper else None
    store = KeyStore(db, pepper=pepper)
    if args.action == "create":
        owner = await _owner(db, args.owner)
        expires = datetime.now(UTC) + timedelta(days=args.expires_in_days) if args.expires_in_days else None
        cap = credits_to_micros(args.cap) if args.cap is not None else None
        record, secret = await store.create_key(
            owner.id, args.name, expires_at=expires, allowed_models=args.models or None, spend_cap_micros=cap
        )
        if args.rpm or args.tpm:
            await LimitStore(db).set(LimitRule("key", record.id, rpm=args.rpm, tpm=args.tpm))
        _print(
            args,
            {**_key_row(record), "secret": secret},
            f"created key {record.id} ({record.display})\nsecret (shown once, store it now): {secret}",
        )
    elif args.action == "list":
        rows = [_key_row(r) for r in await store.list_keys(owner_id=args.owner)]
        _table(args, rows, ["id", "display", "name", "owner_id", "allowed_models", "expires_at", "revoked_at"])
    else:
        record = await store.revoke_key(args.key_id)
        _print(args, _key_row(record), f"revoked key {record.id} ({record.display})")


async def _credits(args: argparse.Namespace, service: CreditService, db: Database) -> None:
    if args.action == "grant":
        owner = await _owner(db, args.owner)
        balance = await service.grant(owner.id, credits_to_micros(args.amount), args.note)
        _print(args, _balance_row(balance), f"{owner.id}: balance {format_credits(balance.balance_micros)} credits")
    elif args.action == "show":
        balance = await service.balance(args.owner)
        _table(args, [_balance_row(balance)], ["owner_id", "balance", "reserved", "available"])
    elif args.action == "rate":
        amounts = {name: getattr(args, name) for name in RATE_AMOUNTS}
        try:
            rate = rate_from_credits(args.model, amounts)
        except RateAmountError as exc:
            raise SystemExit(f"aigne-hub: {exc}") from exc
        await service.set_rate(rate)
        _print(args, asdict(rate), f"rate set for {rate.model}")
    elif args.action == "reservations":
        await _reservations(args, service)
    elif args.action == "release-expired":
        released = await service.release_expired()
        _print(args, {"released": released}, f"released {released} expired reservation(s)")
    else:
        _table(
            args,
            [asdict(r) for r in await service.list_rates()],
            [
                "model",
                "input_per_million_micros",
                "output_per_million_micros",
                "cached_input_per_million_micros",
                "per_image_micros",
            ],
        )


async def _credentials(args: argparse.Namespace, vault: CredentialVault) -> None:
    if args.action == "list":
        rows = [_credential_row(info) for info in await vault.list_credentials(args.provider)]
        _table(args, rows, ["id", "provider", "label", "masked", "status", "invalid_reason", "updated_at"])
        return
    try:
        await vault.mark_active(args.credential_id)
        info = await vault.info(args.credential_id)
    except KeyError:
        raise SystemExit(f"aigne-hub: no provider credential {args.credential_id!r}") from None
    _print(args, _credential_row(info), f"activated {info.provider} credential {info.masked} ({info.id})")


def _credential_row(info: CredentialInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "provider": info.provider,
        "label": info.label,
        "masked": info.masked,
        "status": info.status,
        "invalid_reason": info.invalid_reason or "",
        "created_at": info.created_at.isoformat(),
        "updated_at": info.updated_at.isoformat(),
    }


async def _reservations(args: argparse.Namespace, service: CreditService) -> None:
    if args.owner is not None:
        try:
            parse_owner(args.owner)
        except ValueError as exc:
            raise SystemExit(f"aigne-hub: {exc}") from exc
    rows = [
        {
            "id": r.id,
            "kind": "block" if r.is_block else "call",
            "owner_id": r.owner_id,
            "key_id": r.key_id or "",
            "amount": format_credits(r.amount_micros),
            "request_id": r.request_id or "",
            "created_at": r.created_at.isoformat(),
            "expires_at": r.expires_at.isoformat() if r.expires_at else "",
        }
        for r in await service.list_reservations(args.owner)
    ]
    _table(args, rows, ["id", "kind", "owner_id", "key_id", "amount", "request_id", "created_at", "expires_at"])


async def _usage(args: argparse.Namespace, ledger: Ledger) -> None:
    since = datetime.combine(args.since, datetime.min.time()) if args.since else None
    until = datetime.combine(args.until, datetime.min.time()) if args.until else None
    groups = cast(Sequence[GroupBy], args.by)
    totals = await ledger.totals(groups, since=since, until=until)
    rows = []
    for total in totals:
        row = {k: (v.isoformat() if isinstance(v, date) else v) for k, v in asdict(total).items()}
        row["credits"] = format_credits(total.credits_micros)
        rows.append(row)
    columns = [{"key": "key_id", "owner": "owner_id"}.get(g, g) for g in groups]
    _table(args, rows, [*columns, "calls", "errors", "input_tokens", "output_tokens", "cached_tokens", "credits"])


async def _owner(db: Database, text: str) -> Any:
    try:
        kind, name = parse_owner(text)
    except ValueError as exc:
        raise SystemExit(f"aigne-hub: {exc}") from exc
    return await ensure_owner(db, kind, name)


def _key_row(record: KeyRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "display": record.display,
        "name": record.name,
        "owner_id": record.owner_id,
        "allowed_models": ",".join(record.allowed_models) if record.allowed_models else "*",
        "spend_cap": format_credits(record.spend_cap_micros) if record.spend_cap_micros is not None else "",
        "created_at": record.created_at.isoformat(),
        "expires_at": record.expires_at.isoformat() if record.expires_at else "",
        "revoked_at": record.revoked_at.isoformat() if record.revoked_at else "",
    }


def _balance_row(balance: Any) -> dict[str, Any]:
    return {
        "owner_id": balance.owner_id,
        "balance": format_credits(balance.balance_micros),
        "reserved": format_credits(balance.reserved_micros),
        "available": format_credits(balance.available_micros),
    }


def _print(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data, default=str) if args.json else text)


def _table(args: argparse.Namespace, rows: list[dict[str, Any]], columns: list[str]) -> None:
    if args.json:
        print(json.dumps(rows, default=str))
        return
    cells = [[str(row.get(c, "") if row.get(c) is not None else "") for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    if not rows:
        print("(none)")
