"""The `local` adapter: OpenAI-shaped requests answered by the in-process engines.

Translation, OpenAI -> engines (what is refused says why, with UNSUPPORTED_FEATURE):
  chat: messages with text content (string or text parts; "developer" -> "system");
    `max_completion_tokens` (else `max_tokens`, default `DEFAULT_MAX_TOKENS`),
    temperature, top_p, seed, stop, presence/frequency_penalty pass to llama.cpp, which
    speaks OpenAI's chat JSON itself; `user`, `metadata`, `store`, `service_tier` only
    label a request and are dropped. Tools, images, audio, logprobs, logit_bias, `n` > 1
    and response formats other than text are refused: a 135M model does none of them
    reliably. Usage and finish reasons (`stop`/`length`) are llama.cpp's, counted by
    the model's own tokenizer; every stream ends with a usage chunk.
  embeddings: strings only (token arrays refused), at most `MAX_EMBEDDING_INPUTS`,
    each at most 256 tokens; `float` or `base64` (little-endian float32, as OpenAI);
    `dimensions` only 384 (MiniLM's vectors cannot be shortened meaningfully).
  speech: `voice` is a hibari voice on disk, or an OpenAI voice name (alloy, nova, ...)
    mapped to the bundled `heart` so unchanged clients work; `speed` 0.5 to 2.0;
    `instructions` refused; formats in `audio.py`.
  transcription: English only (`language` en or unset); `prompt` and `temperature`
    accepted and unused; `timestamp_granularities[]=word` adds `words` to verbose_json.

Loading: each engine loads once, on a loader thread, the first time it is needed or
when the gateway starts (`start_loading`), with a log line per model. Running: every
call takes a place in the `InferencePool`; a stream runs on a worker and hands its
chunks to the event loop through a queue; when the client goes away, the next token
callback tells llama.cpp to stop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from server import errors
from server.calls import NO_CALL, Call
from server.providers.base import JSON, AudioFile, Capability, TranscriptionInput, TranscriptionOutput
from server.providers.local.pool import InferencePool

if TYPE_CHECKING:
    from server.providers.local.engines import EmbeddingEngine, TranscriptionEngine

log = logging.getLogger("aigne_hub.local")
E = TypeVar("E")

CHAT_MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"
SPEECH_MODEL = "hibari"
TRANSCRIPTION_MODEL = "pocketsphinx-en-us"
CAPABILITIES = frozenset(
    {
        Capability.CHAT,
        Capability.CHAT_STREAM,
        Capability.EMBEDDINGS,
        Capability.SPEECH,
        Capability.TRANSCRIPTION,
    }
)
DEFAULT_MAX_TOKENS = 512
MAX_EMBEDDING_INPUTS = 2048
OPENAI_VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse", "marin", "cedar"}
)
DEFAULT_VOICE = "heart"

_CHAT_OPTIONS = ("temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty")
_CHAT_REFUSED = ("tools", "functions", "logprobs", "top_logprobs", "logit_bias", "audio", "prediction")
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class _Loader:
    """Loads each engine once, in order, on one thread of its own."""

    def __init__(self, factories: dict[str, tuple[str, Callable[[], Any]]]) -> None:
        self._factories = factories
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="local-loader")
        self._futures: dict[str, Future[Any]] = {}
        self._lock = threading.Lock()

    def start(self, kind: str) -> Future[Any]:
        with self._lock:
            if kind not in self._futures:
                self._futures[kind] = self._executor.submit(self._load, kind)
            return self._futures[kind]

    def _load(self, kind: str) -> Any:
        description, factory = self._factories[kind]
        log.info("local: loading %s", description)
        started = time.monotonic()
        engine = factory()
        log.info("local: %s model loaded in %.1f s", kind, time.monotonic() - started)
        return engine

    def loaded(self) -> list[Any]:
        with self._lock:
            futures = list(self._futures.values())
        return [f.result() for f in futures if f.done() and not f.cancelled() and f.exception() is None]

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class LocalAdapter:
    """Chat, embeddings, speech and transcription from small packaged models."""

    def __init__(self, *, name: str, workers: int, queue: int, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.name = name
        self.capabilities = CAPABILITIES
        self.pool = InferencePool(provider=name, workers=workers, queue=queue)
        self._max_tokens = max_tokens
        self._loader = _Loader(_factories(workers, max_tokens))
        # Streams whose generation was cut short because their client went away.
        self.stopped_generations = 0

    def start_loading(self) -> None:
        """Begins loading every model in the background (see `base.Preloading`)."""
        for kind in ("chat", "embeddings", "speech", "transcription"):
            self._loader.start(kind)

    async def aclose(self) -> None:
        self.pool.close()
        await asyncio.to_thread(self._close_engines)

    def _close_engines(self) -> None:
        self._loader.close()
        for engine in self._loader.loaded():
            engine.close()

    async def _engine(self, kind: str, expected: type[E]) -> E:
        try:
            engine = await asyncio.wrap_future(self._loader.start(kind))
        except Exception as exc:  # any load failure is the provider's outage
            raise errors.UpstreamUnavailable(
                f"the local {kind} model could not be loaded: {exc}", provider=self.name
            ) from exc
        assert isinstance(engine, expected)
        return engine

    # chat

    async def create_chat_completion(self, request: JSON, model: str, call: Call = NO_CALL) -> JSON:
        from server.providers.local.engines import ChatEngine

        body = self._chat_body(request, model, stream=False)
        chat = await self._engine("chat", ChatEngine)
        answer = await self.pool.run(chat.complete, body)
        return _chat_answer(answer, model, self.name)

    async def stream_chat_completion(
        self, request: JSON, model: str, call: Call = NO_CALL
    ) -> AsyncGenerator[JSON, None]:
        from server.providers.local.engines import ChatEngine

        body = self._chat_body(request, model, stream=True)
        chat = await self._engine("chat", ChatEngine)
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[JSON | BaseException | None] = asyncio.Queue()
        stop = threading.Event()

        finished = threading.Event()

        def on_chunk(chunk: JSON) -> bool:
            if stop.is_set():
                return True  # llama.cpp stops generating
            if any(c.get("finish_reason") for c in chunk.get("choices") or ()):
                finished.set()
            _put_threadsafe(loop, chunks, chunk)
            return False

        def generate() -> None:
            try:
                chat.stream(body, on_chunk)
            except BaseException as exc:  # noqa: BLE001 - handed to the event loop and raised there
                _put_threadsafe(loop, chunks, exc)
            else:
                _put_threadsafe(loop, chunks, None)
            if stop.is_set() and not finished.is_set():
                self.stopped_generations += 1  # the client left; counted for tests and metrics
                log.debug("local: a stream's client went away; generation stopped")

        job = self.pool.submit(generate)
        # Dropped unstarted at shutdown: end the stream instead of waiting for chunks.
        job.add_done_callback(lambda f: _put_threadsafe(loop, chunks, None) if f.cancelled() else None)
        try:
            while (item := await chunks.get()) is not None:
                if isinstance(item, BaseException):
                    raise errors.UpstreamUnavailable(f"local generation failed: {item}", provider=self.name)
                yield _chat_answer(item, model, self.name)
        finally:
            stop.set()

    def _chat_body(self, request: JSON, model: str, *, stream: bool) -> JSON:
        if model != CHAT_MODEL:
            raise _unknown_model(model, CHAT_MODEL, "chat")
        for name in _CHAT_REFUSED:
            if request.get(name):
                raise errors.UnsupportedFeature(f"the local chat model does not support {name}", field=name)
        if request.get("n", 1) != 1:
            raise errors.UnsupportedFeature("the local chat model answers one choice (n=1)", field="n")
        response_format = request.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type", "text") != "text":
            raise errors.UnsupportedFeature(
                "the local chat model answers text only (no JSON mode)", field="response_format"
            )
        body: JSON = {"messages": [_message(m, i) for i, m in enumerate(request.get("messages") or [])]}
        body.update({k: request[k] for k in _CHAT_OPTIONS if request.get(k) is not None})
        limit = request.get("max_completion_tokens") or request.get("max_tokens") or self._max_tokens
        body["max_tokens"] = min(int(limit), self._max_tokens)
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    # embeddings

    async def create_embedding(self, request: JSON, model: str, call: Call = NO_CALL) -> JSON:
        from server.providers.local.engines import EmbeddingEngine

        if model != EMBEDDING_MODEL:
            raise _unknown_model(model, EMBEDDING_MODEL, "embedding")
        texts = _embedding_texts(request.get("input"))
        dimensions = request.get("dimensions")
        if dimensions is not None and int(dimensions) != 384:
            raise errors.UnsupportedFeature(
                f"{EMBEDDING_MODEL} makes 384-dimensional vectors and cannot shorten them; got dimensions={dimensions}",
                field="dimensions",
            )
        engine = await self._engine("embeddings", EmbeddingEngine)
        counts, vectors = await self.pool.run(_embed, engine, texts)
        encoding = request.get("encoding_format") or "float"
        data = [
            {"object": "embedding", "index": i, "embedding": _encode_vector(v, encoding)} for i, v in enumerate(vectors)
        ]
        tokens = sum(counts)
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    # speech

    async def create_speech(self, request: JSON, model: str, call: Call = NO_CALL) -> AudioFile:
        from server.providers.local.audio import SPEECH_FORMATS, encode_speech
        from server.providers.local.engines import SpeechEngine

        if model != SPEECH_MODEL:
            raise _unknown_model(model, SPEECH_MODEL, "speech")
        if request.get("instructions"):
            raise errors.UnsupportedFeature("local speech does not take instructions", field="instructions")
        speed = float(request.get("speed") or 1.0)
        if not 0.5 <= speed <= 2.0:
            raise errors.UnsupportedFeature(f"local speech speed must be 0.5 to 2.0, got {speed:g}", field="speed")
        engine = await self._engine("speech", SpeechEngine)
        voice = _voice(str(request.get("voice") or ""), engine.voices)
        response_format = request.get("response_format") or "mp3"
        if response_format not in SPEECH_FORMATS:
            raise errors.UnsupportedFeature(
                f"local speech has no {response_format} encoder; use one of {', '.join(SPEECH_FORMATS)}",
                field="response_format",
            )
        text = str(request.get("input") or "")

        def speak() -> tuple[str, bytes]:
            return encode_speech(engine.synthesize(text, voice, speed), response_format)

        content_type, data = await self.pool.run(speak)
        return AudioFile(content_type=content_type, data=data)

    # transcription

    async def create_transcription(
        self, audio: TranscriptionInput, model: str, call: Call = NO_CALL
    ) -> TranscriptionOutput:
        from server.providers.local.engines import TranscriptionEngine

        if model != TRANSCRIPTION_MODEL:
            raise _unknown_model(model, TRANSCRIPTION_MODEL, "transcription")
        fields = dict(audio.fields)
        language = fields.get("language", "").lower()
        if language not in ("", "en", "english"):
            raise errors.UnsupportedFeature(
                f"local transcription knows English only, got language={language[:16]!r}", field="language"
            )
        with_words = any(n == "timestamp_granularities[]" and v == "word" for n, v in audio.fields)
        engine = await self._engine("transcription", TranscriptionEngine)
        content_type, body = await self.pool.run(
            _transcribe, engine, audio.file, audio.filename, audio.response_format, with_words
        )
        return TranscriptionOutput(content_type=content_type, body=body)


def _factories(workers: int, max_tokens: int) -> dict[str, tuple[str, Callable[[], Any]]]:
    from server.providers.local import engines

    return {
        "chat": (
            f"chat model {CHAT_MODEL} (llama.cpp, Q4_1 GGUF, {workers} slots)",
            lambda: engines.ChatEngine(workers, engines.inference_threads(), max_tokens),
        ),
        "embeddings": (f"embedding model {EMBEDDING_MODEL} (ONNX Runtime, int8)", engines.EmbeddingEngine),
        "speech": (f"speech model {SPEECH_MODEL} (hibari-tts, 24 kHz)", engines.SpeechEngine),
        "transcription": (
            f"transcription model {TRANSCRIPTION_MODEL} (PocketSphinx, US English)",
            engines.TranscriptionEngine,
        ),
    }


def _put_threadsafe(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any], item: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
        loop.call_soon_threadsafe(queue.put_nowait, item)


def _unknown_model(model: str, known: str, kind: str) -> errors.ModelNotFound:
    return errors.ModelNotFound(
        f"the local provider has no {kind} model {model[:64]!r}; its {kind} model is local/{known}", field="model"
    )


def _message(message: Any, index: int) -> JSON:
    if not isinstance(message, dict):
        raise errors.InvalidRequest(f"messages[{index}] must be an object", field="messages")
    role = _ROLES.get(str(message.get("role")))
    if role is None:
        raise errors.UnsupportedFeature(
            f"messages[{index}]: the local chat model takes system, user and assistant messages, "
            f"not {str(message.get('role'))[:32]!r}",
            field="messages",
        )
    return {"role": role, "content": _text_content(message.get("content"), index)}


def _text_content(content: Any, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content if isinstance(content, list) else [content]:
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise errors.UnsupportedFeature(
                f"messages[{index}]: the local chat model reads text only, not {str(kind)[:32]!r} parts",
                field="messages",
            )
        texts.append(str(part.get("text") or ""))
    return "\n".join(texts)


def _chat_answer(answer: JSON, model: str, provider: str) -> JSON:
    """llama.cpp's OpenAI JSON with the gateway's model name, or its error raised."""
    error = answer.get("error")
    if error is not None:
        message = error.get("message") if isinstance(error, dict) else str(error)
        code = error.get("code") if isinstance(error, dict) else None
        if code == 400:
            raise errors.UpstreamBadRequest(f"local chat: {message}", provider=provider, status=400)
        raise errors.UpstreamUnavailable(f"local chat failed: {message}", provider=provider)
    answer.pop("timings", None)
    answer["model"] = model
    return answer


def _embedding_texts(value: Any) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise errors.UnsupportedFeature(
            "the local embedding model takes a string or a list of strings (no token arrays)", field="input"
        )
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise errors.InvalidRequest(f"input has {len(texts)} items; at most {MAX_EMBEDDING_INPUTS}", field="input")
    if any(not t for t in texts):
        raise errors.InvalidRequest("input must not contain empty strings", field="input")
    return texts


def _embed(engine: EmbeddingEngine, texts: list[str]) -> tuple[list[int], list[Any]]:
    from server.providers.local.engines import EMBEDDING_MAX_TOKENS

    counts = engine.count_tokens(texts)
    for index, count in enumerate(counts):
        if count > EMBEDDING_MAX_TOKENS:
            raise errors.InvalidRequest(
                f"input[{index}] has {count} tokens; {EMBEDDING_MODEL} reads at most {EMBEDDING_MAX_TOKENS}",
                field="input",
            )
    return counts, list(engine.embed(texts))


def _encode_vector(vector: Any, encoding: str) -> Any:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return [float(x) for x in vector]


def _voice(requested: str, installed: list[str]) -> str:
    name = requested.lower()
    if name in installed:
        return name
    if name in OPENAI_VOICES:
        return DEFAULT_VOICE
    known = ", ".join([*installed, *sorted(OPENAI_VOICES)])
    raise errors.InvalidRequest(f"unknown voice {requested[:32]!r}; local voices: {known}", field="voice")


def _transcribe(
    engine: TranscriptionEngine, data: bytes, filename: str, response_format: str, with_words: bool
) -> tuple[str, bytes]:
    from server.providers.local.audio import decode_for_transcription, render_transcription
    from server.providers.local.engines import TRANSCRIPTION_RATE

    pcm = decode_for_transcription(data, filename)
    words = engine.transcribe(pcm)
    duration = len(pcm) / 2 / TRANSCRIPTION_RATE
    return render_transcription(words, duration, response_format or "json", with_words)
