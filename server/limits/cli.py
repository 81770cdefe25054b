"""`aigne-hub limits set|show|rm`: rate limits and spend windows on the local database.

    aigne-hub limits set (--key KEY_ID | --owner OWNER) [--model GLOB] [--rpm N] [--tpm N]
                         [--concurrency N] [--daily-credits X] [--monthly-credits X]
    aigne-hub limits show [--key KEY_ID | --owner OWNER] [--json]
    aigne-hub limits rm (--key KEY_ID | --owner OWNER) [--model GLOB]

Limits are whole numbers from 1 (credits: decimals, e.g. 2.5); anything else, or a key
or owner that does not exist, is refused with a message and a non-zero exit code, and
nothing changes. Running servers apply a change within their key cache TTL.
"""

from __future__ import annotations

import argparse
import json
from decimal import Decimal, InvalidOperation
from typing import Any

from server.accounts.credits import credits_to_micros
from server.accounts.errors import format_credits
from server.errors import GatewayError
from server.limits.rules import LimitRule, LimitStore, Scope
from server.storage import Database

LIMIT_FLAGS = (
    ("rpm", "requests per minute"),
    ("tpm", "tokens per minute (input plus output)"),
    ("concurrency", "calls in flight at once"),
)


def positive_int(text: str) -> int:
    """argparse type of a limit: a whole number from 1 (the parser's error says why)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text[:40]!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def positive_credits(text: str) -> int:
    """argparse type of a credit amount: decimal credits above 0, as micro-credits."""
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"must be a number of credits, not {text[:40]!r}") from None
    if not amount.is_finite() or amount <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text[:40]}")
    return credits_to_micros(amount)


def _subject(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--key", help="an API key's id (as `keys list` shows it)")
    group.add_argument("--owner", help="user:NAME or project:NAME: all the owner's keys together")


def add_commands(sub: Any) -> None:
    """Registers `limits` on the `aigne-hub` parser's subparsers."""
    limits = sub.add_parser("limits", help="rate limits per key or owner, per model glob")
    actions = limits.add_subparsers(dest="action", required=True)
    set_ = actions.add_parser("set", help="set limits (changes only those given)")
    _subject(set_, required=True)
    set_.add_argument("--model", default="*", help="a model glob such as openai/* (default: every model)")
    for flag, text in LIMIT_FLAGS:
        set_.add_argument(f"--{flag}", type=positive_int, help=text)
    set_.add_argument("--daily-credits", type=positive_credits, help="credits per UTC day (stored, not enforced yet)")
    set_.add_argument(
        "--monthly-credits", type=positive_credits, help="credits per UTC month (stored, not enforced yet)"
    )
    show = actions.add_parser("show", help="list limits")
    _subject(show, required=False)
    remove = actions.add_parser("rm", help="remove a rule")
    _subject(remove, required=True)
    remove.add_argument("--model", default="*", help="the rule's model glob (default: *)")
    for parser in (limits, set_, show, remove):
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def rule_from_args(scope: Scope, subject: str, args: argparse.Namespace) -> LimitRule:
    return LimitRule(
        scope,
        subject,
        args.model,
        rpm=args.rpm,
        tpm=args.tpm,
        concurrency=args.concurrency,
        daily_credits_micros=getattr(args, "daily_credits", None),
        monthly_credits_micros=getattr(args, "monthly_credits", None),
    )


def rule_row(rule: LimitRule) -> dict[str, Any]:
    micros = {"daily_credits_micros": "daily_credits", "monthly_credits_micros": "monthly_credits"}
    row: dict[str, Any] = {"scope": rule.scope, "subject": rule.subject, "model": rule.model}
    for name, value in (("rpm", rule.rpm), ("tpm", rule.tpm), ("concurrency", rule.concurrency)):
        row[name] = value
    for name, shown in micros.items():
        value = getattr(rule, name)
        row[shown] = format_credits(value) if value is not None else None
    row["updated_at"] = rule.updated_at
    return row


async def run(args: argparse.Namespace, db: Database) -> None:
    store = LimitStore(db)
    scope: Scope = "key" if args.key else "owner"
    subject = args.key or args.owner
    try:
        if args.action == "set":
            rule = await store.set(rule_from_args(scope, subject, args))
            _print(args, rule_row(rule), f"limits set on {scope} {subject} for {rule.model}: {_summary(rule)}")
        elif args.action == "rm":
            await store.remove(scope, subject, args.model)
            _print(args, {"removed": True}, f"removed the limits on {scope} {subject} for {args.model}")
        else:
            rules = await store.find(scope if subject else None, subject)
            _table(args, [rule_row(r) for r in rules])
    except GatewayError as exc:
        raise SystemExit(f"aigne-hub: {exc.message}") from exc


def _summary(rule: LimitRule) -> str:
    return ", ".join(f"{name}={value}" for name, value in rule_row(rule).items() if name in _SHOWN and value)


_SHOWN = ("rpm", "tpm", "concurrency", "daily_credits", "monthly_credits")


def _print(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data, default=str) if args.json else text)


def _table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    if args.json:
        print(json.dumps(rows, default=str))
        return
    columns = ["scope", "subject", "model", *_SHOWN]
    cells = [["" if row.get(c) is None else str(row[c]) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    if not rows:
        print("(none)")
