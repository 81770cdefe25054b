"""The default catalogs name only models the providers still serve: each catalog entry
must be in the provider's model list, as the fake upstreams record it (their lists are
refreshed from the providers' model lists and deprecation pages)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from google import genai

from server.config import ProviderConfig
from server.providers.registry import catalog_models
from tests.fakes.gemini_upstream import FakeGemini

KEY = "gm-catalog"


@pytest_asyncio.fixture(scope="module")
async def gemini() -> AsyncIterator[FakeGemini]:
    fake = FakeGemini(api_key=KEY)
    await fake.start()
    yield fake
    await fake.stop()


async def test_gemini_catalog_lists_only_served_models(gemini):
    sdk = genai.Client(api_key=KEY, http_options={"base_url": gemini.base_url, "api_version": "v1beta"})
    served = {model.name.removeprefix("models/"): model async for model in await sdk.aio.models.list()}
    catalog = {entry.id: entry for entry in catalog_models("gemini", ProviderConfig())}
    gone = sorted(set(catalog) - set(served))
    assert not gone, f"the gemini catalog lists models Google no longer serves: {gone}"
    for model_id, entry in catalog.items():  # and each is served for what the catalog offers
        methods = served[model_id].supported_actions or []
        wanted = "embedContent" if entry.capabilities == ["embeddings"] else "generateContent"
        assert wanted in methods, f"{model_id} is not served with {wanted}"
