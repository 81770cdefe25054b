"""Per-call provider credentials from the vault, applied where every adapter's request
passes: the shared httpx client's request hook.

The servicer picks a credential for the call (`use_credential`); the hook puts it in
the header the adapter's API expects (`credential_header` on the adapter class), over
the key the adapter was configured with. A contextvar carries it: the adapter's HTTP
request runs in the servicer's task.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass

import httpx


@dataclass(frozen=True, slots=True)
class CallCredential:
    header: str
    value: str


_CURRENT: ContextVar[CallCredential | None] = ContextVar("aigne_hub_call_credential", default=None)


def use_credential(header: tuple[str, str], secret: str) -> Token[CallCredential | None]:
    name, prefix = header
    return _CURRENT.set(CallCredential(name, prefix + secret))


def clear_credential(token: Token[CallCredential | None]) -> None:
    _CURRENT.reset(token)


async def apply_call_credential(request: httpx.Request) -> None:
    """httpx request hook: the call's credential, if one was chosen, replaces the
    configured one."""
    credential = _CURRENT.get()
    if credential is not None:
        request.headers[credential.header] = credential.value
