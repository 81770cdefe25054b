"""Provider credentials stored through the admin API, as deployments of their provider.

Each active stored credential of a provider is a deployment of every `provider/*`
call: a target `provider/model` of a plan becomes one target per credential
(`provider/model@<credential id>`), the target's weight shared equally among them. So
the router's balancing (weighted random by default: today's rotation is the case of
equal weights), cooldowns (a 429 on one key rests that key's deployment, not the
provider), retries (a retry goes to another credential first) and served-by reporting
(`x-aigne-hub-credential: <credential id>`, never the secret) apply per credential.

A provider without active stored credentials keeps its one target, using the key it
was configured with. Only adapters that take a per-call credential (a
`credential_header`) are expanded. Which credentials are active is the vault's cached
view (`CredentialVault.active`, refreshed every few seconds): a credential a probe
confirmed invalid (server.accounts.credential_checks) is no deployment until it is
reactivated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TypeVar

from server.accounts.credentials import Credential, CredentialVault
from server.routing.router import ModelGroup, Plan, Target

T = TypeVar("T")


async def with_credentials(plan: Plan[T], vault: CredentialVault | None) -> tuple[Plan[T], dict[str, Credential]]:
    """`plan` with each target of a provider that has active stored credentials
    replaced by one target per credential, and those credentials by id."""
    if vault is None:
        return plan, {}
    expander = _Expander(vault)
    expanded = replace(
        plan,
        primary=await expander.group(plan.primary),
        fallbacks=[await expander.group(g) for g in plan.fallbacks],
        context_window_fallbacks=[await expander.group(g) for g in plan.context_window_fallbacks],
        content_policy_fallbacks=[await expander.group(g) for g in plan.content_policy_fallbacks],
    )
    return expanded, expander.credentials


async def deployment_names(
    deployments: list[str], providers: Mapping[str, object], vault: CredentialVault | None
) -> list[str]:
    """The cooldown names of `deployments` (`provider/model`), one per active stored
    credential where the provider has some (for /status)."""
    if vault is None:
        return deployments
    names = []
    for deployment in deployments:
        provider = deployment.partition("/")[0]
        credentials = await vault.active(provider) if _takes_credentials(providers.get(provider)) else []
        names += [f"{deployment}@{c.id}" for c in credentials] or [deployment]
    return names


class _Expander:
    def __init__(self, vault: CredentialVault) -> None:
        self._vault = vault
        self.credentials: dict[str, Credential] = {}

    async def group(self, group: ModelGroup[T]) -> ModelGroup[T]:
        targets: list[Target[T]] = []
        for target in group.targets:
            targets += await self._targets(target)
        return replace(group, targets=targets)

    async def _targets(self, target: Target[T]) -> list[Target[T]]:
        provider = target.route.provider
        if not _takes_credentials(provider):
            return [target]
        active = await self._vault.active(provider.name)
        if not active:
            return [target]
        for credential in active:
            self.credentials[credential.id] = credential
        share = target.weight / len(active)
        return [replace(target, weight=share, credential_id=credential.id) for credential in active]


def _takes_credentials(provider: object) -> bool:
    return getattr(provider, "credential_header", None) is not None
