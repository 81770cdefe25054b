"""List pagination as AIP-158 has it: `page_size` and `page_token` in, `next_page_token`
out.

Pages are keyset pages: a token holds the sort key of the last item sent (for example
the key's creation time and id), so items added or removed between pages neither
repeat nor push others out, and each page costs one indexed query whatever its depth.
A token also holds the request's filter: used with another filter it is refused, as
AIP-158 asks. Tokens are opaque to clients (base64url of a small JSON document) and
carry nothing secret; a token that does not decode is INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from server.errors import InvalidRequest

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
Cursor = tuple[str | datetime, ...]


@dataclass(frozen=True, slots=True)
class PageRequest:
    """What a list request asks for: how many items, after which sort key."""

    size: int
    after: Cursor | None
    filter: str

    def next_token(self, cursors: list[Cursor]) -> str:
        """The next page's token given the sort keys of this page's items, fetched one
        past `size` to learn whether there is a next page; empty on the last page."""
        if len(cursors) <= self.size:
            return ""
        return _encode(cursors[self.size - 1], self.filter)


def page_request(page_size: int, page_token: str, shape: tuple[type, ...], filter_: str = "") -> PageRequest:
    """The page a request asks for, whose sort key has the types of `shape`;
    INVALID_ARGUMENT for a negative size or a token that is malformed, of another
    list, or was issued for another filter."""
    if page_size < 0:
        raise InvalidRequest(f"page_size must not be negative, got {page_size}", field="page_size")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    after = _decode(page_token, shape, filter_) if page_token else None
    return PageRequest(size, after, filter_)


def _encode(cursor: Cursor, filter_: str) -> str:
    values = [{"t": value.isoformat()} if isinstance(value, datetime) else value for value in cursor]
    document = json.dumps({"after": values, "filter": filter_}, separators=(",", ":"))
    return base64.urlsafe_b64encode(document.encode()).decode().rstrip("=")


def _decode(token: str, shape: tuple[type, ...], filter_: str) -> Cursor:
    try:
        document = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        values: list[Any] = document["after"]
        cursor = tuple(datetime.fromisoformat(v["t"]) if isinstance(v, dict) else v for v in values)
        same_filter = document["filter"] == filter_
    except (binascii.Error, ValueError, KeyError, TypeError, AttributeError):
        cursor, same_filter = (), True
    if tuple(type(value) for value in cursor) != shape:
        raise InvalidRequest("page_token is not a token this list returned", field="page_token")
    if not same_filter:
        raise InvalidRequest(
            "page_token was returned for a request with other filters; send the same filters", field="page_token"
        )
    return cursor
