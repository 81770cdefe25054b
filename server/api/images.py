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
        plan, options = self._plan(image_model(request), Capability.IMAGES, ImageGeneration, context)
        body = to_json(request)
        body.pop("model", None)
        images = request.n if request.HasField("n") else 1
        async with self._routed(plan, options, context, "image", Usage(images=images)) as call:
            served = await call.unary(lambda adapter, model, attempt: adapter.create_image(dict(body), model, attempt))
            answer = served.result
            provider = served.target.route.provider.name
            response, usage = image_answer_from_openai(answer, provider=provider)
            call.meter.usage = replace(usage_from_openai(usage), images=len(response.data))
        return response
