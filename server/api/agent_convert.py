"""Pure conversions between AIGNE's agent protocol and the gateway's OpenAI-shaped
messages (used by `server.api.agent`).

Decisions:
- Roles: AIGNE's "agent" is OpenAI's "assistant"; "system", "user" and "tool" are the
  same. Content parts: `text` stays text; `url` and `file` (base64 `data` with
  `mimeType`) become `image_url` parts (a data URL for a file), as AIGNE's own OpenAI
  model sends them. `local` parts are refused: a remote gateway cannot read the
  client's disk (the framework converts them to `file` itself before sending).
- Tool-call arguments are objects in AIGNE and JSON strings in OpenAI: serialized on
  the way in, parsed on the way out. Arguments a model wrote that are not a JSON object
  become `{}` (as AIGNE's `safeParseJSON` fallback), and the framework then checks them
  against the tool's schema and retries.
- Structured output: with a `json_schema` response format the model's text is parsed
  and answered as `json` (no `text`); text that is not a JSON object is answered as
  `text`, which the framework reports as not conforming.
- Images are answered inline (`{"type": "file", "data"}`), whatever `outputFileType`
  asks: the gateway stores no files to serve URLs for (AIGNE Hub uploads them to its
  media store), and the client converts a file to what its caller wants.
- `reasoningEffort` as a number (a token budget) maps onto levels as AIGNE's OpenAI
  model does (>5000 high, >1000 medium, >500 low, >0 minimal).
- Options this gateway has no use for (`cacheConfig`, `modalities`, `userContext`,
  `memories`) are ignored, as AIGNE Hub ignores them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format, struct_pb2

from aigne.hub.v1 import agent_service_pb2 as agent_pb
from aigne.hub.v1 import chat_service_pb2 as chat_pb
from aigne.hub.v1 import image_service_pb2 as image_pb
from server.api.convert import whole_numbers_to_int
from server.errors import InvalidRequest

ROLES = {"system": "system", "user": "user", "agent": "assistant", "tool": "tool"}
TOOL_CHOICE_MODES = frozenset({"auto", "none", "required"})
IMAGE_OPTIONS = ("size", "quality", "style", "background", "output_format")


def chat_request(agent_input: agent_pb.ChatModelInput) -> chat_pb.CreateChatCompletionRequest:
    """The ChatService request for an AIGNE chat model input."""
    options = agent_input.model_options
    if not options.model:
        raise InvalidRequest("input.modelOptions.model is required (e.g. openai/gpt-4o-mini)", field="model")
    request = chat_pb.CreateChatCompletionRequest(model=options.model)
    for index, message in enumerate(agent_input.messages):
        request.messages.append(_chat_message(message, f"input.messages[{index}]"))
    request.tools.extend(agent_input.tools)
    if agent_input.HasField("tool_choice"):
        request.tool_choice.CopyFrom(_tool_choice(agent_input.tool_choice))
    if agent_input.HasField("response_format") and agent_input.response_format.type != "text":
        request.response_format.CopyFrom(agent_input.response_format)
    _copy_sampling(options, request, has_tools=bool(agent_input.tools))
    return request


def _chat_message(message: agent_pb.AgentMessage, where: str) -> chat_pb.ChatMessage:
    role = ROLES.get(message.role)
    if role is None:
        raise InvalidRequest(
            f"{where}.role must be system, user, agent or tool, got {message.role[:64]!r}", field=f"{where}.role"
        )
    converted = chat_pb.ChatMessage(role=role, name=message.name, tool_call_id=message.tool_call_id)
    if message.HasField("content"):
        converted.content.CopyFrom(_content(message.content, f"{where}.content"))
    elif role != "assistant":
        converted.content.string_value = ""
    for call in message.tool_calls:
        # Struct numbers are doubles: `{"count": 2}` must not reach the model as 2.0.
        arguments = whole_numbers_to_int(json_format.MessageToDict(call.function.arguments))
        converted.tool_calls.append(
            chat_pb.ToolCall(
                id=call.id,
                type=call.type or "function",
                function=chat_pb.FunctionCall(name=call.function.name, arguments=json.dumps(arguments)),
            )
        )
    return converted


def _content(content: struct_pb2.Value, where: str) -> struct_pb2.Value:
    kind = content.WhichOneof("kind")
    if kind != "list_value":
        return content
    items = content.list_value.values
    parts = [_content_part(json_format.MessageToDict(item), f"{where}[{i}]") for i, item in enumerate(items)]
    converted = struct_pb2.Value()
    converted.list_value.extend([_struct(part) for part in parts])
    return converted


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(data)
    return struct


def _content_part(part: Any, where: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise InvalidRequest(f"{where} must be an object with a type", field=where)
    kind = part.get("type")
    if kind == "text":
        return {"type": "text", "text": str(part.get("text", ""))}
    if kind == "url":
        return {"type": "image_url", "image_url": {"url": str(part.get("url", ""))}}
    if kind == "file":
        mime = part.get("mimeType") or "image/png"
        return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{part.get('data', '')}"}}
    raise InvalidRequest(
        f"{where}.type must be text, url or file (a local path cannot be read by a remote hub), got {str(kind)[:64]!r}",
        field=f"{where}.type",
    )


def _tool_choice(choice: struct_pb2.Value) -> struct_pb2.Value:
    if choice.WhichOneof("kind") == "string_value" and choice.string_value in TOOL_CHOICE_MODES:
        return choice
    if choice.WhichOneof("kind") == "struct_value":
        name = json_format.MessageToDict(choice.struct_value).get("function", {}).get("name")
        if isinstance(name, str) and name:
            converted = struct_pb2.Value()
            converted.struct_value.update({"type": "function", "function": {"name": name}})
            return converted
    raise InvalidRequest(
        "input.toolChoice must be auto, none, required or a tool with function.name", field="input.toolChoice"
    )


def _copy_sampling(
    options: agent_pb.ChatModelOptions, request: chat_pb.CreateChatCompletionRequest, *, has_tools: bool
) -> None:
    for name in ("temperature", "top_p", "frequency_penalty", "presence_penalty"):
        if options.HasField(name):
            setattr(request, name, getattr(options, name))
    if has_tools and options.HasField("parallel_tool_calls"):
        request.parallel_tool_calls = options.parallel_tool_calls
    effort = _reasoning_effort(options.reasoning_effort) if options.HasField("reasoning_effort") else None
    if effort:
        request.reasoning_effort = effort


def _reasoning_effort(value: struct_pb2.Value) -> str | None:
    if value.WhichOneof("kind") == "string_value":
        return value.string_value
    if value.WhichOneof("kind") != "number_value":
        return None
    budget = value.number_value
    for floor, level in ((5000, "high"), (1000, "medium"), (500, "low"), (0, "minimal")):
        if budget > floor:
            return level
    return None


def wants_json(agent_input: agent_pb.ChatModelInput) -> bool:
    return agent_input.response_format.type == "json_schema"


def chat_output(answer: chat_pb.CreateChatCompletionResponse, *, structured: bool) -> agent_pb.InvokeChatModelResponse:
    """The AIGNE output of a complete chat answer (its first choice)."""
    output = agent_pb.InvokeChatModelResponse(model=answer.model, usage=_usage(answer.usage))
    if answer.choices:
        message = answer.choices[0].message
        _set_text(output, message.content if message.HasField("content") else "", structured=structured)
        if message.HasField("reasoning_content") and message.reasoning_content:
            output.thoughts = message.reasoning_content
        for call in message.tool_calls:
            output.tool_calls.append(_agent_tool_call(call.id, call.function.name, call.function.arguments))
    return output


def _set_text(output: agent_pb.InvokeChatModelResponse, text: str, *, structured: bool) -> None:
    parsed = _json_object(text) if structured else None
    if parsed is not None:
        output.json.update(parsed)
    elif text:
        output.text = text


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _agent_tool_call(call_id: str, name: str, arguments: str) -> agent_pb.AgentToolCall:
    call = agent_pb.AgentToolCall(id=call_id, type="function", function=agent_pb.AgentFunctionCall(name=name))
    call.function.arguments.update(_json_object(arguments) or {})
    return call


def _usage(usage: Any) -> agent_pb.AgentUsage:
    return agent_pb.AgentUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens)


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class StreamState:
    """What a streamed answer has produced so far: text is passed on at once; tool
    calls, structured output, usage and the model are collected for the last event."""

    structured: bool
    model: str = ""
    json_text: list[str] = field(default_factory=list)
    calls: dict[int, _PartialCall] = field(default_factory=dict)
    usage: agent_pb.AgentUsage | None = None

    def take(self, chunk: chat_pb.StreamChatCompletionResponse) -> agent_pb.StreamChatModelResponse | None:
        """The text event for `chunk`, if it carries text to pass on now."""
        self.model = chunk.model or self.model
        if chunk.HasField("usage"):
            self.usage = _usage(chunk.usage)
        text = agent_pb.ChatModelTextDelta()
        for choice in chunk.choices[:1]:
            delta = choice.delta
            for piece in delta.tool_calls:
                self._add_call_piece(piece)
            if delta.HasField("reasoning_content") and delta.reasoning_content:
                text.thoughts = delta.reasoning_content
            if delta.HasField("content") and delta.content:
                if self.structured:
                    self.json_text.append(delta.content)
                else:
                    text.text = delta.content
        if not (text.HasField("text") or text.HasField("thoughts")):
            return None
        return agent_pb.StreamChatModelResponse(delta=agent_pb.ChatModelDelta(text=text))

    def _add_call_piece(self, piece: chat_pb.ToolCallDelta) -> None:
        call = self.calls.setdefault(piece.index, _PartialCall())
        if piece.HasField("id"):
            call.id = piece.id
        if piece.function.HasField("name"):
            call.name += piece.function.name
        if piece.function.HasField("arguments"):
            call.arguments.append(piece.function.arguments)

    def last_event(self) -> agent_pb.StreamChatModelResponse:
        """The event that sets tool calls, structured output, usage and model."""
        output = agent_pb.InvokeChatModelResponse(model=self.model)
        if self.usage is not None:
            output.usage.CopyFrom(self.usage)
        if self.json_text:
            _set_text(output, "".join(self.json_text), structured=True)
        for index in sorted(self.calls):
            call = self.calls[index]
            output.tool_calls.append(_agent_tool_call(call.id, call.name, "".join(call.arguments)))
        return agent_pb.StreamChatModelResponse(delta=agent_pb.ChatModelDelta(json=output))


def image_request(agent_input: agent_pb.ImageModelInput) -> image_pb.CreateImageRequest:
    """The ImageService request for an AIGNE image model input; input fields win over
    the same options in `modelOptions`. Images are asked for inline (b64_json): the
    gateway keeps no files to link to, and providers' URLs expire within hours."""
    options = agent_input.model_options
    if not options.model:
        raise InvalidRequest("input.modelOptions.model is required (e.g. openai/dall-e-3)", field="model")
    if agent_input.image:
        raise InvalidRequest("input.image: image editing is not offered by this gateway", field="input.image")
    request = image_pb.CreateImageRequest(prompt=agent_input.prompt, model=options.model)
    if not options.model.partition("/")[2].startswith("gpt-image"):  # those answer base64 and take no format
        request.response_format = "b64_json"
    for name in IMAGE_OPTIONS:
        value = getattr(agent_input, name) or getattr(options, name)
        if value:
            setattr(request, name, value)
    if agent_input.HasField("n"):
        request.n = agent_input.n
    elif options.HasField("n"):
        request.n = options.n
    return request


def image_output(answer: image_pb.CreateImageResponse, model: str) -> agent_pb.InvokeImageModelResponse:
    """The AIGNE output of an image answer: URLs as `url` files, base64 as `file` data."""
    output = agent_pb.InvokeImageModelResponse(model=model, usage=_usage_of_image(answer))
    for image in answer.data:
        if image.HasField("url"):
            output.images.append(agent_pb.AgentFile(type="url", url=image.url, mime_type="image/png"))
        elif image.HasField("b64_json"):
            output.images.append(agent_pb.AgentFile(type="file", data=image.b64_json, mime_type="image/png"))
    return output


def _usage_of_image(answer: image_pb.CreateImageResponse) -> agent_pb.AgentUsage:
    if not answer.HasField("usage"):
        return agent_pb.AgentUsage()
    return _usage(answer.usage)
