"""Storage settings (`AIGNE_HUB_*`); meant to be folded into `server.config.Settings`.

AIGNE_HUB_DATA_DIR       where the embedded SQLite file lives; default
                         $XDG_DATA_HOME/aigne-hub (~/.local/share/aigne-hub)
AIGNE_HUB_DATABASE_URL   a PostgreSQL URL (postgresql://user@host/db) for several
                         replicas sharing state; default: SQLite in the data dir
AIGNE_HUB_SPOOL_DIR      where usage records wait while the database cannot take
                         them (see server.accounts.spool); default <data dir>/spool
AIGNE_HUB_DATABASE_CONNECT_TIMEOUT_S     longest wait for a database connection, pool
                         checkout included (default 5 s)
AIGNE_HUB_DATABASE_STATEMENT_TIMEOUT_S   longest a PostgreSQL statement may run
                         (default 10 s; the gateway's are milliseconds, and no
                         transaction spans a provider call)
A database that cannot be used within these bounds fails the call with 503
STORAGE_UNAVAILABLE and a retry hint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# SQLite's `synchronous` for the gateway's connections (server.storage.database).
SqliteSynchronous = Literal["full", "normal"]

SQLITE_FILENAME = "aigne-hub.db"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "aigne-hub"


class StorageSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AIGNE_HUB_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str | None = None
    # How long a SQLite writer waits for another process's write lock.
    sqlite_busy_timeout_ms: int = Field(10_000, ge=0)
    # full: a commit survives a power cut (waits for the disk); normal: it survives a
    # crash of the process only (server.storage.database).
    sqlite_synchronous: SqliteSynchronous = "full"
    # PostgreSQL connection pool per replica.
    database_pool_size: int = Field(10, ge=1)
    database_max_overflow: int = Field(20, ge=0)
    # The ledger's spool, and how often its replay task looks for spooled records.
    spool_dir: Path | None = None
    spool_replay_interval_s: float = Field(5.0, gt=0)
    database_connect_timeout_s: float = Field(5.0, gt=0)
    database_statement_timeout_s: float = Field(10.0, gt=0)

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / SQLITE_FILENAME}"

    def resolved_spool_dir(self) -> Path:
        return self.spool_dir or self.data_dir / "spool"
