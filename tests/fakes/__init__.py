"""Fake upstream providers for tests: loopback servers speaking the providers' real APIs."""

from tests.fakes.openai_upstream import SCENARIO_MODELS, FakeOpenAI, RecordedRequest

__all__ = ["SCENARIO_MODELS", "FakeOpenAI", "RecordedRequest"]
