"""Azure OpenAI: OpenAI's API under Azure's URLs and credentials.

Configured as the official `openai.AzureOpenAI` client reads it: the resource endpoint
from `AZURE_OPENAI_ENDPOINT` (or `base_url`), the key from `AZURE_OPENAI_API_KEY` (sent
as the `api-key` header), or an Entra ID token from `AZURE_OPENAI_AD_TOKEN` (sent as
`Authorization: Bearer`), and the API version from `OPENAI_API_VERSION` (or the
config's `api_version`).

Two URL shapes, chosen by the base URL:
  - a resource endpoint (`https://NAME.openai.azure.com`): the deployments API,
    `/openai/deployments/{deployment}/chat/completions?api-version=...`, where the
    deployment is the model name after `azure/` (the body's `model` is ignored by Azure);
  - a base URL ending in `/openai/v1`: the v1 API, OpenAI's paths with the model in the
    body and no api-version.

Azure's content filter: a completion stopped by it has finish_reason `content_filter`
(passed through, with `content_filter_results`); a prompt refused by it is an HTTP 400
with code `content_filter`, reported as UPSTREAM_BAD_REQUEST naming the filtered
categories. Streams begin with a chunk that has no choices and only
`prompt_filter_results`; it is dropped, so clients see OpenAI's sequence.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncGenerator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from server import errors
from server.config import ModelEntry, ProviderConfig
from server.providers.base import JSON, Capability, auth_headers
from server.providers.credentials import probe
from server.providers.http_errors import error_message_from_body, transport_error, upstream_status_error
from server.providers.openai import OpenAIAdapter, _StreamContext

if TYPE_CHECKING:
    from server.providers.registry import Preset

API_KEY_ENV = "AZURE_OPENAI_API_KEY"
AD_TOKEN_ENV = "AZURE_OPENAI_AD_TOKEN"
ENDPOINT_ENV = "AZURE_OPENAI_ENDPOINT"
API_VERSION_ENV = "OPENAI_API_VERSION"
# The latest GA version when neither the config nor OPENAI_API_VERSION names one.
DEFAULT_API_VERSION = "2024-10-21"
CAPABILITIES = frozenset(Capability)
# Deployments are named by their owners; these are the usual names (the models').
MODELS = tuple(
    ModelEntry(id=model_id, capabilities=caps)
    for model_id, caps in [
        (
            "gpt-4o",
            [Capability.CHAT, Capability.CHAT_STREAM, Capability.TOOLS, Capability.VISION, Capability.JSON_SCHEMA],
        ),
        (
            "gpt-4o-mini",
            [Capability.CHAT, Capability.CHAT_STREAM, Capability.TOOLS, Capability.VISION, Capability.JSON_SCHEMA],
        ),
        (
            "gpt-4.1",
            [Capability.CHAT, Capability.CHAT_STREAM, Capability.TOOLS, Capability.VISION, Capability.JSON_SCHEMA],
        ),
        ("text-embedding-3-small", [Capability.EMBEDDINGS]),
        ("text-embedding-3-large", [Capability.EMBEDDINGS]),
        ("dall-e-3", [Capability.IMAGES]),
        ("whisper", [Capability.TRANSCRIPTION]),
        ("tts", [Capability.SPEECH]),
    ]
)


class AzureOpenAIAdapter(OpenAIAdapter):
    """OpenAI's adapter with Azure's URLs, api-version and credential header."""

    credential_header = ("api-key", "")

    def __init__(
        self,
        *,
        name: str,
        endpoint: str,
        api_key: str | None,
        client: httpx.AsyncClient,
        api_version: str,
        ad_token: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
        capabilities: frozenset[Capability] = CAPABILITIES,
    ) -> None:
        endpoint = endpoint.rstrip("/")
        self._v1 = endpoint.endswith("/openai/v1")
        super().__init__(
            name=name,
            base_url=endpoint if self._v1 else endpoint + "/openai",
            api_key=None,
            client=client,
            extra_headers=extra_headers,
            capabilities=capabilities,
        )
        self._params = {} if self._v1 else {"api-version": api_version}
        if ad_token and not api_key:
            self.credential_header = ("authorization", "Bearer ")
        self._headers = auth_headers(self.credential_header, api_key or ad_token, extra_headers)

    async def probe_credential(self, secret: str) -> None:
        """Lists the resource's models with `secret` (see `base.CredentialProbe`)."""
        query = "" if self._v1 else f"?api-version={quote(self._params['api-version'])}"
        await probe(
            self._client,
            f"{self._base_url}/models{query}",
            provider=self.name,
            headers=self._headers,
            credential_header=self.credential_header,
            secret=secret,
            error_of=lambda r: self._status_error(r.status_code, r.headers, r.content),
        )

    async def stream_chat_completion(self, request: JSON, model: str) -> AsyncGenerator[JSON, None]:
        async for chunk in super().stream_chat_completion(request, model):
            # Azure's first chunk carries only prompt_filter_results: nothing for clients.
            if chunk.get("choices") or chunk.get("usage"):
                yield chunk

    def _url(self, path: str, model: Any) -> str:
        if self._v1:
            return self._base_url + path
        return f"{self._base_url}/deployments/{quote(str(model), safe='')}{path}"

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        body = kwargs.get("json") or kwargs.get("data") or {}
        try:
            response = await self._client.request(
                method, self._url(path, body.get("model")), params=self._params, headers=self._headers, **kwargs
            )
        except httpx.HTTPError as exc:
            raise transport_error(self.name, exc) from exc
        if response.status_code >= 400:
            raise self._status_error(response.status_code, response.headers, response.content)
        return response

    def _open_stream(self, path: str, body: JSON) -> _StreamContext:
        request = self._client.build_request(
            "POST", self._url(path, body.get("model")), params=self._params, headers=self._headers, json=body
        )
        return _StreamContext(self._client, request, self.name, self._status_error)

    def _status_error(self, status: int, headers: httpx.Headers, content: bytes) -> errors.UpstreamError:
        filtered = _filtered_categories(content)
        if filtered is None:
            return upstream_status_error(self.name, status, headers, error_message_from_body(content))
        return errors.UpstreamBadRequest(
            f"{self.name} refused the prompt: Azure's content filter flagged it ({filtered})",
            provider=self.name,
            status=status,
        )


def _filtered_categories(content: bytes) -> str | None:
    """The categories of a content-filter refusal, or None for any other error."""
    try:
        error = json.loads(content).get("error") or {}
    except (ValueError, AttributeError):
        return None
    if not isinstance(error, dict) or error.get("code") != "content_filter":
        return None
    result = (error.get("innererror") or {}).get("content_filter_result") or {}
    flagged = [
        f"{category}: {verdict.get('severity', 'flagged')}" if "severity" in verdict else category
        for category, verdict in result.items()
        if isinstance(verdict, dict) and (verdict.get("filtered") or verdict.get("detected"))
    ]
    return ", ".join(flagged) or "no category given"


def build_azure(name: str, cfg: ProviderConfig, preset: Preset | None, client: httpx.AsyncClient) -> AzureOpenAIAdapter:
    """The registry's factory: configuration first, then the SDK's variables."""
    endpoint = cfg.base_url or os.environ.get(ENDPOINT_ENV)
    if not endpoint:
        raise errors.ProviderNotConfigured(
            f"provider {name!r} needs an endpoint (base_url or {ENDPOINT_ENV})", field="base_url"
        )
    api_key = cfg.resolved_api_key()
    if api_key is None and cfg.api_key_env is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    return AzureOpenAIAdapter(
        name=name,
        endpoint=endpoint,
        api_key=api_key,
        client=client,
        api_version=cfg.api_version or os.environ.get(API_VERSION_ENV) or DEFAULT_API_VERSION,
        ad_token=os.environ.get(AD_TOKEN_ENV) or None,
        extra_headers=cfg.headers,
        capabilities=preset.capabilities if preset else CAPABILITIES,
    )
