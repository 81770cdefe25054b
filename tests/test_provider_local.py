"""The `local` provider with its real packaged models, through the official OpenAI SDK
over REST (Envoy) and through gRPC.

One gateway for the whole module loads each model once. Its pool has one worker and
room for one waiting call (AIGNE_HUB_LOCAL_WORKERS=1, AIGNE_HUB_LOCAL_QUEUE=1), so
the test of a full pool needs only three calls; the other tests run one at a time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
from collections.abc import AsyncIterator

import grpc
import openai
import pytest
import pytest_asyncio

from aigne.hub.v1 import audio_service_pb2 as audio_pb
from aigne.hub.v1 import audio_service_pb2_grpc as audio_grpc
from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from aigne.hub.v1 import embedding_service_pb2 as embedding_pb
from aigne.hub.v1 import embedding_service_pb2_grpc as embedding_grpc
from server.accounts.owners import ensure_owner
from server.app import Gateway, start_gateway
from server.config import ConfigError, GatewayConfig, ProviderConfig, Settings, config_from_environment
from server.providers.local import LocalAdapter, installed
from server.providers.local.audio import render_transcription, segments
from server.providers.local.engines import Word
from tests.conftest import SINGLE_ATTEMPT, Bridge, start_bridge
from tests.helpers import bearer_interceptors, chat_request, error_info, value

pytestmark = pytest.mark.skipif(not installed(), reason="the aigne-hub[local] extra is not installed")

CHAT = "local/smollm2-135m-instruct"
EMBED = "local/all-minilm-l6-v2"
SPEECH = "local/hibari"
TRANSCRIBE = "local/pocketsphinx-en-us"
SENTENCE = "Open the door and turn on the light in the kitchen."


@pytest_asyncio.fixture(scope="module")
async def local_gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIGNE_HUB_LOCAL_WORKERS", "1")
        env.setenv("AIGNE_HUB_LOCAL_QUEUE", "1")
        env.setenv("AIGNE_HUB_LOCAL_MAX_TOKENS", "2048")
        settings = Settings(grpc_port=0, shutdown_grace_s=2.0, data_dir=tmp_path_factory.mktemp("local-data"))
        gw = await start_gateway(settings, GatewayConfig(providers={"local": ProviderConfig()}, routing=SINGLE_ATTEMPT))
    yield gw
    await gw.stop(0.5)


@pytest_asyncio.fixture(scope="module")
async def local_key(local_gateway: Gateway) -> str:
    owner = await ensure_owner(local_gateway.accounts.db, "user", "local-tester")
    _, secret = await local_gateway.accounts.keys.create_key(owner.id, "local tests")
    return secret


@pytest_asyncio.fixture(scope="module")
async def local_bridge(local_gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Bridge]:
    running = await start_bridge(local_gateway.port, tmp_path_factory.mktemp("local-envoy"))
    yield running
    await running.envoy.stop()


@pytest_asyncio.fixture(scope="module")
async def sdk(local_bridge: Bridge, local_key: str) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{local_bridge.rest_url}/v1", api_key=local_key, max_retries=0, timeout=60)
    yield client
    await client.close()


@pytest_asyncio.fixture(scope="module")
async def local_channel(local_gateway: Gateway, local_key: str) -> AsyncIterator[grpc.aio.Channel]:
    interceptors = bearer_interceptors(local_key)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{local_gateway.port}", interceptors=interceptors) as ch:
        yield ch


def local_adapter(gateway: Gateway) -> LocalAdapter:
    adapter = gateway.providers["local"]
    assert isinstance(adapter, LocalAdapter)
    return adapter


async def wait_for(condition) -> None:
    """Polls `condition` (state of the gateway's own pool) for up to 30 s."""
    async with asyncio.timeout(30):
        while not condition():  # noqa: ASYNC110 - a counter of another thread, nothing to await
            await asyncio.sleep(0.02)


# configuration


def test_enabled_by_default_and_switched_off_by_variable():
    assert "local" in config_from_environment({}).providers
    assert "local" in config_from_environment({"AIGNE_HUB_LOCAL": "true"}).providers
    assert "local" not in config_from_environment({"AIGNE_HUB_LOCAL": "false"}).providers
    with pytest.raises(ConfigError, match="AIGNE_HUB_LOCAL"):
        config_from_environment({"AIGNE_HUB_LOCAL": "maybe"})


async def test_models_lists_the_local_models_with_their_capabilities(sdk):
    models = {m.id async for m in sdk.models.list()}
    assert {CHAT, EMBED, SPEECH, TRANSCRIBE} <= models


# chat


async def test_chat_answers_text_with_usage(sdk):
    answer = await sdk.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=30
    )
    assert answer.model == CHAT
    assert answer.choices[0].message.content.strip()
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens > 5 and 0 < answer.usage.completion_tokens <= 30


async def test_max_tokens_ends_with_length(sdk):
    answer = await sdk.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Tell me a long story about a dragon."}], max_tokens=5
    )
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 5


async def test_stream_yields_tokens_then_done_with_the_tokenizers_usage(sdk):
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    stream = await sdk.chat.completions.create(
        model=CHAT, messages=messages, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]  # the SDK stops at [DONE]
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(contents) >= 3
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = chunks[-1].usage
    # llama.cpp streams a chunk per token, except that a character spanning several
    # tokens (an emoji) waits for its last one: usage counts the tokens themselves.
    assert usage.completion_tokens >= len(contents)
    if finish == ["length"]:
        assert usage.completion_tokens == 12
    else:
        assert finish == ["stop"]
    unary = await sdk.chat.completions.create(model=CHAT, messages=messages, max_tokens=12, temperature=0)
    assert usage.prompt_tokens == unary.usage.prompt_tokens
    assert usage.completion_tokens == unary.usage.completion_tokens  # same greedy answer, same count
    assert "".join(contents) == unary.choices[0].message.content


async def test_stop_sequence_is_honoured(sdk):
    answer = await sdk.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
        max_tokens=60,
        temperature=0,
        stop=["5"],
    )
    assert "5" not in answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"


async def test_chat_over_grpc_unary_and_stream(local_channel):
    stub = chat_grpc.ChatServiceStub(local_channel)
    answer = await stub.CreateChatCompletion(chat_request(CHAT, "Say hello.", max_tokens=10))
    assert answer.model == CHAT and answer.choices[0].message.content.strip()
    request = chat_request(CHAT, "Say hello.", max_tokens=6, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stub.StreamChatCompletion(request)]
    contents = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert contents >= 1 and finish in (["stop"], ["length"])
    assert contents <= chunks[-1].usage.completion_tokens <= 6


async def test_tools_and_images_are_refused_as_unsupported(sdk):
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(
            model=CHAT,
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        )
    assert "tools" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.images.generate(model="local/smollm2-135m-instruct", prompt="a cat")
    assert "images" in caught.value.message


async def test_unknown_local_model_is_not_found(sdk):
    with pytest.raises(openai.NotFoundError) as caught:
        await sdk.chat.completions.create(model="local/gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert CHAT in caught.value.message


# embeddings


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


async def test_similar_sentences_are_closer_than_unrelated_ones(sdk):
    result = await sdk.embeddings.create(
        model=EMBED,
        input=["A cat sits on the mat.", "A kitten is resting on a rug.", "Interest rates rose by half a point."],
    )
    cat, kitten, rates = (d.embedding for d in result.data)
    assert len(cat) == 384
    assert cosine(cat, kitten) > cosine(cat, rates) + 0.2
    assert result.usage.prompt_tokens == result.usage.total_tokens > 10


async def test_embeddings_base64_over_grpc_match_the_floats(local_channel):
    stub = embedding_grpc.EmbeddingServiceStub(local_channel)
    floats = await stub.CreateEmbedding(embedding_pb.CreateEmbeddingRequest(model=EMBED, input=value("hello")))
    vector = [v.number_value for v in floats.data[0].embedding.list_value.values]
    packed = await stub.CreateEmbedding(
        embedding_pb.CreateEmbeddingRequest(model=EMBED, input=value("hello"), encoding_format="base64")
    )
    raw = base64.b64decode(packed.data[0].embedding.string_value)
    assert struct.unpack("<384f", raw) == pytest.approx(vector, abs=1e-6)
    # [CLS] hello [SEP]
    assert floats.usage.prompt_tokens == 3


async def test_embeddings_refuse_other_dimensions_and_overlong_input(local_channel):
    stub = embedding_grpc.EmbeddingServiceStub(local_channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateEmbedding(embedding_pb.CreateEmbeddingRequest(model=EMBED, input=value("x"), dimensions=64))
    assert error_info(caught.value).reason == "UNSUPPORTED_FEATURE"
    assert error_info(caught.value).metadata["field"] == "dimensions"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateEmbedding(embedding_pb.CreateEmbeddingRequest(model=EMBED, input=value("word " * 300)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "256" in caught.value.details()


# speech and transcription


def share_of_words_heard(said: str, heard: str) -> float:
    expected = [w.strip(".,").lower() for w in said.split()]
    got = set(heard.lower().split())
    return sum(w in got for w in expected) / len(expected)


@pytest.mark.parametrize("audio_format", ["wav", "mp3"])
async def test_speech_round_trip_through_transcription(sdk, audio_format):
    speech = await sdk.audio.speech.create(model=SPEECH, voice="alloy", input=SENTENCE, response_format=audio_format)
    audio = speech.read()
    assert speech.response.headers["content-type"] == {"wav": "audio/wav", "mp3": "audio/mpeg"}[audio_format]
    transcript = await sdk.audio.transcriptions.create(model=TRANSCRIBE, file=(f"speech.{audio_format}", audio))
    assert share_of_words_heard(SENTENCE, transcript.text) >= 0.7, transcript.text


async def test_speech_formats_and_voices(sdk):
    pcm = (await sdk.audio.speech.create(model=SPEECH, voice="nova", input="Hello.", response_format="pcm")).read()
    assert len(pcm) % 2 == 0 and 0.3 < len(pcm) / 2 / 24_000 < 5  # 16-bit samples at 24 kHz
    for fmt, magic in (("flac", b"fLaC"), ("opus", b"OggS"), ("wav", b"RIFF")):
        audio = (await sdk.audio.speech.create(model=SPEECH, voice="heart", input="Hi.", response_format=fmt)).read()
        assert audio.startswith(magic), fmt
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.audio.speech.create(model=SPEECH, voice="alloy", input="Hi.", response_format="aac")
    assert "aac" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.audio.speech.create(model=SPEECH, voice="nobody", input="Hi.")
    assert "voice" in caught.value.message


@pytest.mark.parametrize("response_format", ["json", "text", "verbose_json", "srt", "vtt"])
async def test_transcription_formats_over_grpc(local_channel, response_format):
    stub = audio_grpc.AudioServiceStub(local_channel)
    speech = await stub.CreateSpeech(
        audio_pb.CreateSpeechRequest(model=SPEECH, input=SENTENCE, voice="alloy", response_format="wav")
    )
    result = await stub.CreateTranscription(
        audio_pb.CreateTranscriptionRequest(
            model=TRANSCRIBE, file=speech.data, filename="s.wav", response_format=response_format
        )
    )
    text = result.text
    assert share_of_words_heard(SENTENCE, text) >= 0.7, text
    if response_format == "srt":
        assert text.startswith("1\n00:00:0") and " --> " in text
    elif response_format == "vtt":
        assert text.startswith("WEBVTT\n\n00:00:0")
    elif response_format == "verbose_json":
        assert 2.0 < result.duration < 6.0 and result.language == "english"


async def test_transcription_refuses_what_is_not_audio(sdk):
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.audio.transcriptions.create(model=TRANSCRIBE, file=("notes.wav", b"this is not audio"))
    assert "notes.wav" in caught.value.message


# the pool


async def test_a_full_pool_answers_429_and_a_closed_stream_frees_its_worker(sdk, local_gateway):
    adapter = local_adapter(local_gateway)
    stopped_before = adapter.stopped_generations
    long_stream = await sdk.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "Count from 1 to 1000, one number per line."}],
        max_tokens=2000,
        stream=True,
    )
    first = await long_stream.__anext__()  # generating: the only worker is taken
    assert first.id
    queued = asyncio.create_task(
        sdk.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    )
    await wait_for(lambda: adapter.pool.admitted == 2)
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk.embeddings.create(model=EMBED, input="refused: no room")
    assert "busy" in caught.value.message
    assert caught.value.response.headers.get("retry-after") == "1"
    # Closing the stream stops the generation, which frees the worker for the queued call.
    await long_stream.close()
    answer = await asyncio.wait_for(queued, 60)
    assert answer.usage.completion_tokens <= 3
    await wait_for(lambda: adapter.pool.admitted == 0)
    assert adapter.stopped_generations == stopped_before + 1  # cut short, not run to its end


async def test_a_prompt_beyond_the_context_is_a_clear_bad_request(sdk):
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "word " * 3000}])
    assert "context size" in caught.value.message


# rendering, without the models


def test_segments_split_at_pauses_and_timestamps_render_in_srt_and_vtt():
    words = [Word("open", 0.3, 0.6), Word("the", 0.6, 0.7), Word("door", 0.7, 1.0), Word("now", 2.0, 3_723.456)]
    parts = segments(words)
    assert [(p.text, p.start, p.end) for p in parts] == [("open the door", 0.3, 1.0), ("now", 2.0, 3_723.456)]
    _, srt = render_transcription(words, 3_724.0, "srt", with_words=False)
    assert srt.decode() == "1\n00:00:00,300 --> 00:00:01,000\nopen the door\n\n2\n00:00:02,000 --> 01:02:03,456\nnow\n"
    _, vtt = render_transcription(words, 3_724.0, "vtt", with_words=False)
    assert vtt.decode().startswith("WEBVTT\n\n00:00:00.300 --> 00:00:01.000\nopen the door\n")
    _, verbose = render_transcription(words, 3_724.0, "verbose_json", with_words=True)
    body = json.loads(verbose)
    assert body["text"] == "open the door now" and len(body["segments"]) == 2 and len(body["words"]) == 4
