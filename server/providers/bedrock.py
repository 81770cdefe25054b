"""AWS Bedrock: chat through Converse / ConverseStream, embeddings through InvokeModel.

Models are `bedrock/<model id or inference profile>` (`bedrock/us.amazon.nova-lite-v1:0`);
the id goes into the URL path percent-encoded, as boto3 sends it. The translation to
and from Converse is `server.providers.bedrock_converse` (pure); this module is the
transport: signing, framing and errors.

Credentials and endpoint come from botocore itself, so they are found exactly as the
AWS CLI and boto3 find them:
  - a Bedrock API key (`AWS_BEARER_TOKEN_BEDROCK`, or the config file's `api_key` /
    `api_key_env`) goes as `Authorization: Bearer`; otherwise each request is signed
    with SigV4 (botocore's `SigV4Auth`, service `bedrock`) with the credentials of
    botocore's chain (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` /
    `AWS_SESSION_TOKEN`, `AWS_PROFILE` and the shared files, SSO, instance roles);
    refreshable credentials are refreshed by botocore;
  - the region is botocore's (`AWS_REGION` / `AWS_DEFAULT_REGION` / the profile);
  - the endpoint is the config file's `base_url`, else the one botocore resolves for
    `bedrock-runtime` (`AWS_ENDPOINT_URL_BEDROCK_RUNTIME`, `AWS_ENDPOINT_URL`, the
    profile's `endpoint_url`, else `https://bedrock-runtime.<region>.amazonaws.com`).
A vault credential for Bedrock is a Bedrock API key: it replaces the Authorization
header (a bearer token is accepted without the SigV4 headers).

ConverseStream answers `application/vnd.amazon.eventstream`: binary frames (prelude,
headers, payload, CRCs) decoded by botocore's `EventStreamBuffer`, which checks both
CRCs. An `exception` frame mid-stream is mapped like an HTTP error of that type.

Errors: the type comes from `x-amzn-ErrorType` (or the body's `__type`) and decides
the class (`_ERROR_KINDS`): invalid or expired credentials and bad signatures (403 at
AWS) are `UpstreamCredentialRejected`; AccessDenied (a model not enabled) stays a
permission error; ThrottlingException, ModelNotReady and ServiceUnavailable are the
retryable rate-limit / unavailable errors. Unknown types fall back to the status.

Embeddings: Titan text models take one `inputText` per call (one call per input,
concurrently; tokens from `inputTextTokenCount`), Cohere models take `texts` in one call
(tokens from the `X-Amzn-Bedrock-Input-Token-Count` header). `dimensions` goes to
Titan v2 only; base64 output is encoded by the gateway.

`probe_credential` has no model list on bedrock-runtime to read: it sends a Converse
call with no messages, which AWS authenticates before validating, so a
ValidationException means the key was accepted.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import botocore.session
import httpx
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.eventstream import EventStreamBuffer, ParserError
from botocore.exceptions import BotoCoreError
from botocore.utils import get_token_from_environment

from server import errors
from server.config import ProviderConfig
from server.providers.base import JSON, Capability, auth_headers
from server.providers.bedrock_converse import StreamTranslator, to_chat_completion, to_converse_request, unsupported
from server.providers.credentials import clear_credential, use_credential
from server.providers.http_errors import retry_after_seconds, transport_error, upstream_status_error
from server.providers.mistral import floats_to_base64

if TYPE_CHECKING:
    from server.providers.registry import Preset

SIGNING_NAME = "bedrock"
BEARER_ENV = "AWS_BEARER_TOKEN_BEDROCK"
CAPABILITIES = frozenset(
    {
        Capability.CHAT,
        Capability.CHAT_STREAM,
        Capability.TOOLS,
        Capability.VISION,
        Capability.JSON_SCHEMA,
        Capability.EMBEDDINGS,
    }
)
_PROBE_MODEL = "amazon.nova-micro-v1:0"

# Bedrock's exception types (lower-cased: stream frames name them camelCase).
_ERROR_KINDS: dict[str, type[errors.UpstreamError]] = {
    "validationexception": errors.UpstreamBadRequest,
    "servicequotaexceededexception": errors.UpstreamRateLimited,
    "throttlingexception": errors.UpstreamRateLimited,
    "modelnotreadyexception": errors.UpstreamUnavailable,
    "serviceunavailableexception": errors.UpstreamUnavailable,
    "internalserverexception": errors.UpstreamUnavailable,
    "modelerrorexception": errors.UpstreamUnavailable,
    "modelstreamerrorexception": errors.UpstreamUnavailable,
    "modeltimeoutexception": errors.UpstreamTimeout,
    "resourcenotfoundexception": errors.UpstreamNotFound,
    "accessdeniedexception": errors.UpstreamAuthFailed,
    "unrecognizedclientexception": errors.UpstreamCredentialRejected,
    "invalidsignatureexception": errors.UpstreamCredentialRejected,
    "incompletesignatureexception": errors.UpstreamCredentialRejected,
    "expiredtokenexception": errors.UpstreamCredentialRejected,
    "missingauthenticationtokenexception": errors.UpstreamCredentialRejected,
}


class BedrockAdapter:
    """Speaks bedrock-runtime's REST API at `endpoint` with SigV4 or a Bedrock API key."""

    credential_header = ("authorization", "Bearer ")

    def __init__(
        self,
        *,
        name: str,
        endpoint: str,
        region: str,
        client: httpx.AsyncClient,
        credentials: Any = None,
        api_key: str | None = None,
        extra_headers: dict[str, str] | None = None,
        capabilities: frozenset[Capability] = CAPABILITIES,
    ) -> None:
        self.name = name
        self.capabilities = capabilities
        self._endpoint = endpoint.rstrip("/")
        self._region = region
        self._client = client
        # botocore credentials (possibly refreshable); unused when an API key is set.
        self._credentials = credentials
        self._headers = auth_headers(self.credential_header, api_key, extra_headers)
        self._bearer = api_key is not None

    async def aclose(self) -> None:
        """Nothing of its own to release: the HTTP client is shared."""

    async def probe_credential(self, secret: str) -> None:
        """An empty Converse call with `secret` (see the module docstring)."""
        token = use_credential(self.credential_header, secret)
        try:
            response = await self._send(self._url(_PROBE_MODEL, "converse"), {"messages": []})
        finally:
            clear_credential(token)
        if response.status_code < 400:
            return
        error = self._status_error(response.status_code, response.headers, response.content)
        if not isinstance(error, errors.UpstreamBadRequest):  # refused as invalid only once authenticated
            raise error

    # -- chat -------------------------------------------------------------------------

    async def create_chat_completion(self, request: JSON, model: str) -> JSON:
        body = to_converse_request(self.name, request)
        response = await self._checked(await self._send(self._url(model, "converse"), body))
        return to_chat_completion(
            self._json(response.content), completion_id=_completion_id(response), model=model, created=int(time.time())
        )

    async def stream_chat_completion(self, request: JSON, model: str) -> AsyncGenerator[JSON, None]:
        body = to_converse_request(self.name, request)
        async with self._open_stream(self._url(model, "converse-stream"), body) as response:
            translator = StreamTranslator(completion_id=_completion_id(response), model=model, created=int(time.time()))
            async for event_type, payload in self._events(response):
                for chunk in translator.feed(event_type, payload):
                    yield chunk
        if not (translator.stopped and translator.usage_seen):
            raise errors.UpstreamUnavailable(f"{self.name} ended the stream before its metadata", provider=self.name)

    async def _events(self, response: httpx.Response) -> AsyncIterator[tuple[str, JSON]]:
        """The stream's events as (event type, JSON payload), decoded by botocore."""
        frames = EventStreamBuffer()
        try:
            async for data in response.aiter_bytes():
                frames.add_data(data)
                for message in frames:
                    # (botocore-stubs types `message.headers` wrongly; this dict is the same.)
                    frame = message.to_response_dict()
                    headers: dict[str, Any] = frame["headers"]
                    if headers.get(":message-type") != "event":
                        raise self._stream_exception(headers, frame["body"])
                    yield str(headers.get(":event-type", "")), self._json(frame["body"])
        except httpx.HTTPError as exc:
            raise transport_error(self.name, exc) from exc
        except ParserError as exc:
            raise errors.UpstreamMalformedResponse(
                f"{self.name} sent a broken event-stream frame ({exc})", provider=self.name
            ) from exc

    def _stream_exception(self, headers: dict[str, Any], payload: bytes) -> errors.UpstreamError:
        kind = str(headers.get(":exception-type") or headers.get(":error-code") or "")
        message = _message_of(payload) or str(headers.get(":error-message") or "")
        error_class = _ERROR_KINDS.get(kind.lower(), errors.UpstreamUnavailable)
        return error_class(f"{self.name} failed mid-stream ({kind}): {message}", provider=self.name)

    # -- embeddings -----------------------------------------------------------------------

    async def create_embedding(self, request: JSON, model: str) -> JSON:
        inputs = request.get("input")
        texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
        if not texts or not all(isinstance(text, str) for text in texts):
            raise unsupported(self.name, "input", "embeds text only, not token arrays")
        if ".titan-embed" in model:
            vectors, tokens = await self._titan_embeddings(texts, model, request.get("dimensions"))
        elif ".embed-" in model:  # cohere.embed-english-v3, cohere.embed-multilingual-v3, ...
            vectors, tokens = await self._cohere_embeddings(texts, model)
        else:
            raise unsupported(self.name, "model", f"knows no embedding body for {model!r} (Titan or Cohere)")
        base64_output = request.get("encoding_format") == "base64"
        data = [
            {"object": "embedding", "index": i, "embedding": floats_to_base64(v) if base64_output else v}
            for i, v in enumerate(vectors)
        ]
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def _titan_embeddings(self, texts: list[str], model: str, dimensions: Any) -> tuple[list[list[float]], int]:
        extra = {"dimensions": dimensions} if dimensions and "v2" in model else {}

        async def one(text: str) -> JSON:
            response = await self._checked(await self._send(self._url(model, "invoke"), {"inputText": text, **extra}))
            return self._json(response.content)

        answers = await asyncio.gather(*(one(text) for text in texts))
        return [list(a.get("embedding") or []) for a in answers], sum(
            int(a.get("inputTextTokenCount") or 0) for a in answers
        )

    async def _cohere_embeddings(self, texts: list[str], model: str) -> tuple[list[list[float]], int]:
        body = {"texts": texts, "input_type": "search_document"}
        response = await self._checked(await self._send(self._url(model, "invoke"), body))
        answer = self._json(response.content)
        tokens = int(response.headers.get("x-amzn-bedrock-input-token-count") or 0)
        return [list(v) for v in answer.get("embeddings") or []], tokens

    # -- HTTP plumbing --------------------------------------------------------------------

    def _url(self, model: str, operation: str) -> str:
        return f"{self._endpoint}/model/{quote(model, safe='')}/{operation}"

    async def _signed_headers(self, url: str, content: bytes, accept: str) -> dict[str, str]:
        """The request's headers: the API key's, or SigV4's over this exact body and URL."""
        headers = {**self._headers, "content-type": "application/json", "accept": accept}
        if self._bearer or self._credentials is None:
            return headers
        try:
            # A refresh (assumed role, SSO, instance metadata) is blocking I/O: off the loop.
            if getattr(self._credentials, "refresh_needed", lambda: False)():
                frozen = await asyncio.to_thread(self._credentials.get_frozen_credentials)
            else:
                frozen = self._credentials.get_frozen_credentials()
        except BotoCoreError as exc:
            raise errors.UpstreamAuthFailed(
                f"{self.name}: AWS credentials unavailable ({exc})", provider=self.name
            ) from exc
        signed = AWSRequest(method="POST", url=url, data=content, headers=headers)
        SigV4Auth(Credentials(frozen.access_key, frozen.secret_key, frozen.token), SIGNING_NAME, self._region).add_auth(
            signed
        )
        return dict(signed.headers.items())

    async def _send(self, url: str, body: JSON) -> httpx.Response:
        content = json.dumps(body).encode()
        headers = await self._signed_headers(url, content, "application/json")
        try:
            return await self._client.post(url, headers=headers, content=content)
        except httpx.HTTPError as exc:
            raise transport_error(self.name, exc) from exc

    async def _checked(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise self._status_error(response.status_code, response.headers, response.content)
        return response

    @asynccontextmanager
    async def _open_stream(self, url: str, body: JSON) -> AsyncIterator[httpx.Response]:
        """The streaming response; closing it on exit is how a client's cancellation
        reaches the upstream at once."""
        content = json.dumps(body).encode()
        headers = await self._signed_headers(url, content, "application/vnd.amazon.eventstream")
        request = self._client.build_request("POST", url, headers=headers, content=content)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise transport_error(self.name, exc) from exc
        try:
            if response.status_code >= 400:
                try:
                    error_body = await response.aread()
                except httpx.HTTPError:
                    error_body = b""
                raise self._status_error(response.status_code, response.headers, error_body)
            yield response
        finally:
            await response.aclose()

    def _status_error(self, status: int, headers: httpx.Headers, content: bytes) -> errors.UpstreamError:
        kind = (headers.get("x-amzn-errortype") or _body_type(content) or "").split(":")[0]
        message = _message_of(content) or content.decode("utf-8", "replace")[:500] or "(empty body)"
        error_class = _ERROR_KINDS.get(kind.lower())
        if error_class is None:
            return upstream_status_error(self.name, status, headers, message)
        return error_class(
            f"{self.name} answered {status} ({kind}): {message}",
            provider=self.name,
            status=status,
            retry_after_seconds=retry_after_seconds(headers),
        )

    def _json(self, content: bytes) -> JSON:
        try:
            parsed = json.loads(content)
        except ValueError as exc:
            raise errors.UpstreamMalformedResponse(
                f"{self.name} answered with invalid JSON: {content[:200]!r}", provider=self.name
            ) from exc
        if not isinstance(parsed, dict):
            raise errors.UpstreamMalformedResponse(
                f"{self.name} answered JSON that is not an object", provider=self.name
            )
        return parsed


def _completion_id(response: httpx.Response) -> str:
    return "chatcmpl-" + (response.headers.get("x-amzn-requestid") or uuid.uuid4().hex)


def _body_json(content: bytes) -> JSON:
    try:
        parsed = json.loads(content)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _body_type(content: bytes) -> str:
    kind = _body_json(content).get("__type") or ""
    return str(kind).rsplit("#", 1)[-1]


def _message_of(content: bytes) -> str:
    body = _body_json(content)
    return str(body.get("message") or body.get("Message") or "")[:500]


def build_bedrock(name: str, cfg: ProviderConfig, preset: Preset | None, client: httpx.AsyncClient) -> BedrockAdapter:
    """The registry's factory: the region, endpoint and credentials botocore finds."""
    session = botocore.session.Session()
    api_key = cfg.resolved_api_key()
    if api_key is None and cfg.api_key_env is None:
        api_key = get_token_from_environment(SIGNING_NAME)
    region = session.get_config_variable("region")
    if not region:
        if not (api_key and cfg.base_url):  # only a bearer key to a given endpoint needs none
            raise errors.ProviderNotConfigured(
                f"provider {name!r} needs an AWS region (AWS_REGION or AWS_DEFAULT_REGION)", field="region"
            )
        region = "us-east-1"
    endpoint = cfg.base_url or _botocore_endpoint(session, region)
    return BedrockAdapter(
        name=name,
        endpoint=endpoint,
        region=region,
        client=client,
        credentials=None if api_key else session.get_credentials(),
        api_key=api_key,
        extra_headers=cfg.headers,
        capabilities=preset.capabilities if preset else CAPABILITIES,
    )


def _botocore_endpoint(session: botocore.session.Session, region: str) -> str:
    """The endpoint boto3 would call: botocore applies AWS_ENDPOINT_URL_BEDROCK_RUNTIME,
    AWS_ENDPOINT_URL and the profile's endpoint_url, else the regional default."""
    runtime = session.create_client(
        "bedrock-runtime", region_name=region, aws_access_key_id="unused", aws_secret_access_key="unused"
    )
    return str(runtime.meta.endpoint_url)
