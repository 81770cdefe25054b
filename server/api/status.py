"""StatusService: availability and the model catalog."""

from __future__ import annotations

import grpc

from aigne.hub.v1 import status_service_pb2 as status_pb
from aigne.hub.v1 import status_service_pb2_grpc as status_grpc
from server.accounts.credentials import CredentialVault
from server.api.calls import unary
from server.api.credential_deployments import deployment_names
from server.errors import GatewayError
from server.routing.attempts import Routing
from server.routing.router import Router


class StatusServicer(status_grpc.StatusServiceServicer):
    def __init__(
        self,
        router: Router,
        is_serving: ServingFlag,
        routing: Routing | None = None,
        vault: CredentialVault | None = None,
    ) -> None:
        self._router = router
        self._is_serving = is_serving
        self._routing = routing
        # Stored provider credentials: each active one is a deployment of its provider.
        self._vault = vault

    @unary
    async def GetStatus(
        self,
        request: status_pb.GetStatusRequest,
        context: grpc.aio.ServicerContext[status_pb.GetStatusRequest, status_pb.GetStatusResponse],
    ) -> status_pb.GetStatusResponse:
        if not self._is_serving.serving:
            return status_pb.GetStatusResponse(
                available=False, error="the gateway is shutting down", code="SHUTTING_DOWN"
            )
        if request.model:
            try:
                deployments = self._router.deployments(request.model)
            except GatewayError as exc:
                return status_pb.GetStatusResponse(available=False, error=exc.message, code=exc.reason)
            names = await deployment_names(deployments, self._router.providers, self._vault)
            resting = await self._routing.cooldowns.resting(names) if self._routing else {}
            shown = [_resting(name, seconds) for name, seconds in sorted(resting.items())]
            if names and len(resting) == len(names):
                back = min(resting.values())
                return status_pb.GetStatusResponse(
                    available=False,
                    error=f"every deployment of {request.model} is resting after repeated failures; "
                    f"back in {back:.0f} s",
                    code="UPSTREAM_UNAVAILABLE",
                    resting=shown,
                )
            return status_pb.GetStatusResponse(available=True, resting=shown)
        return status_pb.GetStatusResponse(available=True)

    @unary
    async def ListModels(
        self,
        request: status_pb.ListModelsRequest,
        context: grpc.aio.ServicerContext[status_pb.ListModelsRequest, status_pb.ListModelsResponse],
    ) -> status_pb.ListModelsResponse:
        models = [
            status_pb.Model(
                id=entry.id,
                object="model",
                owned_by=entry.owned_by,
                capabilities=sorted(c.value for c in entry.capabilities),
                alias_of=entry.alias_of,
            )
            for entry in self._router.catalog()
        ]
        return status_pb.ListModelsResponse(object="list", data=models)


def _resting(name: str, seconds: float) -> status_pb.RestingDeployment:
    """A cooldown's name (`provider/model`, `@<credential id>` for a stored credential) as shown."""
    deployment, _, credential_id = name.partition("@")
    return status_pb.RestingDeployment(deployment=deployment, credential_id=credential_id, seconds_left=seconds)


class ServingFlag:
    """Whether the server still takes calls; cleared when shutdown begins."""

    def __init__(self) -> None:
        self.serving = True
