"""AgentService: AIGNE Hub's own agent protocol (what `@aigne/aigne-hub` and the `aigne`
CLI speak) on top of the OpenAI-shaped services.

Decisions:
- A chat or image call is converted (`server.api.agent_convert`) and handed, in
  process, to the ChatServicer / ImageServicer method that serves the same call over
  the OpenAI protocol, with this call's context. So keys, allow-lists, limits, the
  ledger, credits and routing apply unchanged, a call leaves exactly one ledger record
  whichever protocol it came in, and a failure there ends this call with the same
  status (the REST bridge gives it AIGNE Hub's error shape: `{"error": {"message",
  "type"}}`, out of credits as 402 `NOT_ENOUGH`; see envoy/openai_bridge.lua). A
  request refused here, before the conversion finished, is recorded like a refusal
  there (operation "chat"/"chat_stream"/"image").
- A stream asks the chat stream for usage, passes text on as it comes, and sends tool
  calls, structured output, usage and model in one last `delta.json` event (AIGNE's
  client merges `delta.json` with Object.assign, so a partial tool call list would be
  replaced, not extended). No `[DONE]` sentinel: the client parses every data line as
  JSON. A failure after the first event is a last event with `error` for REST callers
  (the bridge sends it as `event: error`), the call's status for gRPC callers.
- Discovery answers AIGNE Hub's component DID mounted at `/`, so the client's paths
  (`/api/v2/chat`, `/api/ai/models`) are at the root. It and the model list need no key.
- The model list is the catalog (ListModels') without its aliases (AIGNE clients build
  `provider/model` from each entry) in AIGNE Hub's shape: one entry per type
  the model serves ("chat", "image", "embedding"), credits per token from the
  configured rates as decimal strings (the client's schema wants strings), as a bare
  JSON array in an HttpBody (the transcoder cannot print an array from a message).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from decimal import Decimal
from typing import Any

import grpc
from google.api import httpbody_pb2
from google.protobuf import json_format

from aigne.hub.v1 import agent_service_pb2 as agent_pb
from aigne.hub.v1 import agent_service_pb2_grpc as agent_grpc
from server import errors
from server.accounts.service import Accounts
from server.api import agent_convert
from server.api.auth import CURRENT_KEY
from server.api.calls import MeteredServicer, abort_for, unary
from server.api.chat import DONE_SENTINEL_ID, ChatServicer
from server.api.images import ImageServicer
from server.api.validation import check_request
from server.providers.base import JSON, Capability
from server.routing.router import CatalogModel, Router

# AIGNE Hub's blocklet DID: the client looks its mount point up by it.
AIGNE_HUB_DID = "z8ia3xzq2tMq8CRHfaXj1BTYJyYnEcHbqP8cJ"
MODEL_TYPES = {Capability.CHAT: "chat", Capability.IMAGES: "image", Capability.EMBEDDINGS: "embedding"}
KNOWN_TYPES = frozenset({*MODEL_TYPES.values(), "video"})
FEATURES = {Capability.TOOLS: "tools", Capability.VISION: "vision"}
DISPLAY_NAMES = {
    "openai": "OpenAI",
    "anthropic": "Anthropic",
    "gemini": "Google Gemini",
    "mistral": "Mistral AI",
    "ollama": "Ollama",
    "deepseek": "DeepSeek",
    "xai": "xAI",
    "openrouter": "OpenRouter",
}
# Rates are micro-credits per million tokens.
MICROS_PER_CREDIT_PER_TOKEN = Decimal(10**12)
# The ledger's operation of each method, for calls refused before they reached the
# OpenAI-shaped servicer.
OPERATIONS = {"InvokeChatModel": "chat", "StreamChatModel": "chat_stream", "InvokeImageModel": "image"}


class AgentServicer(MeteredServicer, agent_grpc.AgentServiceServicer):
    def __init__(self, router: Router, accounts: Accounts, chat: ChatServicer, images: ImageServicer) -> None:
        super().__init__(router, accounts)
        self._chat = chat
        self._images = images

    @unary
    async def GetBlockletInfo(
        self,
        request: agent_pb.GetBlockletInfoRequest,
        context: grpc.aio.ServicerContext[agent_pb.GetBlockletInfoRequest, agent_pb.GetBlockletInfoResponse],
    ) -> agent_pb.GetBlockletInfoResponse:
        if request.type not in ("", "json"):
            raise errors.InvalidRequest(f"type must be json, got {request.type[:64]!r}", field="type")
        hub = agent_pb.ComponentMountPoint(did=AIGNE_HUB_DID, name="ai-kit", title="AIGNE Hub", mount_point="/")
        return agent_pb.GetBlockletInfoResponse(app_name="AIGNE Hub gateway", component_mount_points=[hub])

    @unary
    async def ListAgentModels(
        self,
        request: agent_pb.ListAgentModelsRequest,
        context: grpc.aio.ServicerContext[agent_pb.ListAgentModelsRequest, httpbody_pb2.HttpBody],
    ) -> httpbody_pb2.HttpBody:
        if request.type and request.type not in KNOWN_TYPES:
            raise errors.InvalidRequest(
                f"type must be one of {', '.join(sorted(KNOWN_TYPES))}, got {request.type[:64]!r}", field="type"
            )
        models: list[JSON] = []
        for entry in self._router.catalog():
            if entry.alias_of:
                continue  # AIGNE clients address models as provider/model, never by alias
            for capability, kind in MODEL_TYPES.items():
                if capability in entry.capabilities and request.type in ("", kind):
                    models.append(json_format.MessageToDict(await self._agent_model(entry, kind)))
        return httpbody_pb2.HttpBody(content_type="application/json", data=json.dumps(models).encode())

    async def _agent_model(self, entry: CatalogModel, kind: str) -> agent_pb.AgentModel:
        rate = await self._accounts.credits.rate_for(entry.id)
        features = sorted(name for capability, name in FEATURES.items() if capability in entry.capabilities)
        return agent_pb.AgentModel(
            key=entry.id,
            model=entry.id.partition("/")[2],
            type=kind,
            provider=entry.owned_by,
            input_credits_per_token=_per_token(rate.input_per_million_micros if rate else 0),
            output_credits_per_token=_per_token(rate.output_per_million_micros if rate else 0),
            provider_display_name=DISPLAY_NAMES.get(entry.owned_by, entry.owned_by),
            model_metadata=agent_pb.AgentModelMetadata(features=features),
            status=agent_pb.AgentModelStatus(available=True),
        )

    @unary
    async def InvokeChatModel(
        self,
        request: agent_pb.InvokeChatModelRequest,
        context: grpc.aio.ServicerContext[agent_pb.InvokeChatModelRequest, agent_pb.InvokeChatModelResponse],
    ) -> agent_pb.InvokeChatModelResponse:
        chat_request = agent_convert.chat_request(request.input)
        answer = await self._chat.CreateChatCompletion(chat_request, context)
        return agent_convert.chat_output(answer, structured=agent_convert.wants_json(request.input))

    async def StreamChatModel(
        self,
        request: agent_pb.InvokeChatModelRequest,
        context: grpc.aio.ServicerContext[agent_pb.InvokeChatModelRequest, agent_pb.StreamChatModelResponse],
    ) -> AsyncIterator[agent_pb.StreamChatModelResponse]:
        try:
            check_request(request)
            chat_request = agent_convert.chat_request(request.input)
        except Exception as exc:  # noqa: BLE001 - every failure must reach the client
            await self.record_refusal("StreamChatModel", request, exc)
            await abort_for(context, exc)
            return
        chat_request.stream = True
        chat_request.stream_options.include_usage = True
        state = agent_convert.StreamState(structured=agent_convert.wants_json(request.input))
        # Failures of the chat stream end this call through `context` (before the first
        # chunk, and for gRPC callers) or arrive as an error chunk (REST, after it).
        # Closed at once however this call ends (a client that hangs up included), so the
        # chat stream records the call as it would its own.
        async with aclosing(self._chat.StreamChatCompletion(chat_request, context)) as chunks:
            async for chunk in chunks:
                if chunk.id == DONE_SENTINEL_ID and not chunk.choices:
                    break
                if chunk.HasField("error"):
                    yield _error_event(chunk.error.message, chunk.error.code)
                    return
                event = state.take(chunk)
                if event is not None:
                    yield event
        yield state.last_event()

    @unary
    async def InvokeImageModel(
        self,
        request: agent_pb.InvokeImageModelRequest,
        context: grpc.aio.ServicerContext[agent_pb.InvokeImageModelRequest, agent_pb.InvokeImageModelResponse],
    ) -> agent_pb.InvokeImageModelResponse:
        if request.options.streaming:
            raise errors.InvalidRequest("image models do not stream: leave options.streaming false", field="streaming")
        image_request = agent_convert.image_request(request.input)
        answer = await self._images.CreateImage(image_request, context)
        return agent_convert.image_output(answer, image_request.model)

    async def record_refusal(self, method: str, request: Any, exc: Exception) -> None:
        """A call refused before it reached the OpenAI-shaped servicer, recorded under
        that servicer's operation and the model the caller asked for."""
        if method not in OPERATIONS or not isinstance(exc, errors.GatewayError) or exc.recorded:
            return
        if isinstance(exc, errors.StorageUnavailable):
            return  # the ledger is in that database: trying would only wait again
        model = request.input.model_options.model if request.HasField("input") else ""
        await self._accounts.record_refusal(CURRENT_KEY.get(), OPERATIONS[method], model, exc)


def _per_token(micros_per_million: int) -> str:
    """Credits per token as a plain decimal string ("0.0000025", never "2.5E-6")."""
    value = (Decimal(micros_per_million) / MICROS_PER_CREDIT_PER_TOKEN).normalize()
    return f"{value:f}"


def _error_event(message: str, reason: str) -> agent_pb.StreamChatModelResponse:
    return agent_pb.StreamChatModelResponse(error=agent_pb.AgentError(message=message, type=agent_type(reason)))


def agent_type(reason: str) -> str:
    """AIGNE Hub's error type for a gateway reason: out of credits is NOT_ENOUGH."""
    return "NOT_ENOUGH" if reason == "INSUFFICIENT_CREDITS" else reason
