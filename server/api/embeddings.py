"""EmbeddingService.

A REST answer carries each vector as OpenAI does, a JSON `embedding` (numbers, or a
base64 string). A gRPC answer also carries it typed in the `vector` oneof (`floats`,
or the base64 decoded to `float32_le` bytes), so that callers need not unbox every
number from a google.protobuf.Value; `embedding` stays filled over gRPC too, for
clients generated before `vector` existed (it is deprecated for gRPC callers and will
stop being filled in v2). The bridge's `x-aigne-bridge` marker tells the two apart.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import grpc

from aigne.hub.v1 import embedding_service_pb2 as embedding_pb
from aigne.hub.v1 import embedding_service_pb2_grpc as embedding_grpc
from server.api.calls import MeteredServicer, from_rest, unary
from server.api.convert import from_json, to_json
from server.api.metering import input_worst_case, usage_from_openai
from server.errors import InvalidRequest, UpstreamMalformedResponse
from server.providers.base import Capability, Embeddings

ENCODING_FORMATS = frozenset({"", "float", "base64"})


class EmbeddingServicer(MeteredServicer, embedding_grpc.EmbeddingServiceServicer):
    @unary
    async def CreateEmbedding(
        self,
        request: embedding_pb.CreateEmbeddingRequest,
        context: grpc.aio.ServicerContext[embedding_pb.CreateEmbeddingRequest, embedding_pb.CreateEmbeddingResponse],
    ) -> embedding_pb.CreateEmbeddingResponse:
        _check(request)
        plan, options = self._plan(request.model, Capability.EMBEDDINGS, Embeddings, context)
        body = to_json(request)
        body.pop("model", None)
        worst = input_worst_case(request.input.ByteSize())
        async with self._routed(plan, options, context, "embedding", worst) as call:
            served = await call.unary(
                lambda adapter, model, attempt: adapter.create_embedding(dict(body), model, attempt)
            )
            answer = served.result
            call.meter.usage = usage_from_openai(answer.get("usage"))
        route = served.target.route
        vectors = None if from_rest(context) else _vectors_of(answer)
        response = from_json(answer, embedding_pb.CreateEmbeddingResponse(), provider=route.provider.name)
        if vectors is not None:
            _set_typed(response, vectors, route.provider.name)
        response.model = route.public_model
        response.object = "list"
        return response


def _check(request: embedding_pb.CreateEmbeddingRequest) -> None:
    kind = request.input.WhichOneof("kind")
    if kind == "string_value":
        if not request.input.string_value:
            raise InvalidRequest("input must not be empty", field="input")
    elif kind == "list_value":
        values = request.input.list_value.values
        if not values:
            raise InvalidRequest("input must not be an empty array", field="input")
        for index, item in enumerate(values):
            item_kind = item.WhichOneof("kind")
            empty = (item_kind == "string_value" and not item.string_value) or (
                item_kind == "list_value" and not item.list_value.values
            )
            if item_kind not in ("string_value", "number_value", "list_value") or empty:
                raise InvalidRequest(
                    f"input[{index}] must be a non-empty string or token array", field=f"input[{index}]"
                )
    else:
        raise InvalidRequest("input is required: a string, an array of strings or token arrays", field="input")
    if request.encoding_format not in ENCODING_FORMATS:
        raise InvalidRequest(
            f"encoding_format must be float or base64, got {request.encoding_format[:64]!r}", field="encoding_format"
        )


def _vectors_of(answer: dict[str, Any]) -> list[Any]:
    """The upstream's vectors (left in `answer`: `embedding` stays filled for gRPC
    clients built before `vector` existed)."""
    data = answer.get("data")
    items = data if isinstance(data, list) else []
    return [item.get("embedding") if isinstance(item, dict) else None for item in items]


def _set_typed(response: embedding_pb.CreateEmbeddingResponse, vectors: list[Any], provider: str) -> None:
    for embedding, vector in zip(response.data, vectors, strict=False):
        if isinstance(vector, str):
            try:
                embedding.float32_le = base64.b64decode(vector, validate=True)
            except binascii.Error:
                raise UpstreamMalformedResponse("the base64 embedding does not decode", provider=provider) from None
        elif isinstance(vector, list):
            if not all(isinstance(number, (int, float)) for number in vector):
                raise UpstreamMalformedResponse("an embedding holds something other than numbers", provider=provider)
            embedding.floats.values.extend(vector)
