"""The conversation store in the gateway's database (see
`server.providers.conversation_state` for what it holds and why here).

Each value has an expiry; a read ignores expired rows, and a write purges them at most
once a minute, in the same transaction, so the table holds about one expiry's worth of
tool-calling turns.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from datetime import timedelta

from sqlalchemy import delete, select

from server.storage.database import Database
from server.storage.schema import conversation_state, utcnow

PURGE_INTERVAL_S = 60.0


class DatabaseConversationStore:
    """`ConversationStore` over the `conversation_state` table."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._purged_at = float("-inf")

    async def put_many(self, values: Mapping[str, str], ttl_s: float) -> None:
        now = utcnow()
        expires = now + timedelta(seconds=ttl_s)
        table = conversation_state
        async with self._db.write() as conn:
            if time.monotonic() - self._purged_at >= PURGE_INTERVAL_S:
                self._purged_at = time.monotonic()
                await conn.execute(delete(table).where(table.c.expires_at <= now))
            await conn.execute(delete(table).where(table.c.key.in_(list(values))))
            await conn.execute(
                table.insert(), [{"key": key, "value": value, "expires_at": expires} for key, value in values.items()]
            )

    async def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        table = conversation_state
        query = select(table.c.key, table.c.value).where(table.c.key.in_(list(keys)), table.c.expires_at > utcnow())
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        return {str(row.key): str(row.value) for row in rows}
