"""Deciding when a stored provider credential is invalid, and when it is valid again.

A provider's "invalid key" answer (`UpstreamCredentialRejected`: a 401, or e.g.
Gemini's 400 API_KEY_INVALID) takes the call's credential out of rotation only after a
probe, the provider's cheapest authenticated request (its model list) sent with that
credential, is rejected too. A 403 is a refused permission (often for one model) and
never reaches here. The probe runs before the failed call's answer is sent, so the
next call already goes to another credential; concurrent rejections of one credential
share one probe. A probe that cannot tell (timeout, 5xx, network) leaves the
credential active: a bad key will be rejected again, a good one must not be lost to
an outage.

Invalid credentials are re-probed every `recheck_interval_s`
(AIGNE_HUB_CREDENTIAL_RECHECK_S, default 300 s) and put back into rotation when the
provider accepts them again (a key whose account was topped up, or that was restored).

Probes come from the adapters (`probe_credential`), passed in as plain callables so
that this layer does not depend on the providers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from enum import Enum

from server.accounts.credentials import CredentialVault, MasterKeyError
from server.errors import UpstreamCredentialRejected, UpstreamError

log = logging.getLogger(__name__)

# Sends the provider's cheapest authenticated request with this secret; raises
# UpstreamCredentialRejected if the provider says the key is invalid.
Probe = Callable[[str], Awaitable[None]]


class Verdict(Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    UNKNOWN = "unknown"


class CredentialChecker:
    """Confirms rejections with a probe; re-checks invalid credentials periodically."""

    def __init__(
        self,
        vault: CredentialVault,
        probes: Mapping[str, Probe],
        *,
        recheck_interval_s: float,
        probe_timeout_s: float = 10.0,
    ) -> None:
        self._vault = vault
        self._probes = dict(probes)
        self._interval = recheck_interval_s
        self._probe_timeout = probe_timeout_s
        self._confirming: dict[str, asyncio.Task[bool]] = {}
        self._loop_task: asyncio.Task[None] | None = None

    async def confirm_rejection(self, provider: str, credential_id: str, error: UpstreamError) -> bool:
        """Probes the credential a call was rejected with; marks it invalid if the probe
        is rejected too. Whether it was marked."""
        task = self._confirming.get(credential_id)
        if task is None:
            task = asyncio.create_task(self._confirm(provider, credential_id, error))
            self._confirming[credential_id] = task
            task.add_done_callback(lambda _: self._confirming.pop(credential_id, None))
        return await asyncio.shield(task)

    async def recheck_invalid(self) -> list[str]:
        """One pass over the invalid credentials: the ids of those reactivated."""
        reactivated = []
        for info in await self._vault.list_credentials():
            if info.status != "invalid" or info.provider not in self._probes:
                continue
            verdict, _ = await self._probe(info.provider, info.id)
            if verdict is Verdict.ACCEPTED:
                await self._vault.mark_active(info.id)
                reactivated.append(info.id)
        return reactivated

    def start(self) -> None:
        """Starts the periodic re-check in the background (in one process per `serve`:
        the credentials' status is in the shared database)."""
        if self._loop_task is None:
            log.info("re-checking invalid provider credentials every %g s in this process", self._interval)
            self._loop_task = asyncio.create_task(self._recheck_forever(), name="aigne-hub credential re-check")

    async def stop(self) -> None:
        tasks = [t for t in (self._loop_task, *self._confirming.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._loop_task = None

    async def _confirm(self, provider: str, credential_id: str, error: UpstreamError) -> bool:
        # Runs inside the failed call's exit: whatever goes wrong here must not replace
        # the call's own error or keep it from being recorded.
        try:
            return await self._confirm_or_raise(provider, credential_id, error)
        except Exception as exc:  # noqa: BLE001 - e.g. the database is down; the next rejection retries
            log.warning("could not confirm %s's rejection of credential %s: %s", provider, credential_id, exc)
            return False

    async def _confirm_or_raise(self, provider: str, credential_id: str, error: UpstreamError) -> bool:
        try:
            if (await self._vault.info(credential_id)).status == "invalid":
                return False  # another call confirmed it already
        except KeyError:
            return False  # removed meanwhile
        verdict, detail = await self._probe(provider, credential_id)
        if verdict is Verdict.REJECTED:
            await self._vault.mark_invalid(credential_id, error.message)
            return True
        log.warning(
            "%s rejected credential %s (%s), but a probe %s: it stays in rotation",
            provider, credential_id, error.message, detail,
        )  # fmt: skip
        return False

    async def _probe(self, provider: str, credential_id: str) -> tuple[Verdict, str]:
        """The provider's verdict on the stored credential, and what the probe saw."""
        probe = self._probes.get(provider)
        if probe is None:
            return Verdict.UNKNOWN, "cannot be sent (the provider is not configured here)"
        try:
            credential = await self._vault.reveal(credential_id)
            async with asyncio.timeout(self._probe_timeout):
                await probe(credential.secret)
        except UpstreamCredentialRejected as exc:
            return Verdict.REJECTED, f"was rejected too ({exc.message})"
        except UpstreamError as exc:
            return Verdict.UNKNOWN, f"could not tell ({exc.message})"
        except TimeoutError:
            return Verdict.UNKNOWN, f"got no answer within {self._probe_timeout:g} s"
        except (KeyError, MasterKeyError) as exc:
            return Verdict.UNKNOWN, f"could not read the credential ({type(exc).__name__})"
        return Verdict.ACCEPTED, "was accepted"

    async def _recheck_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.recheck_invalid()
            except Exception as exc:  # noqa: BLE001 - e.g. the database is down: try again next round
                log.warning("re-checking invalid provider credentials failed: %s", type(exc).__name__)
