"""Per-call provider credentials from the vault, applied where every adapter's request
passes: the shared httpx client's request hook.

The servicer picks a credential for the call (`use_credential`); the hook puts it in
the header the adapter's API expects (`credential_header` on the adapter class), over
the key the adapter was configured with. A contextvar carries it: the adapter's HTTP
request runs in the servicer's task.

`probe` checks one secret with a cheap authenticated request (each adapter's
`probe_credential` names its model-list endpoint and how it reads errors): the
gateway confirms a provider's "invalid key" answer with it before taking a stored
credential out of rotation, and re-checks invalid credentials with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass

import httpx

from server import errors
from server.providers.http_errors import transport_error


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


async def probe(
    client: httpx.AsyncClient,
    url: str,
    *,
    provider: str,
    headers: Mapping[str, str],
    credential_header: tuple[str, str],
    secret: str,
    error_of: Callable[[httpx.Response], errors.UpstreamError],
) -> None:
    """GETs `url` with `secret` as the call's credential. Returns if the provider
    accepts it; raises `error_of(response)` for an error status (an
    `UpstreamCredentialRejected` when the key is invalid) or the transport error."""
    token = use_credential(credential_header, secret)
    try:
        response = await client.get(url, headers=headers)
    except httpx.HTTPError as exc:
        raise transport_error(provider, exc) from exc
    finally:
        clear_credential(token)
    if response.status_code >= 400:
        raise error_of(response)
