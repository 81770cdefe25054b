"""ImageService."""

from __future__ import annotations

from dataclasses import replace

import grpc

from aigne.hub.v1 import image_service_pb2 as image_pb
from aigne.hub.v1 import image_service_pb2_grpc as image_grpc
from server.accounts.credits import Usage
from server.api.calls import MeteredServicer, unary
from server.api.convert import image_answer_from_openai, image_model, to_json
from server.api.metering import usage_from_openai
from server.errors import InvalidRequest
from server.providers.base import Capability, ImageGeneration

RESPONSE_FORMATS = frozenset({"", "url", "b64_json"})


class ImageServicer(MeteredServicer, image_grpc.ImageServiceServicer):
    @unary
    async def CreateImage(
        self,
        request: image_pb.CreateImageRequest,
        context: grpc.aio.ServicerContext[image_pb.CreateImageRequest, image_pb.CreateImageResponse],
    ) -> image_pb.CreateImageResponse:
        if not request.prompt.strip():
            raise InvalidRequest("prompt is required", field="prompt")
        if request.response_format not in RESPONSE_FORMATS:
            raise InvalidRequest(
                f"response_format must be url or b64_json, got {request.response_format[:64]!r}",
                field="response_format",
            )
        route, adapter = self._router.resolve(image_model(request), Capability.IMAGES, ImageGeneration)
        body = to_json(request)
        body.pop("model", None)
        images = request.n if request.HasField("n") else 1
        async with self._meter(route, "image", Usage(images=images)) as meter:
            answer = await self._upstream(route, adapter.create_image(body, route.upstream_model))
            response, usage = image_answer_from_openai(answer, provider=route.provider.name)
            meter.usage = replace(usage_from_openai(usage), images=len(response.data))
        return response
