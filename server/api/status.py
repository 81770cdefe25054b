"""StatusService: availability and the model catalog."""

from __future__ import annotations

import grpc

from aigne.hub.v1 import status_service_pb2 as status_pb
from aigne.hub.v1 import status_service_pb2_grpc as status_grpc
from server.api.calls import unary
from server.errors import GatewayError
from server.routing.attempts import Routing
from server.routing.router import Router


class StatusServicer(status_grpc.StatusServiceServicer):
    def __init__(self, router: Router, is_serving: ServingFlag, routing: Routing | None = None) -> None:
        self._router = router
        self._is_serving = is_serving
        self._routing = routing

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
            resting = await self._routing.cooldowns.resting(deployments) if self._routing else {}
            if deployments and len(resting) == len(deployments):
                back = min(resting.values())
                return status_pb.GetStatusResponse(
                    available=False,
                    error=f"every deployment of {request.model} is resting after repeated failures; "
                    f"back in {back:.0f} s",
                    code="UPSTREAM_UNAVAILABLE",
                )
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


class ServingFlag:
    """Whether the server still takes calls; cleared when shutdown begins."""

    def __init__(self) -> None:
        self.serving = True
