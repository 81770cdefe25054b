"""Owners of keys and balances: users and projects, with ids like `user:alice`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal, cast

from sqlalchemy import select

from server.storage.database import Database
from server.storage.schema import owners, utcnow

OwnerKind = Literal["user", "project"]


@dataclass(frozen=True, slots=True)
class Owner:
    id: str
    kind: OwnerKind
    name: str
    created_at: datetime


def parse_owner(text: str) -> tuple[OwnerKind, str]:
    """`user:alice` -> ("user", "alice"); ValueError saying the form otherwise."""
    kind, sep, name = text.partition(":")
    if not sep or kind not in ("user", "project") or not name:
        raise ValueError(f"owner must be user:NAME or project:NAME, not {text!r}")
    return cast(OwnerKind, kind), name


def owner_id(kind: OwnerKind, name: str) -> str:
    return f"{kind}:{name}"


async def ensure_owner(db: Database, kind: OwnerKind, name: str) -> Owner:
    """The owner `kind:name`, created if it does not exist yet."""
    if kind not in ("user", "project"):
        raise ValueError(f"owner kind must be 'user' or 'project', not {kind!r}")
    if not name:
        raise ValueError("owner name must not be empty")
    oid = owner_id(kind, name)
    async with db.write() as conn:
        insert = db.insert_ignoring_conflicts(owners, "id").values(id=oid, kind=kind, name=name, created_at=utcnow())
        await conn.execute(insert)
        row = (await conn.execute(select(owners).where(owners.c.id == oid))).one()
    return Owner(row.id, cast(OwnerKind, row.kind), row.name, row.created_at)


async def get_owner(db: Database, oid: str) -> Owner | None:
    async with db.read() as conn:
        row = (await conn.execute(select(owners).where(owners.c.id == oid))).one_or_none()
    if row is None:
        return None
    return Owner(row.id, cast(OwnerKind, row.kind), row.name, row.created_at)
