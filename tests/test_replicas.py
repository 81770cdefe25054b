"""Two gateway replicas sharing one PostgreSQL database (and, for the SQLite case, one
file): `aigne-hub migrate`, keys made on one replica work on the other, a revocation
reaches the other within the key cache TTL, and both write one ledger."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import grpc
import pytest

from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from server.accounts.owners import ensure_owner
from server.app import start_gateway
from server.config import Settings
from server.storage.database import StorageError
from tests.conftest import gateway_config
from tests.helpers import bearer_interceptors, chat_request
from tests.storage_fixtures import database_url  # noqa: F401 - the fixture

AIGNE_HUB = Path(sys.executable).parent / "aigne-hub"


async def migrate(url: str) -> None:
    env = {**os.environ, "AIGNE_HUB_DATABASE_URL": url}
    process = await asyncio.create_subprocess_exec(
        str(AIGNE_HUB), "migrate", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()


async def test_two_replicas_share_keys_revocations_and_ledger(database_url, fake_openai):  # noqa: F811
    if database_url.startswith("postgresql"):
        with pytest.raises(StorageError):  # the server refuses a schema that is behind
            await start_gateway(Settings(grpc_port=0, database_url=database_url), gateway_config(fake_openai.base_url))
    await migrate(database_url)
    settings = Settings(grpc_port=0, database_url=database_url, key_cache_ttl_s=0.5)
    first = await start_gateway(settings, gateway_config(fake_openai.base_url))
    second = await start_gateway(settings, gateway_config(fake_openai.base_url))
    try:
        owner = await ensure_owner(first.accounts.db, "project", "shared")
        record, secret = await first.accounts.keys.create_key(owner.id, "both")

        async def call(gateway):
            target = f"127.0.0.1:{gateway.port}"
            async with grpc.aio.insecure_channel(target, interceptors=bearer_interceptors(secret)) as channel:
                return await chat_grpc.ChatServiceStub(channel).CreateChatCompletion(chat_request())

        await asyncio.gather(call(first), call(second), call(second))
        await first.accounts.keys.revoke_key(record.id)
        with pytest.raises(grpc.aio.AioRpcError):
            await call(first)  # at once on the revoking replica
        await asyncio.sleep(0.6)  # the other replica's cache TTL
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(second)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert len(await second.accounts.ledger.records(key_id=record.id)) == 3
    finally:
        await first.stop(0.2)
        await second.stop(0.2)
