"""A hostile gRPC client, run in its own process by tests/test_hostile_grpc.py so that
the test process's RSS is the server's alone.

    python -m tests.hostile_client PORT API_KEY ADMIN_TOKEN ROUNDS

Each round sends, four at a time, undecodable bytes, a 150-level deep Value, 2,000
metadata pairs, a 1 MB string with invalid UTF-8, a 1 MB key name, an 8 MB provider
secret, a credit amount of 1e999999999 and a list with page_size 100000. Prints how
many calls were refused with INVALID_ARGUMENT and how many answered otherwise.
"""

from __future__ import annotations

import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc

from aigne.hub.v1 import admin_service_pb2 as admin_pb
from tests.helpers import chat_request

CHAT = "/aigne.hub.v1.ChatService/CreateChatCompletion"
ADMIN = "/aigne.hub.v1.AdminService/"


def _field(number: int, payload: bytes) -> bytes:
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _deep_chat(levels: int) -> bytes:
    value = _field(3, b"x")
    for _ in range(levels):
        value = _field(6, _field(1, value))
    return _field(1, b"openai/gpt-4o-mini") + _field(2, _field(1, b"user") + _field(2, value))


def bodies() -> list[tuple[str, bytes]]:
    big = "n" * 1_000_000
    return [
        (CHAT, _deep_chat(150)),
        (CHAT, b"\xff\xfe\xfd\xfc\xfb\xfa" * 1000),
        (CHAT, chat_request(metadata={f"k{i}": big[:512] for i in range(2000)}).SerializeToString()),
        (CHAT, chat_request(user=big).SerializeToString().replace(b"hello", b"\xc3\x28\xc3\x28\xc3")),
        (ADMIN + "CreateApiKey", admin_pb.CreateApiKeyRequest(owner="user:rss", name=big).SerializeToString()),
        (
            ADMIN + "AddProviderCredential",
            admin_pb.AddProviderCredentialRequest(provider="badkey", secret=big * 8).SerializeToString(),
        ),
        (
            ADMIN + "GrantCredits",
            admin_pb.GrantCreditsRequest(owner="user:rss", amount="1e999999999").SerializeToString(),
        ),
        (ADMIN + "ListApiKeys", admin_pb.ListApiKeysRequest(page_size=100_000).SerializeToString()),
    ]


def main(port: int, key: str, admin_token: str, rounds: int) -> None:
    options = [
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ]
    outcomes: Counter[str] = Counter()
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:

        def send(item: tuple[str, bytes]) -> str:
            method, body = item
            secret = admin_token if method.startswith(ADMIN) else key
            try:
                channel.unary_unary(method)(body, metadata=(("authorization", f"Bearer {secret}"),), timeout=30)
            except grpc.RpcError as error:
                return error.code().name
            return "OK"

        work = bodies() * rounds
        with ThreadPoolExecutor(4) as pool:
            outcomes.update(pool.map(send, work))
    print(dict(outcomes), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))
