"""The OpenAI-compatible family: providers that speak OpenAI's API at their own URL,
served by the OpenAI adapter (`server.providers.openai`). Each is one spec: its base
URL, its key variable, what it can do and its catalog.

Adding one: a spec here built by `compatible(...)`, and its line in the registry.
"""

from __future__ import annotations

from collections.abc import Mapping

from server.config import ModelEntry, ProviderConfig
from server.providers.base import Capability
from server.providers.openai import build_openai
from server.providers.spec import ProviderSpec

_C = Capability
_CHAT_ONLY = frozenset({_C.CHAT, _C.CHAT_STREAM, _C.TOOLS, _C.JSON_SCHEMA})


def compatible(
    name: str,
    base_url: str | None,
    api_key_env: str,
    capabilities: frozenset[Capability],
    models: tuple[ModelEntry, ...] = (),
    *,
    reasoning_field: str = "reasoning_content",
    self_hosted: bool = False,
) -> ProviderSpec:
    """The spec of an OpenAI-compatible provider; its key variable enables it, unless it
    is self-hosted (then only a config file, which gives its base_url, does)."""

    def from_environment(environ: Mapping[str, str]) -> ProviderConfig | None:
        return ProviderConfig(api_key_env=api_key_env) if environ.get(api_key_env) else None

    return ProviderSpec(
        name=name,
        build=build_openai,
        api_key_env=api_key_env,
        base_url=base_url,
        capabilities=capabilities,
        models=models,
        from_environment=None if self_hosted else from_environment,
        enabled_by="config file (base_url)" if self_hosted else "",
        adapter="openai",
        reasoning_field=reasoning_field,
        variables=(api_key_env,),
    )


# DeepSeek: reasoning_content in messages and deltas passes through; JSON mode is
# json_object only (no json_schema), no images.
DEEPSEEK = compatible(
    "deepseek",
    "https://api.deepseek.com",
    "DEEPSEEK_API_KEY",
    frozenset({_C.CHAT, _C.CHAT_STREAM, _C.TOOLS}),
    tuple(ModelEntry(id=m) for m in ("deepseek-chat", "deepseek-reasoner")),
)
XAI = compatible(
    "xai",
    "https://api.x.ai/v1",
    "XAI_API_KEY",
    _CHAT_ONLY | {_C.VISION, _C.IMAGES},
    (
        *(ModelEntry(id=m, capabilities=[*_CHAT_ONLY, _C.VISION]) for m in ("grok-4", "grok-2-vision-1212")),
        *(ModelEntry(id=m, capabilities=list(_CHAT_ONLY)) for m in ("grok-3", "grok-3-mini")),
        ModelEntry(id="grok-2-image-1212", capabilities=[_C.IMAGES]),
    ),
)
# OpenRouter's model names carry their vendor: `openrouter/openai/gpt-4o-mini`.
OPENROUTER = compatible(
    "openrouter",
    "https://openrouter.ai/api/v1",
    "OPENROUTER_API_KEY",
    _CHAT_ONLY | {_C.VISION},
    tuple(
        ModelEntry(id=m)
        for m in ("openai/gpt-4o-mini", "anthropic/claude-sonnet-4", "google/gemini-2.5-flash", "deepseek/deepseek-r1")
    ),
    reasoning_field="reasoning",
)
# Groq: OpenAI's chat API and Whisper transcription on its own hardware.
GROQ = compatible(
    "groq",
    "https://api.groq.com/openai/v1",
    "GROQ_API_KEY",
    _CHAT_ONLY | {_C.VISION, _C.TRANSCRIPTION},
    (
        *(
            ModelEntry(id=m, capabilities=list(_CHAT_ONLY))
            for m in ("llama-3.3-70b-versatile", "llama-3.1-8b-instant", "openai/gpt-oss-120b", "openai/gpt-oss-20b")
        ),
        ModelEntry(id="meta-llama/llama-4-scout-17b-16e-instruct", capabilities=[*_CHAT_ONLY, _C.VISION]),
        *(ModelEntry(id=m, capabilities=[_C.TRANSCRIPTION]) for m in ("whisper-large-v3", "whisper-large-v3-turbo")),
    ),
)
TOGETHER = compatible(
    "together",
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
)
# Fireworks' model names are resource paths: `fireworks/accounts/fireworks/models/...`.
FIREWORKS = compatible(
    "fireworks",
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
)
# Perplexity: search-grounded chat; no tools, no images in, JSON schema output.
PERPLEXITY = compatible(
    "perplexity",
    "https://api.perplexity.ai",
    "PERPLEXITY_API_KEY",
    frozenset({_C.CHAT, _C.CHAT_STREAM, _C.JSON_SCHEMA}),
    tuple(ModelEntry(id=m) for m in ("sonar", "sonar-pro", "sonar-reasoning-pro", "sonar-deep-research")),
)
# Self-hosted servers: no default base URL (the config file gives it) and no key
# unless the server was started with one (`--api-key`); the catalog is the config's.
VLLM = compatible("vllm", None, "VLLM_API_KEY", _CHAT_ONLY | {_C.VISION, _C.EMBEDDINGS}, self_hosted=True)
LLAMACPP = compatible("llamacpp", None, "LLAMA_API_KEY", _CHAT_ONLY | {_C.VISION, _C.EMBEDDINGS}, self_hosted=True)
