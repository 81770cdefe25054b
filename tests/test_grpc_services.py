"""Embeddings, images, audio and status over gRPC; health checking and reflection."""

from __future__ import annotations

import base64
import struct

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from aigne.hub.v1 import audio_service_pb2 as audio_pb
from aigne.hub.v1 import audio_service_pb2_grpc as audio_grpc
from aigne.hub.v1 import embedding_service_pb2 as embedding_pb
from aigne.hub.v1 import embedding_service_pb2_grpc as embedding_grpc
from aigne.hub.v1 import image_service_pb2 as image_pb
from aigne.hub.v1 import image_service_pb2_grpc as image_grpc
from aigne.hub.v1 import status_service_pb2 as status_pb
from aigne.hub.v1 import status_service_pb2_grpc as status_grpc
from server.app import SERVICE_NAMES
from tests.helpers import error_info, value


async def test_embeddings_float_and_base64(channel, fake_openai):
    stub = embedding_grpc.EmbeddingServiceStub(channel)
    floats = await stub.CreateEmbedding(
        embedding_pb.CreateEmbeddingRequest(
            model="openai/text-embedding-3-small", input=value(["a", "b c"]), dimensions=8
        )
    )
    assert floats.object == "list" and floats.model == "openai/text-embedding-3-small"
    assert [d.index for d in floats.data] == [0, 1]
    # gRPC answers carry the vector typed; `embedding` stays filled for older clients.
    assert floats.data[0].WhichOneof("vector") == "floats"
    vector = list(floats.data[0].floats.values)
    assert len(vector) == 8
    boxed = [v.number_value for v in floats.data[0].embedding.list_value.values]
    assert vector == pytest.approx(boxed, rel=1e-6)
    assert fake_openai.requests[-1].json["dimensions"] == 8
    assert floats.usage.prompt_tokens > 0

    packed = await stub.CreateEmbedding(
        embedding_pb.CreateEmbeddingRequest(
            model="openai/text-embedding-3-small", input=value("a"), encoding_format="base64", dimensions=8
        )
    )
    assert packed.data[0].WhichOneof("vector") == "float32_le"
    assert struct.unpack("<8f", packed.data[0].float32_le) == pytest.approx(vector)


@pytest.mark.parametrize("bad_input", [value(""), value([]), value([""]), value({"x": 1}), None])
async def test_embeddings_reject_bad_input(channel, bad_input):
    stub = embedding_grpc.EmbeddingServiceStub(channel)
    request = embedding_pb.CreateEmbeddingRequest(model="openai/text-embedding-3-small")
    if bad_input is not None:
        request.input.CopyFrom(bad_input)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateEmbedding(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"].startswith("input")


async def test_embeddings_on_a_chat_model_is_unsupported(channel):
    stub = embedding_grpc.EmbeddingServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateEmbedding(embedding_pb.CreateEmbeddingRequest(model="openai/gpt-4o", input=value("x")))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert info.reason == "UNSUPPORTED_FEATURE" and info.metadata["feature"] == "embeddings"


async def test_images_url_and_b64(channel, fake_openai):
    stub = image_grpc.ImageServiceStub(channel)
    urls = await stub.CreateImage(
        image_pb.CreateImageRequest(model="openai/dall-e-2", prompt="a cat", n=2, size="256x256")
    )
    assert len(urls.data) == 2 and all(d.url.startswith("http") for d in urls.data)
    assert urls.created > 0
    assert fake_openai.requests[-1].json == {"model": "dall-e-2", "prompt": "a cat", "n": 2, "size": "256x256"}
    b64 = await stub.CreateImage(
        image_pb.CreateImageRequest(model="openai/gpt-image-1", prompt="a dog", response_format="b64_json")
    )
    assert base64.b64decode(b64.data[0].b64_json)


async def test_speech_returns_typed_audio(channel):
    stub = audio_grpc.AudioServiceStub(channel)
    audio = await stub.CreateSpeech(
        audio_pb.CreateSpeechRequest(model="openai/tts-1", input="hello", voice="alloy", response_format="flac")
    )
    assert audio.content_type == "audio/flac"
    assert len(audio.data) > 0


async def test_speech_rejects_bad_speed(channel):
    stub = audio_grpc.AudioServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateSpeech(audio_pb.CreateSpeechRequest(model="openai/tts-1", input="x", voice="alloy", speed=9))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("response_format", ["json", "verbose_json", "text", "srt", "vtt"])
async def test_transcription_with_typed_bytes(channel, fake_openai, response_format):
    stub = audio_grpc.AudioServiceStub(channel)
    response = await stub.CreateTranscription(
        audio_pb.CreateTranscriptionRequest(
            model="openai/whisper-1",
            file=b"RIFF....WAVEfmt fake audio",
            filename="hello.wav",
            language="en",
            response_format=response_format,
        )
    )
    assert response.text
    sent = fake_openai.requests[-1]
    assert sent.path == "/v1/audio/transcriptions"
    assert b"fake audio" in sent.body and b'filename="hello.wav"' in sent.body
    if response_format == "verbose_json":
        assert response.duration > 0 and response.segments
    if response_format == "srt":
        assert "-->" in response.text


async def test_status_and_models(channel):
    stub = status_grpc.StatusServiceStub(channel)
    assert (await stub.GetStatus(status_pb.GetStatusRequest())).available
    assert (await stub.GetStatus(status_pb.GetStatusRequest(model="openai/gpt-4o"))).available
    missing = await stub.GetStatus(status_pb.GetStatusRequest(model="nosuch/model"))
    assert not missing.available and missing.code == "MODEL_NOT_FOUND" and "nosuch" in missing.error
    unconfigured = await stub.GetStatus(status_pb.GetStatusRequest(model="anthropic/claude-3-5-sonnet"))
    assert not unconfigured.available and unconfigured.code in ("MODEL_NOT_FOUND", "PROVIDER_NOT_CONFIGURED")

    models = await stub.ListModels(status_pb.ListModelsRequest())
    ids = [m.id for m in models.data]
    assert ids == sorted(ids)
    assert "openai/gpt-4o-mini" in ids and "fast" in ids
    by_id = {m.id: m for m in models.data}
    assert "embeddings" in by_id["openai/text-embedding-3-small"].capabilities
    assert "chat" not in by_id["openai/text-embedding-3-small"].capabilities
    assert by_id["fast"].alias_of == "openai/gpt-4o-mini"


async def test_health_checking(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ["", *SERVICE_NAMES]:
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_and_describes_services(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask(request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
        async for answer in stub.ServerReflectionInfo(iter([request])):
            return answer
        raise AssertionError("no reflection answer")

    listed = await ask(reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert set(SERVICE_NAMES) <= names
    described = await ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol="aigne.hub.v1.ChatService"))
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    methods = {m.name for f in files for s in f.service if s.name == "ChatService" for m in s.method}
    assert methods == {"CreateChatCompletion", "StreamChatCompletion"}
