"""A fake Azure OpenAI resource: the fake OpenAI upstream behind Azure's URLs, headers
and additions.

  - deployments API: `/openai/deployments/{deployment}/...?api-version=...` (without
    api-version Azure answers 404 "Resource not found"); the deployment is the model;
  - v1 API: `/openai/v1/...`, the model in the body;
  - the key in the `api-key` header, or an Entra ID token as `Authorization: Bearer`;
    a wrong one is Azure's 401 body (`code` "401");
  - answers carry `prompt_filter_results` and per-choice `content_filter_results`;
    streams begin with a chunk that has no choices and only `prompt_filter_results`;
  - model (deployment) "filtered-prompt" answers Azure's 400 `content_filter` error
    with its `innererror.content_filter_result`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from tests.fakes._http import Request, Response
from tests.fakes.openai_upstream import CREATED, FakeOpenAI, RecordedRequest

_SAFE = {"filtered": False, "severity": "safe"}
_FILTER_RESULTS = {name: _SAFE for name in ("hate", "self_harm", "sexual", "violence")}
_PROMPT_FILTER = [{"prompt_index": 0, "content_filter_results": _FILTER_RESULTS}]


class AzureError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(str(body))
        self.status = status
        self.body = body


class FakeAzureOpenAI(FakeOpenAI):
    def __init__(self, *, api_key: str, ad_token: str | None = None) -> None:
        super().__init__(api_key=api_key)
        self.ad_token = ad_token

    @property
    def endpoint(self) -> str:
        """The resource endpoint, as AZURE_OPENAI_ENDPOINT gives it."""
        return f"http://127.0.0.1:{self.port}"

    def _check_auth(self, request: Request) -> None:
        key = request.headers.get("api-key")
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        if key == self.api_key or (self.ad_token is not None and bearer == self.ad_token):
            return
        message = (
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid "
            "key for an active subscription and use a correct regional API endpoint for your resource."
        )
        raise AzureError(401, {"error": {"code": "401", "message": message}})

    async def _dispatch(self, request: Request, recorded: RecordedRequest) -> Response:
        try:
            self._check_auth(request)
            self._to_openai_path(request, recorded)
        except AzureError as exc:
            return Response(exc.status, json.dumps(exc.body).encode())
        if "filtered-prompt" in recorded.path + recorded.model:
            return Response(400, json.dumps(_prompt_filtered()).encode())
        return await super()._dispatch(request, recorded)

    def _to_openai_path(self, request: Request, recorded: RecordedRequest) -> None:
        """Rewrites Azure's path to the fake OpenAI's, the deployment into the body."""
        not_found = AzureError(404, {"error": {"code": "404", "message": "Resource not found"}})
        if request.path.startswith("/openai/v1/"):
            request.path = "/v1/" + request.path.removeprefix("/openai/v1/")
            return
        if "api-version=" not in request.query:
            raise not_found
        if request.path == "/openai/models":
            request.path = "/v1/models"
            return
        parts = request.path.split("/", 4)  # '', openai, deployments, NAME, rest
        if len(parts) != 5 or parts[1:3] != ["openai", "deployments"]:
            raise not_found
        request.path = "/v1/" + parts[4]
        # Azure serves the deployment in the path, whatever the body's model says.
        if isinstance(recorded.json, dict):
            recorded.json["model"] = parts[3]
        elif request.headers.get("content-type", "").startswith("multipart/form-data"):
            recorded.form_fields = [(k, v) for k, v in recorded.form_fields if k != "model"] + [("model", parts[3])]

    def _chat(self, body: dict, recorded: RecordedRequest) -> Response:
        response = super()._chat(body, recorded)
        if response.status != 200:
            return response
        if response.stream is None:
            completion = json.loads(response.body)
            completion["prompt_filter_results"] = _PROMPT_FILTER
            for choice in completion["choices"]:
                choice["content_filter_results"] = (
                    {**_FILTER_RESULTS, "violence": {"filtered": True, "severity": "high"}}
                    if choice["finish_reason"] == "content_filter"
                    else _FILTER_RESULTS
                )
            return Response(200, json.dumps(completion).encode(), headers=response.headers)
        response.stream = _with_prompt_filter(response.stream)
        return response


async def _with_prompt_filter(events: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    first = {"id": "", "object": "", "created": 0, "model": "", "choices": [], "prompt_filter_results": _PROMPT_FILTER}
    yield b"data: " + json.dumps(first).encode() + b"\n\n"
    async for event in events:
        yield event


def _prompt_filtered() -> dict[str, Any]:
    return {
        "error": {
            "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management "
            "policy. Please modify your prompt and retry.",
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": {**_FILTER_RESULTS, "violence": {"filtered": True, "severity": "medium"}},
            },
        }
    }


__all__ = ["CREATED", "FakeAzureOpenAI"]
