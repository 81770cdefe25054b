"""Audio in and out of the local engines, in OpenAI's formats (pure functions).

Speech leaves the engine as 24 kHz mono float samples and is encoded with
libsndfile (the `soundfile` wheel bundles it, with LAME and Opus): mp3, opus (Ogg),
flac, wav (16-bit), pcm (raw 16-bit little-endian at 24 kHz, as OpenAI's). aac has
no packaged encoder and is refused. A request without a format gets mp3, like OpenAI.

Transcription reads what libsndfile reads (wav, flac, mp3, ogg/opus, aiff, ...),
mixes to mono and resamples to 16 kHz by linear interpolation (speech energy sits
well below the 8 kHz this keeps). Its text is rendered in OpenAI's five formats;
segments are the words between pauses of `PAUSE_S` or more.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from server.errors import InvalidRequest, UnsupportedFeature
from server.providers.local.engines import SPEECH_RATE, TRANSCRIPTION_RATE, Word

Floats = npt.NDArray[np.float32]

# format -> (libsndfile container, subtype, MIME type)
_ENCODINGS = {
    "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg"),
    "opus": ("OGG", "OPUS", "audio/ogg"),
    "flac": ("FLAC", "PCM_16", "audio/flac"),
    "wav": ("WAV", "PCM_16", "audio/wav"),
}
SPEECH_FORMATS = (*_ENCODINGS, "pcm")
PAUSE_S = 0.6
MAX_SEGMENT_WORDS = 16


def encode_speech(samples: Floats, response_format: str) -> tuple[str, bytes]:
    """(MIME type, file bytes) of 24 kHz mono `samples` in an OpenAI speech format."""
    clipped = np.clip(samples, -1.0, 1.0)
    if response_format == "pcm":
        return "audio/pcm", (clipped * 32767).astype("<i2").tobytes()
    encoding = _ENCODINGS.get(response_format)
    if encoding is None:
        raise UnsupportedFeature(
            f"local speech has no {response_format} encoder; use one of {', '.join(SPEECH_FORMATS)}",
            field="response_format",
        )
    import soundfile

    container, subtype, mime = encoding
    out = io.BytesIO()
    soundfile.write(out, clipped, SPEECH_RATE, format=container, subtype=subtype)
    return mime, out.getvalue()


def decode_for_transcription(data: bytes, filename: str) -> bytes:
    """16 kHz mono 16-bit PCM of an audio file, or InvalidRequest if it is none."""
    import soundfile

    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        raise InvalidRequest(
            f"file {filename[:64]!r} is not audio the local transcription can read "
            f"(wav, flac, mp3, ogg/opus, aiff): {exc}",
            field="file",
        ) from exc
    mono = np.asarray(samples.mean(axis=1), dtype=np.float32)
    return (np.clip(resample(mono, rate, TRANSCRIPTION_RATE), -1.0, 1.0) * 32767).astype("<i2").tobytes()


def resample(samples: Floats, rate: int, target: int) -> Floats:
    if rate == target or samples.size == 0:
        return samples
    count = int(samples.size * target / rate)
    positions = np.arange(count, dtype=np.float64) * rate / target
    return np.interp(positions, np.arange(samples.size), samples).astype(np.float32)


@dataclass(frozen=True, slots=True)
class Segment:
    id: int
    start: float
    end: float
    text: str


def segments(words: list[Word]) -> list[Segment]:
    """Words grouped into segments at pauses (and every MAX_SEGMENT_WORDS words)."""
    groups: list[list[Word]] = []
    for word in words:
        last = groups[-1] if groups else None
        if last and word.start_s - last[-1].end_s < PAUSE_S and len(last) < MAX_SEGMENT_WORDS:
            last.append(word)
        else:
            groups.append([word])
    return [
        Segment(index, group[0].start_s, group[-1].end_s, " ".join(w.text for w in group))
        for index, group in enumerate(groups)
    ]


def render_transcription(
    words: list[Word], duration_s: float, response_format: str, with_words: bool
) -> tuple[str, bytes]:
    """(MIME type, body) of a transcription in an OpenAI response_format."""
    text = " ".join(w.text for w in words)
    parts = segments(words)
    if response_format == "text":
        return "text/plain; charset=utf-8", (text + "\n").encode()
    if response_format == "srt":
        return "text/plain; charset=utf-8", _srt(parts).encode()
    if response_format == "vtt":
        return "text/vtt; charset=utf-8", _vtt(parts).encode()
    body: dict[str, object] = {"text": text}
    if response_format == "verbose_json":
        body = {"task": "transcribe", "language": "english", "duration": round(duration_s, 2), "text": text}
        body["segments"] = [_segment_json(s) for s in parts]
        if with_words:
            body["words"] = [{"word": w.text, "start": w.start_s, "end": w.end_s} for w in words]
    else:
        body["usage"] = {"type": "duration", "seconds": max(1, round(duration_s))}
    return "application/json", json.dumps(body).encode()


def _segment_json(segment: Segment) -> dict[str, object]:
    return {
        "id": segment.id,
        "seek": 0,
        "start": segment.start,
        "end": segment.end,
        "text": segment.text,
        "tokens": [],
        "temperature": 0.0,
        "avg_logprob": 0.0,
        "compression_ratio": 0.0,
        "no_speech_prob": 0.0,
    }


def _timestamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _srt(parts: list[Segment]) -> str:
    blocks = [f"{s.id + 1}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text}\n" for s in parts]
    return "\n".join(blocks)


def _vtt(parts: list[Segment]) -> str:
    blocks = [f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text}\n" for s in parts]
    return "WEBVTT\n\n" + "\n".join(blocks)
