"""Which adapter serves which provider name, and the presets of the OpenAI family.

Adding a provider: write `server/providers/<name>.py` with an adapter class and add one
line to `ADAPTERS` (or, for an OpenAI-compatible API, one line to `PRESETS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import httpx

from server.config import ModelEntry, ProviderConfig
from server.errors import ProviderNotConfigured
from server.providers.anthropic import CLAUDE_CHAT, CLAUDE_MODELS, build_anthropic_adapter
from server.providers.azure import API_KEY_ENV as AZURE_API_KEY_ENV
from server.providers.azure import CAPABILITIES as AZURE_CAPABILITIES
from server.providers.azure import MODELS as AZURE_MODELS
from server.providers.azure import build_azure
from server.providers.base import Capability, Provider
from server.providers.bedrock import BEARER_ENV as BEDROCK_BEARER_ENV
from server.providers.bedrock import CAPABILITIES as BEDROCK_CAPABILITIES
from server.providers.bedrock import build_bedrock
from server.providers.gemini import GEMINI_BASE_URL, GEMINI_CAPABILITIES, GEMINI_MODELS, build_gemini
from server.providers.local import CAPABILITIES as LOCAL_CAPABILITIES
from server.providers.local import build_local, local_models
from server.providers.mistral import CAPABILITIES as MISTRAL_CAPABILITIES
from server.providers.mistral import DEFAULT_BASE_URL as MISTRAL_BASE_URL
from server.providers.mistral import build_mistral
from server.providers.ollama import build_ollama
from server.providers.openai import OpenAIAdapter


@dataclass(frozen=True)
class Preset:
    """Defaults for a named provider: its adapter, base URL and key variable."""

    adapter: str
    base_url: str | None
    api_key_env: str | None
    capabilities: frozenset[Capability] = frozenset(Capability)
    # The catalog used when the configuration lists no models.
    models: tuple[ModelEntry, ...] = ()
    # OpenAI-compatible dialects: the field that carries visible reasoning.
    reasoning_field: str = "reasoning_content"


_CHAT_ONLY = frozenset({Capability.CHAT, Capability.CHAT_STREAM, Capability.TOOLS, Capability.JSON_SCHEMA})

_C = Capability
_OPENAI_CHAT = [_C.CHAT, _C.CHAT_STREAM, _C.TOOLS, _C.JSON_SCHEMA, _C.VISION]
OPENAI_MODELS = tuple(
    ModelEntry(id=model_id, capabilities=caps)
    for model_id, caps in [
        ("gpt-4o", _OPENAI_CHAT),
        ("gpt-4o-mini", _OPENAI_CHAT),
        ("gpt-4.1", _OPENAI_CHAT),
        ("gpt-4.1-mini", _OPENAI_CHAT),
        ("gpt-4.1-nano", _OPENAI_CHAT),
        ("o4-mini", _OPENAI_CHAT),
        ("text-embedding-3-small", [_C.EMBEDDINGS]),
        ("text-embedding-3-large", [_C.EMBEDDINGS]),
        ("dall-e-2", [_C.IMAGES]),
        ("dall-e-3", [_C.IMAGES]),
        ("gpt-image-1", [_C.IMAGES]),
        ("tts-1", [_C.SPEECH]),
        ("gpt-4o-mini-tts", [_C.SPEECH]),
        ("whisper-1", [_C.TRANSCRIPTION]),
        ("gpt-4o-mini-transcribe", [_C.TRANSCRIPTION]),
    ]
)

PRESETS: dict[str, Preset] = {
    "anthropic": Preset("anthropic", "https://api.anthropic.com", "ANTHROPIC_API_KEY", CLAUDE_CHAT, CLAUDE_MODELS),
    "gemini": Preset("gemini", GEMINI_BASE_URL, "GEMINI_API_KEY", GEMINI_CAPABILITIES, GEMINI_MODELS),
    "local": Preset("local", None, None, LOCAL_CAPABILITIES, local_models()),
    "openai": Preset("openai", "https://api.openai.com/v1", "OPENAI_API_KEY", models=OPENAI_MODELS),
    "mistral": Preset(
        "mistral",
        MISTRAL_BASE_URL,
        "MISTRAL_API_KEY",
        MISTRAL_CAPABILITIES,
        (
            *(
                ModelEntry(id=m, capabilities=[*_CHAT_ONLY, _C.VISION])
                for m in ("mistral-medium-latest", "mistral-small-latest")
            ),
            ModelEntry(id="mistral-large-latest", capabilities=list(_CHAT_ONLY)),
            ModelEntry(id="mistral-embed", capabilities=[_C.EMBEDDINGS]),
        ),
    ),
    # DeepSeek: reasoning_content in messages and deltas passes through; JSON mode is
    # json_object only (no json_schema), no images.
    "deepseek": Preset(
        "openai",
        "https://api.deepseek.com",
        "DEEPSEEK_API_KEY",
        frozenset({_C.CHAT, _C.CHAT_STREAM, _C.TOOLS}),
        tuple(ModelEntry(id=m) for m in ("deepseek-chat", "deepseek-reasoner")),
    ),
    "xai": Preset(
        "openai",
        "https://api.x.ai/v1",
        "XAI_API_KEY",
        _CHAT_ONLY | {_C.VISION, _C.IMAGES},
        (
            *(ModelEntry(id=m, capabilities=[*_CHAT_ONLY, _C.VISION]) for m in ("grok-4", "grok-2-vision-1212")),
            *(ModelEntry(id=m, capabilities=list(_CHAT_ONLY)) for m in ("grok-3", "grok-3-mini")),
            ModelEntry(id="grok-2-image-1212", capabilities=[_C.IMAGES]),
        ),
    ),
    # OpenRouter's model names carry their vendor: `openrouter/openai/gpt-4o-mini`.
    "openrouter": Preset(
        "openai",
        "https://openrouter.ai/api/v1",
        "OPENROUTER_API_KEY",
        _CHAT_ONLY | {_C.VISION},
        tuple(
            ModelEntry(id=m)
            for m in (
                "openai/gpt-4o-mini",
                "anthropic/claude-sonnet-4",
                "google/gemini-2.5-flash",
                "deepseek/deepseek-r1",
            )
        ),
        reasoning_field="reasoning",
    ),
    # Azure OpenAI: model names are deployment names (server.providers.azure).
    "azure": Preset("azure", None, AZURE_API_KEY_ENV, AZURE_CAPABILITIES, AZURE_MODELS),
    # Bedrock: the endpoint and region come from botocore (server.providers.bedrock).
    "bedrock": Preset(
        "bedrock",
        None,
        BEDROCK_BEARER_ENV,
        BEDROCK_CAPABILITIES,
        (
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
                for m in (
                    "amazon.nova-micro-v1:0",
                    "meta.llama3-3-70b-instruct-v1:0",
                    "mistral.mistral-large-2407-v1:0",
                )
            ),
            *(
                ModelEntry(id=m, capabilities=[_C.EMBEDDINGS])
                for m in ("amazon.titan-embed-text-v2:0", "cohere.embed-english-v3", "cohere.embed-multilingual-v3")
            ),
        ),
    ),
    # Groq: OpenAI's chat API and Whisper transcription on its own hardware.
    "groq": Preset(
        "openai",
        "https://api.groq.com/openai/v1",
        "GROQ_API_KEY",
        _CHAT_ONLY | {_C.VISION, _C.TRANSCRIPTION},
        (
            *(
                ModelEntry(id=m, capabilities=list(_CHAT_ONLY))
                for m in (
                    "llama-3.3-70b-versatile",
                    "llama-3.1-8b-instant",
                    "openai/gpt-oss-120b",
                    "openai/gpt-oss-20b",
                )
            ),
            ModelEntry(id="meta-llama/llama-4-scout-17b-16e-instruct", capabilities=[*_CHAT_ONLY, _C.VISION]),
            *(
                ModelEntry(id=m, capabilities=[_C.TRANSCRIPTION])
                for m in ("whisper-large-v3", "whisper-large-v3-turbo")
            ),
        ),
    ),
    "together": Preset(
        "openai",
        "https://api.together.xyz/v1",
        "TOGETHER_API_KEY",
        _CHAT_ONLY | {_C.VISION, _C.EMBEDDINGS, _C.IMAGES},
        (
            *(
                ModelEntry(id=m, capabilities=list(_CHAT_ONLY))
                for m in (
                    "meta-llama/Llama-3.3-70B-Instruct-Turbo",
                    "deepseek-ai/DeepSeek-V3",
                    "Qwen/Qwen2.5-72B-Instruct-Turbo",
                )
            ),
            ModelEntry(id="BAAI/bge-large-en-v1.5", capabilities=[_C.EMBEDDINGS]),
            ModelEntry(id="black-forest-labs/FLUX.1-schnell", capabilities=[_C.IMAGES]),
        ),
    ),
    # Fireworks' model names are resource paths: `fireworks/accounts/fireworks/models/...`.
    "fireworks": Preset(
        "openai",
        "https://api.fireworks.ai/inference/v1",
        "FIREWORKS_API_KEY",
        _CHAT_ONLY | {_C.VISION, _C.EMBEDDINGS},
        (
            *(
                ModelEntry(id=f"accounts/fireworks/models/{m}", capabilities=list(_CHAT_ONLY))
                for m in ("llama-v3p3-70b-instruct", "deepseek-v3", "qwen3-235b-a22b")
            ),
            ModelEntry(id="nomic-ai/nomic-embed-text-v1.5", capabilities=[_C.EMBEDDINGS]),
        ),
    ),
    # Perplexity: search-grounded chat; no tools, no images in, JSON schema output.
    "perplexity": Preset(
        "openai",
        "https://api.perplexity.ai",
        "PERPLEXITY_API_KEY",
        frozenset({_C.CHAT, _C.CHAT_STREAM, _C.JSON_SCHEMA}),
        tuple(ModelEntry(id=m) for m in ("sonar", "sonar-pro", "sonar-reasoning-pro", "sonar-deep-research")),
    ),
    # Self-hosted servers: no default base URL (the config file gives it) and no key
    # unless the server was started with one (`--api-key`); the catalog is the config's.
    "vllm": Preset("openai", None, "VLLM_API_KEY", _CHAT_ONLY | {_C.VISION, _C.EMBEDDINGS}),
    "llamacpp": Preset("openai", None, "LLAMA_API_KEY", _CHAT_ONLY | {_C.VISION, _C.EMBEDDINGS}),
}

AdapterFactory = Callable[[str, ProviderConfig, Preset | None, httpx.AsyncClient], Provider]


def _openai(name: str, cfg: ProviderConfig, preset: Preset | None, client: httpx.AsyncClient) -> Provider:
    base_url = cfg.base_url or (preset.base_url if preset else None)
    if not base_url:
        raise ProviderNotConfigured(f"provider {name!r} needs a base_url", field="base_url")
    api_key = cfg.resolved_api_key()
    if api_key is None and cfg.api_key_env is None and preset and preset.api_key_env:
        api_key = ProviderConfig(api_key_env=preset.api_key_env).resolved_api_key()
    capabilities = preset.capabilities if preset else frozenset(Capability)
    return OpenAIAdapter(
        name=name,
        base_url=base_url,
        api_key=api_key,
        client=client,
        extra_headers=cfg.headers,
        capabilities=capabilities,
        reasoning_field=preset.reasoning_field if preset else "reasoning_content",
    )


ADAPTERS: dict[str, AdapterFactory] = {
    "anthropic": build_anthropic_adapter,
    "azure": build_azure,
    "bedrock": build_bedrock,
    "gemini": build_gemini,
    "local": build_local,
    "mistral": build_mistral,
    "ollama": build_ollama,
    "openai": _openai,
}


def build_provider(name: str, cfg: ProviderConfig, client: httpx.AsyncClient) -> Provider:
    """The adapter for provider `name` configured by `cfg`."""
    kind = cfg.type or name
    preset = PRESETS.get(kind)
    adapter = preset.adapter if preset else kind
    factory = ADAPTERS.get(adapter)
    if factory is None:
        known = ", ".join(sorted({*ADAPTERS, *PRESETS}))
        raise ProviderNotConfigured(f"provider {name!r} has unknown type {kind!r} (known: {known})", field="type")
    return factory(name, cfg, preset, client)


def catalog_models(name: str, cfg: ProviderConfig) -> list[ModelEntry]:
    """The provider's catalog: the configured models, else its preset's."""
    if cfg.models:
        return list(cfg.models)
    preset = PRESETS.get(cfg.type or name)
    return list(preset.models) if preset else []


def api_key_variable(provider: str) -> str | None:
    """The variable that enables a known provider, for error messages."""
    preset = PRESETS.get(provider)
    return preset.api_key_env if preset else None


# Providers enabled by something other than their preset's key variable (config.py).
_ENABLED_BY = {
    "ollama": "OLLAMA_HOST",
    "gemini": "GEMINI_API_KEY or GOOGLE_API_KEY",
    "azure": "AZURE_OPENAI_ENDPOINT and AZURE_OPENAI_API_KEY or AZURE_OPENAI_AD_TOKEN",
    "bedrock": "AWS credentials and region, or AWS_BEARER_TOKEN_BEDROCK",
    "vllm": "config file (base_url)",
    "llamacpp": "config file (base_url)",
    "local": "installed `[local]` extra (AIGNE_HUB_LOCAL=false: off)",
}


def capability_table() -> str:
    """The README's provider table, rendered from the code (`python -m server.providers.registry`)."""
    client = httpx.AsyncClient()  # the adapters are only built, never called
    columns = list(Capability)
    lines = [
        "| provider | adapter | enabled by | " + " | ".join(c.value for c in columns) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    for name in sorted({*PRESETS, *ADAPTERS}):
        preset = PRESETS.get(name)
        adapter = preset.adapter if preset else name
        capabilities = build_provider(
            name, ProviderConfig(base_url="http://unused", api_key="unused"), client
        ).capabilities
        marks = " | ".join("yes" if c in capabilities else "-" for c in columns)
        variable = _ENABLED_BY.get(name) or (preset.api_key_env if preset else None) or "-"
        lines.append(f"| {name} | {adapter} | {variable} | {marks} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(capability_table())
