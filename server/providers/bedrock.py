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
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from server import errors
from server.calls import NO_CALL, Call, probe_call
from server.config import ModelEntry, ProviderConfig
from server.providers.base import JSON, Capability, floats_to_base64
from server.providers.bedrock_converse import StreamTranslator, to_chat_completion, to_converse_request, unsupported
from server.providers.spec import ProviderSpec
from server.providers.transport import (
    Answer,
    Headers,
    StreamBody,
    Transport,
    parse_object,
    retry_after_seconds,
    upstream_status_error,
)

if TYPE_CHECKING:
    import botocore.session

# botocore (~20 MB of RSS with what it imports) is imported when a Bedrock adapter is
# built or used, not by the registry that lists every provider's spec: a gateway
# without Bedrock does not carry it.

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

    # Where a Bedrock API key, and a call's credential, go (see server.providers.transport).
    credential_header = ("authorization", "Bearer ")

    def __init__(
        self,
        *,
        name: str,
        endpoint: str,
        region: str,
        transport: Transport,
        credentials: Any = None,
        api_key: str | None = None,
        extra_headers: dict[str, str] | None = None,
        capabilities: frozenset[Capability] = CAPABILITIES,
    ) -> None:
        self.name = name
        self.capabilities = capabilities
        self._endpoint = endpoint.rstrip("/")
        self._region = region
        # botocore credentials (possibly refreshable); unused when an API key is set.
        self._credentials = credentials
        self._http = transport.upstream(
            name,
            credential_header=self.credential_header,
            api_key=api_key,
            headers=extra_headers,
            error_reader=self._status_error,
        )
        self._bearer = api_key is not None

    async def aclose(self) -> None:
        """Nothing of its own to release: the transport is shared."""

    async def probe_credential(self, secret: str) -> None:
        """An empty Converse call with `secret` (see the module docstring)."""
        try:
            await self._send(self._url(_PROBE_MODEL, "converse"), {"messages": []}, probe_call(secret))
        except errors.UpstreamBadRequest:
            return  # refused as invalid only once authenticated

    # -- chat -------------------------------------------------------------------------

    async def create_chat_completion(self, request: JSON, model: str, call: Call = NO_CALL) -> JSON:
        body = to_converse_request(self.name, request)
        answer = await self._send(self._url(model, "converse"), body, call)
        return to_chat_completion(
            parse_object(self.name, answer.content),
            completion_id=_completion_id(answer.headers),
            model=model,
            created=int(time.time()),
        )

    async def stream_chat_completion(
        self, request: JSON, model: str, call: Call = NO_CALL
    ) -> AsyncGenerator[JSON, None]:
        body = to_converse_request(self.name, request)
        url = self._url(model, "converse-stream")
        content = json.dumps(body).encode()
        headers = await self._signed_headers(url, content, "application/vnd.amazon.eventstream")
        async with self._http.stream("POST", url, call, headers=headers, content=content) as response:
            translator = StreamTranslator(
                completion_id=_completion_id(response.headers), model=model, created=int(time.time())
            )
            async for event_type, payload in self._events(response):
                for chunk in translator.feed(event_type, payload):
                    yield chunk
        if not (translator.stopped and translator.usage_seen):
            raise errors.UpstreamUnavailable(f"{self.name} ended the stream before its metadata", provider=self.name)

    async def _events(self, response: StreamBody) -> AsyncIterator[tuple[str, JSON]]:
        """The stream's events as (event type, JSON payload), decoded by botocore."""
        from botocore.eventstream import EventStreamBuffer, ParserError

        frames = EventStreamBuffer()
        try:
            async for data in response.chunks():
                frames.add_data(data)
                for message in frames:
                    # (botocore-stubs types `message.headers` wrongly; this dict is the same.)
                    frame = message.to_response_dict()
                    headers: dict[str, Any] = frame["headers"]
                    if headers.get(":message-type") != "event":
                        raise self._stream_exception(headers, frame["body"])
                    yield str(headers.get(":event-type", "")), parse_object(self.name, frame["body"])
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

    async def create_embedding(self, request: JSON, model: str, call: Call = NO_CALL) -> JSON:
        inputs = request.get("input")
        texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
        if not texts or not all(isinstance(text, str) for text in texts):
            raise unsupported(self.name, "input", "embeds text only, not token arrays")
        if ".titan-embed" in model:
            vectors, tokens = await self._titan_embeddings(texts, model, request.get("dimensions"), call)
        elif ".embed-" in model:  # cohere.embed-english-v3, cohere.embed-multilingual-v3, ...
            vectors, tokens = await self._cohere_embeddings(texts, model, call)
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

    async def _titan_embeddings(
        self, texts: list[str], model: str, dimensions: Any, call: Call
    ) -> tuple[list[list[float]], int]:
        extra = {"dimensions": dimensions} if dimensions and "v2" in model else {}

        async def one(text: str) -> JSON:
            answer = await self._send(self._url(model, "invoke"), {"inputText": text, **extra}, call)
            return parse_object(self.name, answer.content)

        answers = await asyncio.gather(*(one(text) for text in texts))
        return [list(a.get("embedding") or []) for a in answers], sum(
            int(a.get("inputTextTokenCount") or 0) for a in answers
        )

    async def _cohere_embeddings(self, texts: list[str], model: str, call: Call) -> tuple[list[list[float]], int]:
        body = {"texts": texts, "input_type": "search_document"}
        response = await self._send(self._url(model, "invoke"), body, call)
        answer = parse_object(self.name, response.content)
        tokens = int(response.headers.get("x-amzn-bedrock-input-token-count") or 0)
        return [list(v) for v in answer.get("embeddings") or []], tokens

    # -- HTTP plumbing --------------------------------------------------------------------

    def _url(self, model: str, operation: str) -> str:
        return f"{self._endpoint}/model/{quote(model, safe='')}/{operation}"

    async def _signed_headers(self, url: str, content: bytes, accept: str) -> dict[str, str]:
        """The request's headers: the API key's, or SigV4's over this exact body and URL."""
        headers = {**self._http.headers, "content-type": "application/json", "accept": accept}
        if self._bearer or self._credentials is None:
            return headers
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials
        from botocore.exceptions import BotoCoreError

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

    async def _send(self, url: str, body: JSON, call: Call) -> Answer:
        content = json.dumps(body).encode()
        headers = await self._signed_headers(url, content, "application/json")
        return await self._http.send("POST", url, call, headers=headers, content=content)

    def _status_error(self, status: int, headers: Headers, content: bytes) -> errors.UpstreamError:
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


def _completion_id(headers: Headers) -> str:
    return "chatcmpl-" + (headers.get("x-amzn-requestid") or uuid.uuid4().hex)


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


def build_bedrock(name: str, cfg: ProviderConfig, spec: ProviderSpec, transport: Transport) -> BedrockAdapter:
    """The registry's factory: the region, endpoint and credentials botocore finds."""
    import botocore.session
    from botocore.utils import get_token_from_environment

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
        transport=transport,
        credentials=None if api_key else session.get_credentials(),
        api_key=api_key,
        extra_headers=cfg.headers,
        capabilities=spec.capabilities,
    )


_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", BEARER_ENV)
_REGION_VARIABLES = ("AWS_REGION", "AWS_DEFAULT_REGION")


def _from_environment(environ: Mapping[str, str]) -> ProviderConfig | None:
    """AWS credentials (keys, a profile, or a Bedrock API key) and a region, read by
    botocore itself when the adapter is built."""
    if any(environ.get(v) for v in _CREDENTIAL_VARIABLES) and any(environ.get(v) for v in _REGION_VARIABLES):
        return ProviderConfig()
    return None


_C = Capability
SPEC = ProviderSpec(
    name="bedrock",
    build=build_bedrock,
    api_key_env=BEARER_ENV,
    capabilities=CAPABILITIES,
    models=(
        *(
            ModelEntry(id=m, capabilities=[_C.CHAT, _C.CHAT_STREAM, _C.TOOLS, _C.VISION, _C.JSON_SCHEMA])
            for m in ("us.anthropic.claude-sonnet-4-20250514-v1:0", "us.anthropic.claude-haiku-4-5-20251001-v1:0")
        ),
        *(
            ModelEntry(id=m, capabilities=[_C.CHAT, _C.CHAT_STREAM, _C.TOOLS, _C.VISION])
            for m in ("amazon.nova-pro-v1:0", "amazon.nova-lite-v1:0")
        ),
        *(
            ModelEntry(id=m, capabilities=[_C.CHAT, _C.CHAT_STREAM, _C.TOOLS])
            for m in ("amazon.nova-micro-v1:0", "meta.llama3-3-70b-instruct-v1:0", "mistral.mistral-large-2407-v1:0")
        ),
        *(
            ModelEntry(id=m, capabilities=[_C.EMBEDDINGS])
            for m in ("amazon.titan-embed-text-v2:0", "cohere.embed-english-v3", "cohere.embed-multilingual-v3")
        ),
    ),
    from_environment=_from_environment,
    enabled_by=f"AWS credentials and region, or {BEARER_ENV}",
    adapter="bedrock",
    variables=(*_CREDENTIAL_VARIABLES, "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", *_REGION_VARIABLES),
)


def _botocore_endpoint(session: botocore.session.Session, region: str) -> str:
    """The endpoint boto3 would call: botocore applies AWS_ENDPOINT_URL_BEDROCK_RUNTIME,
    AWS_ENDPOINT_URL and the profile's endpoint_url, else the regional default."""
    runtime = session.create_client(
        "bedrock-runtime", region_name=region, aws_access_key_id="unused", aws_secret_access_key="unused"
    )
    return str(runtime.meta.endpoint_url)
