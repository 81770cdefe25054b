"""A minimal HTTP/2 client over a plain socket, for sending what no gRPC library will:
a gRPC length prefix that announces more bytes than follow, END_STREAM with no message,
raw bytes in place of a message.

Just enough of RFC 9113 and RFC 7541 for one stream at a time against a gRPC server:
headers go out as HPACK literals without indexing (no Huffman); answers are decoded
with the static and dynamic tables, and a Huffman-coded string (grpc-core uses them
only for `-bin` values) is kept as None.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, CONTINUATION = 0, 1, 3, 4, 6, 7, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20

# RFC 7541 Appendix A.
STATIC_TABLE: list[tuple[str, str]] = [
    (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"),
    (":path", "/index.html"), (":scheme", "http"), (":scheme", "https"), (":status", "200"),
    (":status", "204"), (":status", "206"), (":status", "304"), (":status", "400"),
    (":status", "404"), (":status", "500"), ("accept-charset", ""), ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""), ("accept-ranges", ""), ("accept", ""), ("access-control-allow-origin", ""),
    ("age", ""), ("allow", ""), ("authorization", ""), ("cache-control", ""),
    ("content-disposition", ""), ("content-encoding", ""), ("content-language", ""), ("content-length", ""),
    ("content-location", ""), ("content-range", ""), ("content-type", ""), ("cookie", ""),
    ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""),
    ("from", ""), ("host", ""), ("if-match", ""), ("if-modified-since", ""),
    ("if-none-match", ""), ("if-range", ""), ("if-unmodified-since", ""), ("last-modified", ""),
    ("link", ""), ("location", ""), ("max-forwards", ""), ("proxy-authenticate", ""),
    ("proxy-authorization", ""), ("range", ""), ("referer", ""), ("refresh", ""),
    ("retry-after", ""), ("server", ""), ("set-cookie", ""), ("strict-transport-security", ""),
    ("transfer-encoding", ""), ("user-agent", ""), ("vary", ""), ("via", ""),
    ("www-authenticate", ""),
]  # fmt: skip


def grpc_frame(message: bytes, announced: int | None = None) -> bytes:
    """A gRPC length-prefixed message; `announced` overrides the stated length."""
    return struct.pack(">BI", 0, len(message) if announced is None else announced) + message


def _literal(name: str, value: str) -> bytes:
    return b"\x00" + _string(name.encode()) + _string(value.encode())


def _string(data: bytes) -> bytes:
    return _integer(len(data), 7, 0) + data


def _integer(value: int, prefix_bits: int, flags: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([flags | value])
    out = bytearray([flags | limit])
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


@dataclass
class _Decoder:
    dynamic: list[tuple[str, str | None]] = field(default_factory=list)
    max_size: int = 4096

    def decode(self, block: bytes) -> list[tuple[str, str | None]]:
        headers: list[tuple[str, str | None]] = []
        pos = 0
        while pos < len(block):
            first = block[pos]
            if first & 0x80:
                index, pos = _read_integer(block, pos, 7)
                headers.append(self._entry(index))
            elif first & 0x40:
                pos = self._literal(block, pos, 6, headers, index_it=True)
            elif first & 0x20:
                self.max_size, pos = _read_integer(block, pos, 5)
                self._evict()
            else:
                pos = self._literal(block, pos, 4, headers, index_it=False)
        return headers

    def _literal(self, block: bytes, pos: int, bits: int, out: list[tuple[str, str | None]], *, index_it: bool) -> int:
        index, pos = _read_integer(block, pos, bits)
        if index:
            name = self._entry(index)[0]
        else:
            raw_name, pos = _read_string(block, pos)
            name = raw_name or "?"
        value, pos = _read_string(block, pos)
        out.append((name, value))
        if index_it:
            self.dynamic.insert(0, (name, value))
            self._evict()
        return pos

    def _entry(self, index: int) -> tuple[str, str | None]:
        if index <= len(STATIC_TABLE):
            return STATIC_TABLE[index - 1]
        return self.dynamic[index - len(STATIC_TABLE) - 1]

    def _evict(self) -> None:
        while sum(len(n) + len(v or "") + 32 for n, v in self.dynamic) > self.max_size:
            self.dynamic.pop()


def _read_integer(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = data[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _read_string(data: bytes, pos: int) -> tuple[str | None, int]:
    huffman = bool(data[pos] & 0x80)
    length, pos = _read_integer(data, pos, 7)
    raw = data[pos : pos + length]
    return (None if huffman else raw.decode("latin-1")), pos + length


@dataclass
class Answer:
    """What the server sent on the stream before it ended (or the wait ran out)."""

    headers: list[tuple[str, str | None]] = field(default_factory=list)
    data: bytes = b""
    ended: bool = False
    reset_code: int | None = None

    def get(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key == name), None)


class RawH2:
    """One HTTP/2 connection to a gRPC server, one stream at a time."""

    def __init__(self, host: str, port: int) -> None:
        self._sock = socket.create_connection((host, port), timeout=5)
        self._authority = f"{host}:{port}"
        self._decoder = _Decoder()
        self._buffer = b""
        self._next_stream = 1
        self._sock.sendall(PREFACE + self._frame(SETTINGS, 0, 0, b""))

    def close(self) -> None:
        self._sock.close()

    def call(
        self, method: str, body: bytes, *, end_stream: bool = True, metadata: tuple[tuple[str, str], ...] = ()
    ) -> int:
        """Opens a stream for `method` and sends `body` (raw DATA payload); returns its id."""
        stream = self._next_stream
        self._next_stream += 2
        fields = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", self._authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *metadata,
        ]
        block = b"".join(_literal(name, value) for name, value in fields)
        frames = self._frame(HEADERS, END_HEADERS, stream, block)
        frames += self._frame(DATA, END_STREAM if end_stream else 0, stream, body)
        self._sock.sendall(frames)
        return stream

    def answer(self, stream: int, wait_s: float) -> Answer:
        """Reads frames until `stream` ends or `wait_s` passes."""
        answer = Answer()
        deadline = time.monotonic() + wait_s
        while not answer.ended and time.monotonic() < deadline:
            frame = self._read_frame(deadline)
            if frame is None:
                break
            kind, flags, stream_id, payload = frame
            self._handle(kind, flags, stream_id, payload, stream, answer)
        return answer

    def _handle(self, kind: int, flags: int, stream_id: int, payload: bytes, stream: int, answer: Answer) -> None:
        if kind == SETTINGS and not flags & ACK:
            self._sock.sendall(self._frame(SETTINGS, ACK, 0, b""))
        elif kind == PING and not flags & ACK:
            self._sock.sendall(self._frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            answer.ended = True
        elif stream_id != stream:
            return
        elif kind in (HEADERS, CONTINUATION):
            answer.headers += self._decoder.decode(_header_block(kind, flags, payload))
            answer.ended = bool(flags & END_STREAM)
        elif kind == DATA:
            answer.data += _unpadded(flags, payload)
            answer.ended = bool(flags & END_STREAM)
        elif kind == RST_STREAM:
            answer.reset_code = struct.unpack(">I", payload)[0]
            answer.ended = True

    def _read_frame(self, deadline: float) -> tuple[int, int, int, bytes] | None:
        while True:
            if len(self._buffer) >= 9:
                length = int.from_bytes(self._buffer[:3], "big")
                if len(self._buffer) >= 9 + length:
                    head, self._buffer = self._buffer[: 9 + length], self._buffer[9 + length :]
                    kind, flags = head[3], head[4]
                    stream_id = struct.unpack(">I", head[5:9])[0] & 0x7FFFFFFF
                    return kind, flags, stream_id, head[9:]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                return None
            self._buffer += chunk

    @staticmethod
    def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _unpadded(flags: int, payload: bytes) -> bytes:
    if flags & PADDED:
        pad = payload[0]
        return payload[1 : len(payload) - pad]
    return payload


def _header_block(kind: int, flags: int, payload: bytes) -> bytes:
    if kind == CONTINUATION:
        return payload
    payload = _unpadded(flags, payload)
    return payload[5:] if flags & PRIORITY else payload
