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
from urllib.parse import quote

from server import errors
from server.calls import NO_CALL, Call
from server.config import ModelEntry, ProviderConfig
from server.providers.base import JSON, Capability
from server.providers.openai import OpenAIAdapter
from server.providers.spec import ProviderSpec
from server.providers.transport import Headers, Transport, error_message_from_body, upstream_status_error

API_KEY_ENV = "AZURE_OPENAI_API_KEY"
AD_TOKEN_ENV = "AZURE_OPENAI_AD_TOKEN"
ENDPOINT_ENV = "AZURE_OPENAI_ENDPOINT"
API_VERSION_ENV = "OPENAI_API_VERSION"
# The latest GA version when neither the config nor OPENAI_API_VERSION names one.
DEFAULT_API_VERSION = "2024-10-21"
CAPABILITIES = frozenset(Capability)
_AZURE_CHAT = [Capability.CHAT, Capability.CHAT_STREAM, Capability.TOOLS, Capability.VISION, Capability.JSON_SCHEMA]
# Deployments are named by their owners; these are the usual names (the models').
MODELS = tuple(
    ModelEntry(id=model_id, capabilities=caps)
    for model_id, caps in [
        ("gpt-4o", _AZURE_CHAT),
        ("gpt-4o-mini", _AZURE_CHAT),
        ("gpt-4.1", _AZURE_CHAT),
        ("text-embedding-3-small", [Capability.EMBEDDINGS]),
        ("text-embedding-3-large", [Capability.EMBEDDINGS]),
        ("dall-e-3", [Capability.IMAGES]),
        ("whisper", [Capability.TRANSCRIPTION]),
        ("tts", [Capability.SPEECH]),
    ]
)


class AzureOpenAIAdapter(OpenAIAdapter):
    """OpenAI's adapter with Azure's URLs, api-version, credential header and errors."""

    credential_header = ("api-key", "")

    def __init__(
        self,
        *,
        name: str,
        endpoint: str,
        api_key: str | None,
        transport: Transport,
        api_version: str,
        ad_token: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
        capabilities: frozenset[Capability] = CAPABILITIES,
    ) -> None:
        endpoint = endpoint.rstrip("/")
        self._v1 = endpoint.endswith("/openai/v1")
        if ad_token and not api_key:
            self.credential_header = ("authorization", "Bearer ")
        super().__init__(
            name=name,
            base_url=endpoint if self._v1 else endpoint + "/openai",
            api_key=api_key or ad_token,
            transport=transport,
            extra_headers=extra_headers,
            capabilities=capabilities,
            error_reader=self._status_error,
        )
        self._params = {} if self._v1 else {"api-version": api_version}

    async def stream_chat_completion(
        self, request: JSON, model: str, call: Call = NO_CALL
    ) -> AsyncGenerator[JSON, None]:
        async for chunk in super().stream_chat_completion(request, model, call):
            # Azure's first chunk carries only prompt_filter_results: nothing for clients.
            if chunk.get("choices") or chunk.get("usage"):
                yield chunk

    def _url(self, path: str, model: str) -> str:
        if self._v1:
            return self._base_url + path
        return f"{self._base_url}/deployments/{quote(str(model), safe='')}{path}"

    def _status_error(self, status: int, headers: Headers, content: bytes) -> errors.UpstreamError:
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


def build_azure(name: str, cfg: ProviderConfig, spec: ProviderSpec, transport: Transport) -> AzureOpenAIAdapter:
    """The registry's factory: configuration first, then the SDK's variables."""
    endpoint = cfg.base_url or os.environ.get(ENDPOINT_ENV)
    if not endpoint:
        raise errors.ProviderNotConfigured(
            f"provider {name!r} needs an endpoint (base_url or {ENDPOINT_ENV})", field="base_url"
        )
    return AzureOpenAIAdapter(
        name=name,
        endpoint=endpoint,
        api_key=spec.key_from_environment(cfg, os.environ),
        transport=transport,
        api_version=cfg.api_version or os.environ.get(API_VERSION_ENV) or DEFAULT_API_VERSION,
        ad_token=os.environ.get(AD_TOKEN_ENV) or None,
        extra_headers=cfg.headers,
        capabilities=spec.capabilities,
    )


def _from_environment(environ: Mapping[str, str]) -> ProviderConfig | None:
    """As openai.AzureOpenAI reads it: an endpoint and a key or Entra ID token."""
    if environ.get(ENDPOINT_ENV) and (environ.get(API_KEY_ENV) or environ.get(AD_TOKEN_ENV)):
        return ProviderConfig()
    return None


# Model names are deployment names.
SPEC = ProviderSpec(
    name="azure",
    build=build_azure,
    api_key_env=API_KEY_ENV,
    capabilities=CAPABILITIES,
    models=MODELS,
    from_environment=_from_environment,
    enabled_by=f"{ENDPOINT_ENV} and {API_KEY_ENV} or {AD_TOKEN_ENV}",
    adapter="azure",
    variables=(ENDPOINT_ENV, API_KEY_ENV, AD_TOKEN_ENV, API_VERSION_ENV),
)
