"""Image generation through the Gemini adapter, end to end: gRPC ImageService and REST
(official openai SDK) in front, the fake Gemini Developer API behind. The fake's image
answers are parsed with the official google-genai SDK's types and client, and the body the
gateway sends is compared with the one the SDK itself sends for the same image.

Google shut Imagen down on the Gemini API on 2026-08-17, so images come from the Gemini
image models through generateContent; `imagen-*` models are refused with a clear message.
"""

from __future__ import annotations

import base64
import struct
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import openai
import pytest
import pytest_asyncio
from google import genai
from google.genai import types

from aigne.hub.v1 import image_service_pb2 as image_pb
from aigne.hub.v1 import image_service_pb2_grpc as image_grpc
from server.app import Gateway, start_gateway
from server.config import GatewayConfig, ProviderConfig, Settings
from server.providers.base import Capability
from server.providers.gemini import GEMINI_CAPABILITIES, MAX_IMAGES
from server.providers.registry import SPECS, catalog_models
from tests.conftest import SINGLE_ATTEMPT, Bridge, start_bridge
from tests.fakes.gemini_upstream import (
    IMAGE_SAFETY_MESSAGE,
    IMAGE_SCENARIO_MODELS,
    IMAGE_TOKENS,
    IMAGE_UNIT,
    NO_IMAGE_TEXT,
    RETRY_DELAY_SECONDS,
    THOUGHT_TOKENS,
    FakeGemini,
)
from tests.helpers import error_info, retry_info

KEY = "gm-images-key"
MODEL = "gemini-3.1-flash-image"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ fixtures


@pytest_asyncio.fixture(scope="module")
async def images_fake() -> AsyncIterator[FakeGemini]:
    fake = FakeGemini(api_key=KEY, slow_seconds=5.0)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture(autouse=True)
def _reset_images_fake(request: pytest.FixtureRequest) -> None:
    """Each test sees only its own upstream requests."""
    if "images_fake" in request.fixturenames:
        request.getfixturevalue("images_fake").reset()


@pytest_asyncio.fixture(scope="module")
async def images_gateway(images_fake: FakeGemini) -> AsyncIterator[Gateway]:
    providers = {
        "gemini": ProviderConfig(type="gemini", base_url=images_fake.base_url, api_key=KEY),
        "geminibad": ProviderConfig(type="gemini", base_url=images_fake.base_url, api_key="wrong-key"),
    }
    settings = Settings(grpc_port=0, auth_required=False, upstream_read_timeout_s=2.0, shutdown_grace_s=1.0)
    gateway = await start_gateway(settings, GatewayConfig(providers=providers, routing=SINGLE_ATTEMPT))
    yield gateway
    await gateway.stop(0.5)


@pytest_asyncio.fixture(scope="module")
async def images_channel(images_gateway: Gateway) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{images_gateway.port}") as channel:
        yield channel


@pytest.fixture
def images(images_channel: grpc.aio.Channel) -> image_grpc.ImageServiceStub:
    return image_grpc.ImageServiceStub(images_channel)


@pytest_asyncio.fixture(scope="module")
async def images_bridge(images_gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Bridge]:
    bridge = await start_bridge(images_gateway.port, tmp_path_factory.mktemp("gemini-images-envoy"))
    yield bridge
    await bridge.envoy.stop()


@pytest_asyncio.fixture(scope="module")
async def oai(images_bridge: Bridge) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{images_bridge.rest_url}/v1", api_key="x", max_retries=0, timeout=20)
    yield client
    await client.close()


@pytest.fixture
def sdk(images_fake: FakeGemini) -> genai.Client:
    """The official google-genai SDK pointed at the fake, on the adapter's API version."""
    options = types.HttpOptions(base_url=images_fake.base_url, api_version="v1beta")
    return genai.Client(api_key=KEY, http_options=options)


# ------------------------------------------------------------------------------- helpers


def read_png(data: bytes) -> tuple[int, int, dict[str, str]]:
    """Width, height and tEXt chunks of a PNG, each chunk's CRC checked."""
    assert data.startswith(PNG_SIGNATURE)
    position, texts, size = len(PNG_SIGNATURE), {}, (0, 0)
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert crc == zlib.crc32(kind + body)
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"tEXt":
            key, _, value = body.partition(b"\x00")
            texts[key.decode("latin-1")] = value.decode("latin-1")
        position += 12 + length
    return size[0], size[1], texts


def image_body(prompt: str, image_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The GenerateContentRequest the gateway must send for one image."""
    config: dict[str, Any] = {"responseModalities": ["IMAGE"]}
    if image_config is not None:
        config["imageConfig"] = image_config
    return {"contents": [{"role": "user", "parts": [{"text": prompt}]}], "generationConfig": config}


def image_request(model: str = f"gemini/{MODEL}", prompt: str = "a lighthouse at dusk", **fields: Any) -> Any:
    return image_pb.CreateImageRequest(model=model, prompt=prompt, **fields)


async def raw_post(fake: FakeGemini, model: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(
            f"{fake.base_url}/v1beta/models/{model}:generateContent", json=body, headers={"x-goog-api-key": KEY}
        )


# ---------------------------------------------------- the fake, checked with the official SDK


@pytest.mark.parametrize("model", [m for m in IMAGE_SCENARIO_MODELS if m != "image-bad-base64"])
async def test_fake_image_answers_parse_strictly_as_sdk_types(images_fake, model):
    """The SDK's types forbid unknown fields at every level: a drifted fake fails here."""
    answer = await raw_post(images_fake, model, image_body("a cat", {"aspectRatio": "16:9"}))
    assert answer.status_code == 200
    parsed = types.GenerateContentResponse.model_validate_json(answer.content)
    assert parsed.usage_metadata and parsed.usage_metadata.prompt_token_count == 2
    if model == "image-blocked":
        assert parsed.prompt_feedback.block_reason == types.BlockedReason.PROHIBITED_CONTENT
        return
    candidate = parsed.candidates[0]
    finals = [p for p in candidate.content.parts if p.inline_data and not p.thought] if candidate.content else []
    if model in ("image-safety", "image-no-image"):
        assert not finals and candidate.finish_reason in (types.FinishReason.IMAGE_SAFETY, types.FinishReason.NO_IMAGE)
        return
    assert candidate.finish_reason == types.FinishReason.STOP
    assert parsed.usage_metadata.candidates_token_count == IMAGE_TOKENS * len(finals)
    for part in finals:
        assert part.inline_data.mime_type == "image/png"
        assert read_png(part.inline_data.data)[:2] == (16 * IMAGE_UNIT, 9 * IMAGE_UNIT)


async def test_gateway_sends_what_the_official_sdk_sends(sdk, images, images_fake):
    """The SDK's own converters are the reference for the wire format of image requests."""
    config = types.GenerateContentConfig(
        response_modalities=["IMAGE"], image_config=types.ImageConfig(aspect_ratio="16:9", image_size="2K")
    )
    answer = await sdk.aio.models.generate_content(model=MODEL, contents="a red fox", config=config)
    width, height, texts = read_png(answer.parts[0].inline_data.data)
    assert (width, height, texts["prompt"]) == (32 * IMAGE_UNIT, 18 * IMAGE_UNIT, "a red fox")
    sdk_body = images_fake.last_request.json

    await images.CreateImage(image_request(prompt="a red fox", size="1920x1080"))
    assert (
        images_fake.last_request.json == sdk_body == image_body("a red fox", {"aspectRatio": "16:9", "imageSize": "2K"})
    )


async def test_fake_refuses_what_the_developer_api_refuses(sdk, images_fake):
    one_image = image_body("a cat")
    several = {**one_image, "generationConfig": {**one_image["generationConfig"], "candidateCount": 2}}
    refused = await raw_post(images_fake, MODEL, several)
    assert refused.status_code == 400 and "Multiple candidates" in refused.json()["error"]["message"]
    vertex_only = image_body("a cat", {"aspectRatio": "1:1", "personGeneration": "ALLOW_ADULT"})
    assert (await raw_post(images_fake, MODEL, vertex_only)).status_code == 400
    assert (await raw_post(images_fake, MODEL, image_body("a cat", {"aspectRatio": "7:4"}))).status_code == 400
    assert (await raw_post(images_fake, "gemini-2.5-flash", one_image)).status_code == 400
    # The SDK itself knows personGeneration is not a Developer API field.
    with pytest.raises(ValueError, match="not in Gemini Developer API mode"):
        config = types.GenerateContentConfig(image_config=types.ImageConfig(person_generation="ALLOW_ADULT"))
        await sdk.aio.models.generate_content(model=MODEL, contents="a cat", config=config)


# ------------------------------------------------------------------------------------ gRPC


async def test_grpc_n_images_are_n_calls_with_the_exact_body(images, images_fake):
    before = int(time.time())
    answer = await images.CreateImage(
        image_request(n=2, size="1024x1024", response_format="b64_json", quality="auto", user="end-user-7")
    )
    assert [r.path for r in images_fake.requests] == [f"/v1beta/models/{MODEL}:generateContent"] * 2
    assert all(r.headers["x-goog-api-key"] == KEY for r in images_fake.requests)
    assert [r.json for r in images_fake.requests] == [image_body("a lighthouse at dusk", {"aspectRatio": "1:1"})] * 2
    pictures = [read_png(base64.b64decode(image.b64_json)) for image in answer.data]
    assert [p[:2] for p in pictures] == [(IMAGE_UNIT, IMAGE_UNIT)] * 2
    assert {p[2]["prompt"] for p in pictures} == {"a lighthouse at dusk"}
    assert len({p[2]["serial"] for p in pictures}) == 2  # two drawings, not one twice
    assert not any(image.HasField("url") or image.HasField("revised_prompt") for image in answer.data)
    assert answer.created >= before
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (2 * 4, 2 * IMAGE_TOKENS)
    assert answer.usage.total_tokens == 2 * 4 + 2 * IMAGE_TOKENS


@pytest.mark.parametrize(
    ("size", "image_config", "pixels"),
    [
        ("auto", None, (1, 1)),
        ("256x256", {"aspectRatio": "1:1"}, (1, 1)),
        ("1536x1024", {"aspectRatio": "3:2"}, (3, 2)),
        ("1024x1536", {"aspectRatio": "2:3"}, (2, 3)),
        ("1792x1024", {"aspectRatio": "16:9"}, (16, 9)),  # 7:4, drawn at the nearest ratio
        ("1024x1792", {"aspectRatio": "9:16"}, (9, 16)),
        ("768x1024", {"aspectRatio": "3:4"}, (3, 4)),
        ("2048x1536", {"aspectRatio": "4:3", "imageSize": "2K"}, (8, 6)),
        ("4096x4096", {"aspectRatio": "1:1", "imageSize": "4K"}, (4, 4)),
        ("5040x2160", {"aspectRatio": "21:9", "imageSize": "4K"}, (84, 36)),
    ],
)
async def test_sizes_become_aspect_ratios_and_image_sizes(images, images_fake, size, image_config, pixels):
    answer = await images.CreateImage(image_request(size=size))
    assert images_fake.last_request.json == image_body("a lighthouse at dusk", image_config)
    width, height, _ = read_png(base64.b64decode(answer.data[0].b64_json))
    assert (width, height) == (pixels[0] * IMAGE_UNIT, pixels[1] * IMAGE_UNIT)


async def test_thought_drafts_are_dropped_and_every_final_image_kept(images, images_fake):
    thinking = await images.CreateImage(image_request(model="gemini/image-thinking"))
    assert len(thinking.data) == 1
    # The fake draws the draft first: the image kept is the last one it drew.
    assert read_png(base64.b64decode(thinking.data[0].b64_json))[2]["serial"] == str(images_fake.images_drawn)
    assert thinking.usage.completion_tokens == IMAGE_TOKENS + THOUGHT_TOKENS
    assert thinking.usage.completion_tokens_details.reasoning_tokens == THOUGHT_TOKENS

    two = await images.CreateImage(image_request(model="gemini/image-two"))
    assert len(two.data) == 2 and two.usage.completion_tokens == 2 * IMAGE_TOKENS


@pytest.mark.parametrize(
    ("fields", "reason", "field", "words"),
    [
        ({"n": MAX_IMAGES + 1}, "INVALID_REQUEST", "n", "1 to 4 images"),
        ({"size": "1000x700"}, "INVALID_REQUEST", "size", "1792x1024"),
        ({"size": "large"}, "INVALID_REQUEST", "size", "16:9"),
        ({"response_format": "url"}, "UNSUPPORTED_FEATURE", "response_format", "b64_json"),
        ({"quality": "hd"}, "UNSUPPORTED_FEATURE", "quality", "'hd'"),
        ({"style": "vivid"}, "UNSUPPORTED_FEATURE", "style", "'vivid'"),
        ({"output_format": "png"}, "UNSUPPORTED_FEATURE", "output_format", "PNG or JPEG"),
        ({"background": "transparent"}, "UNSUPPORTED_FEATURE", "background", "'transparent'"),
        ({"model": "gemini/imagen-4.0-generate-001"}, "UNSUPPORTED_FEATURE", "model", "2026-08-17"),
        ({"model": "gemini/gemini-3.5-flash"}, "UNSUPPORTED_FEATURE", "model", "images"),
    ],
)
async def test_what_gemini_cannot_do_is_refused_before_upstream(images, images_fake, fields, reason, field, words):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await images.CreateImage(image_request(**fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert (info.reason, info.metadata["field"]) == (reason, field)
    assert words in caught.value.details()
    assert not images_fake.requests


@pytest.mark.parametrize(
    ("model", "n", "code", "reason", "words"),
    [
        ("gemini/image-blocked", 1, grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_BAD_REQUEST", "PROHIBITED_CONTENT"),
        ("gemini/image-safety", 1, grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_BAD_REQUEST", IMAGE_SAFETY_MESSAGE),
        ("gemini/image-safety", 2, grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_BAD_REQUEST", "IMAGE_SAFETY"),
        ("gemini/image-no-image", 1, grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_BAD_REQUEST", NO_IMAGE_TEXT),
        ("gemini/image-bad-base64", 1, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_MALFORMED_RESPONSE", "base64"),
        ("gemini/error-400", 1, grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_BAD_REQUEST", "INVALID_ARGUMENT"),
        ("gemini/error-401", 1, grpc.StatusCode.PERMISSION_DENIED, "UPSTREAM_AUTH_FAILED", "UNAUTHENTICATED"),
        ("gemini/error-403", 1, grpc.StatusCode.PERMISSION_DENIED, "UPSTREAM_AUTH_FAILED", "PERMISSION_DENIED"),
        ("geminibad/" + MODEL, 1, grpc.StatusCode.PERMISSION_DENIED, "UPSTREAM_AUTH_FAILED", "API key not valid"),
        ("gemini/error-404", 1, grpc.StatusCode.NOT_FOUND, "UPSTREAM_NOT_FOUND", "NOT_FOUND"),
        ("gemini/error-429", 2, grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED", "RESOURCE_EXHAUSTED"),
        ("gemini/error-500", 1, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", "INTERNAL"),
        ("gemini/error-503", 1, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", "UNAVAILABLE"),
        ("gemini/error-504", 1, grpc.StatusCode.DEADLINE_EXCEEDED, "UPSTREAM_TIMEOUT", "DEADLINE_EXCEEDED"),
        ("gemini/malformed", 1, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_MALFORMED_RESPONSE", "invalid JSON"),
        ("gemini/slow", 1, grpc.StatusCode.DEADLINE_EXCEEDED, "UPSTREAM_TIMEOUT", "gemini"),
    ],
)
async def test_refusals_and_upstream_errors_map_to_codes(images, model, n, code, reason, words):
    """n > 1 runs concurrent calls: their failure is still one error of its own class."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await images.CreateImage(image_request(model=model, n=n))
    assert caught.value.code() == code
    info = error_info(caught.value)
    assert info.reason == reason and info.metadata["provider"] == model.split("/")[0]
    assert words in caught.value.details()


async def test_rate_limit_hint_comes_from_the_body(images):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await images.CreateImage(image_request(model="gemini/error-429"))
    hint = retry_info(caught.value)
    assert hint is not None and hint.retry_delay.seconds == RETRY_DELAY_SECONDS


# ------------------------------------------------------- REST with the official openai SDK


async def test_rest_images_generate(oai, images_fake):
    answer = await oai.images.generate(
        model=f"gemini/{MODEL}", prompt="a paper boat", response_format="b64_json", n=2, size="1024x1024"
    )
    assert [r.json for r in images_fake.requests] == [image_body("a paper boat", {"aspectRatio": "1:1"})] * 2
    pictures = [read_png(base64.b64decode(image.b64_json)) for image in answer.data]
    assert [(w, h, texts["prompt"]) for w, h, texts in pictures] == [(IMAGE_UNIT, IMAGE_UNIT, "a paper boat")] * 2
    assert all(image.url is None for image in answer.data)


async def test_rest_without_response_format_answers_base64(oai, images_fake):
    answer = await oai.images.generate(model=f"gemini/{MODEL}", prompt="a kite", size="1536x1024")
    assert images_fake.last_request.json == image_body("a kite", {"aspectRatio": "3:2"})
    assert read_png(base64.b64decode(answer.data[0].b64_json))[:2] == (3 * IMAGE_UNIT, 2 * IMAGE_UNIT)


@pytest.mark.parametrize(
    ("fields", "exception", "status", "code"),
    [
        ({"response_format": "url"}, openai.BadRequestError, 400, "UNSUPPORTED_FEATURE"),
        ({"n": MAX_IMAGES + 1}, openai.BadRequestError, 400, "INVALID_REQUEST"),
        ({"size": "1000x700"}, openai.BadRequestError, 400, "INVALID_REQUEST"),
        ({"model": "gemini/imagen-4.0-generate-001", "n": 2}, openai.BadRequestError, 400, "UNSUPPORTED_FEATURE"),
        ({"model": "gemini/image-blocked"}, openai.BadRequestError, 400, "UPSTREAM_BAD_REQUEST"),
        ({"model": "gemini/error-401"}, openai.PermissionDeniedError, 403, "UPSTREAM_AUTH_FAILED"),
        ({"model": "gemini/error-404"}, openai.NotFoundError, 404, "UPSTREAM_NOT_FOUND"),
        ({"model": "gemini/error-500"}, openai.InternalServerError, 503, "UPSTREAM_UNAVAILABLE"),
        ({"model": "gemini/malformed"}, openai.InternalServerError, 503, "UPSTREAM_MALFORMED_RESPONSE"),
        ({"model": "gemini/slow"}, openai.InternalServerError, 504, "UPSTREAM_TIMEOUT"),
    ],
)
async def test_rest_errors_raise_the_matching_sdk_exception(oai, fields, exception, status, code):
    request: dict[str, Any] = {"model": f"gemini/{MODEL}", "prompt": "a kite", "response_format": "b64_json", **fields}
    with pytest.raises(exception) as caught:
        await oai.images.generate(**request)
    assert (caught.value.status_code, caught.value.code) == (status, code)


async def test_rest_rate_limit_carries_retry_after(oai):
    with pytest.raises(openai.RateLimitError) as caught:
        await oai.images.generate(model="gemini/error-429", prompt="a kite")
    assert caught.value.response.headers["retry-after"] == str(RETRY_DELAY_SECONDS)


# ---------------------------------------------------------------------- catalog, registry


def test_only_image_models_gain_images():
    assert Capability.IMAGES in GEMINI_CAPABILITIES == SPECS["gemini"].capabilities
    entries = {entry.id: set(entry.capabilities) for entry in catalog_models("gemini", ProviderConfig())}
    image_models = {model for model, caps in entries.items() if Capability.IMAGES in caps}
    assert image_models == {"gemini-3.1-flash-image", "gemini-3-pro-image"}
    assert all(entries[model] == {Capability.IMAGES} for model in image_models)
    assert not any(model.startswith("imagen-") for model in entries)  # shut down on 2026-08-17
    assert Capability.IMAGES not in entries["gemini-3.5-flash"] | entries["gemini-3.1-pro-preview"]
