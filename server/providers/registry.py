"""The registry: the list of provider specs (`server.providers.spec.ProviderSpec`).

Adding a provider: write `server/providers/<name>.py` with its adapter, its
translation and its `SPEC`, and add one line to `SPECS` below (an OpenAI-compatible
API: one spec in `server.providers.presets` and its line here).
"""

from __future__ import annotations

from collections.abc import Mapping

from server.config import ModelEntry, ProviderConfig
from server.errors import ProviderNotConfigured
from server.providers import anthropic, azure, bedrock, gemini, local, mistral, ollama, openai, presets
from server.providers.base import Capability, Provider
from server.providers.spec import ProviderSpec
from server.providers.transport import Transport

SPECS: dict[str, ProviderSpec] = {
    spec.name: spec
    for spec in (
        openai.SPEC,
        anthropic.SPEC,
        mistral.SPEC,
        presets.DEEPSEEK,
        presets.XAI,
        presets.OPENROUTER,
        presets.GROQ,
        presets.TOGETHER,
        presets.FIREWORKS,
        presets.PERPLEXITY,
        gemini.SPEC,
        bedrock.SPEC,
        azure.SPEC,
        ollama.SPEC,
        local.SPEC,
        presets.VLLM,
        presets.LLAMACPP,
    )
}


def spec_of(name: str, cfg: ProviderConfig) -> ProviderSpec:
    """The spec a configured provider is built from: its `type`, else its name."""
    kind = cfg.type or name
    spec = SPECS.get(kind)
    if spec is None:
        known = ", ".join(sorted(SPECS))
        raise ProviderNotConfigured(f"provider {name!r} has unknown type {kind!r} (known: {known})", field="type")
    return spec


def build_provider(name: str, cfg: ProviderConfig, transport: Transport) -> Provider:
    """The adapter for provider `name` configured by `cfg`."""
    spec = spec_of(name, cfg)
    return spec.build(name, cfg, spec, transport)


def catalog_models(name: str, cfg: ProviderConfig) -> list[ModelEntry]:
    """The provider's catalog: the configured models, else its spec's."""
    if cfg.models:
        return list(cfg.models)
    spec = SPECS.get(cfg.type or name)
    return list(spec.models) if spec else []


def api_key_variable(provider: str) -> str | None:
    """The variable that enables a known provider, for error messages."""
    spec = SPECS.get(provider)
    return spec.api_key_env if spec else None


def enabling_variables() -> list[str]:
    """The variable that enables each provider with a key of its own, in the registry's
    order (for hints: "set OPENAI_API_KEY (or ANTHROPIC_API_KEY, ...)")."""
    return [spec.api_key_env for spec in SPECS.values() if spec.from_environment and spec.api_key_env]


def providers_from_environment(environ: Mapping[str, str]) -> dict[str, ProviderConfig]:
    """The providers the environment enables (each spec reads its own variables)."""
    providers = {}
    for spec in SPECS.values():
        if spec.from_environment is not None and (cfg := spec.from_environment(environ)) is not None:
            providers[spec.name] = cfg
    return providers


def capability_table() -> str:
    """The README's provider table, rendered from the specs (`python -m server.providers.registry`)."""
    transport = Transport()  # the adapters are only built, never called
    columns = list(Capability)
    lines = [
        "| provider | adapter | enabled by | " + " | ".join(c.value for c in columns) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    for name in sorted(SPECS):
        spec = SPECS[name]
        capabilities = build_provider(
            name, ProviderConfig(base_url="http://unused", api_key="unused"), transport
        ).capabilities
        marks = " | ".join("yes" if c in capabilities else "-" for c in columns)
        variable = spec.enabled_by or spec.api_key_env or "-"
        lines.append(f"| {name} | {spec.adapter or name} | {variable} | {marks} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(capability_table())
