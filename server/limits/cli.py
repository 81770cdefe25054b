"""`aigne-hub limits set|show|rm`: rate limits and spend windows on the local database.

    aigne-hub limits set (--key KEY_ID | --owner OWNER) [--model GLOB] [--rpm N] [--tpm N]
                         [--concurrency N] [--daily-credits X] [--monthly-credits X]
    aigne-hub limits show [--key KEY_ID | --owner OWNER] [--json]
    aigne-hub limits rm (--key KEY_ID | --owner OWNER) [--model GLOB]

`show` lists each credit limit with what was charged so far in the current UTC day or
month (`daily_spent`, `monthly_spent`; `--json` adds what calls in flight hold). It
also lists the config file's defaults for every key and every owner
(`limits.default_key`, `limits.default_owner`), with `source` "config" (explicit rules:
"rule"): subject `*`, or the key or owner named when it has no rule of its own for all
models (they then apply to it).

Limits are whole numbers from 1 (credits: decimals, e.g. 2.5); anything else, or a key
or owner that does not exist, is refused with a message and a non-zero exit code, and
nothing changes. Running servers apply a change within their key cache TTL.
"""

from __future__ import annotations

import argparse
import json
import sys
from decimal import Decimal, InvalidOperation
from typing import Any

from server.accounts.credits import credits_to_micros
from server.accounts.errors import format_credits
from server.errors import GatewayError
from server.limits.limiter import DefaultLimits, listed_defaults
from server.limits.rules import LimitRule, LimitStore, Scope
from server.limits.windows import WINDOW_KINDS, WindowKind, WindowSpend, spend_by_rule
from server.storage import Database
from server.storage.schema import utcnow

# The config file's `limits.default_key` and `limits.default_owner`.
ConfigDefaults = tuple[DefaultLimits, DefaultLimits]
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
    set_.add_argument("--daily-credits", type=positive_credits, help="credits charged per UTC day")
    set_.add_argument("--monthly-credits", type=positive_credits, help="credits charged per UTC calendar month")
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


def rule_row(
    rule: LimitRule, spend: dict[tuple[str, str, str, WindowKind], WindowSpend] | None = None
) -> dict[str, Any]:
    """The rule as shown; with `spend`, what each credit window holds now beside it."""
    row: dict[str, Any] = {"scope": rule.scope, "subject": rule.subject, "model": rule.model}
    for name, value in (("rpm", rule.rpm), ("tpm", rule.tpm), ("concurrency", rule.concurrency)):
        row[name] = value
    for kind in WINDOW_KINDS:
        value = getattr(rule, f"{kind}_micros")
        row[kind] = format_credits(value) if value is not None else None
        window = (spend or {}).get((rule.scope, rule.subject, rule.model, kind))
        if window is not None:
            row[f"{kind.partition('_')[0]}_spent"] = format_credits(window.spent_micros)
            row[f"{kind}_held"] = format_credits(window.reserved_micros)
    row["updated_at"] = rule.updated_at
    row["source"] = "rule"
    return row


async def run(
    args: argparse.Namespace, db: Database, *, billing_enabled: bool = True, defaults: ConfigDefaults | None = None
) -> None:
    """`defaults`: the config file's defaults for every key and every owner, which
    `show` lists too."""
    store = LimitStore(db)
    scope: Scope = "key" if args.key else "owner"
    subject = args.key or args.owner
    try:
        if args.action == "set":
            rule = await store.set(rule_from_args(scope, subject, args))
            _print(args, rule_row(rule), f"limits set on {scope} {subject} for {rule.model}: {_summary(rule)}")
            if not billing_enabled and (args.daily_credits or args.monthly_credits):
                # Credit windows count what the ledger charges, and nothing is charged.
                print("note: credit limits apply once AIGNE_HUB_BILLING_ENABLED=true", file=sys.stderr)
        elif args.action == "rm":
            await store.remove(scope, subject, args.model)
            _print(args, {"removed": True}, f"removed the limits on {scope} {subject} for {args.model}")
        else:
            rules = await store.find(scope if subject else None, subject)
            key_defaults, owner_defaults = defaults or (DefaultLimits(), DefaultLimits())
            configured = listed_defaults(rules, scope, subject, key_defaults, owner_defaults)
            # A default listed for every key or owner (subject `*`) has no spend of its own.
            counted = [*rules, *(r for r in configured if r.subject != "*")]
            spend = await spend_by_rule(db, counted, utcnow())
            rows = [rule_row(r, spend) for r in rules]
            _table(args, rows + [{**rule_row(r, spend), "source": "config"} for r in configured])
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
    columns = ["scope", "subject", "model", "rpm", "tpm", "concurrency"]
    columns += ["daily_credits", "daily_spent", "monthly_credits", "monthly_spent", "source"]
    cells = [["" if row.get(c) is None else str(row[c]) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    if not rows:
        print("(none)")
