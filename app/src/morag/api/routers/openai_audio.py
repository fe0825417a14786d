"""``/v1/audio/transcriptions`` and ``/v1/audio/translations``: OpenAI's transcription API
on the fleet, for the ``openai`` SDK and every tool built on it.

The request fields and the answers are OpenAI's (``response_format`` json, text, srt, vtt,
verbose_json; ``timestamp_granularities[]`` segment, word); the API key travels as
``Authorization: Bearer <key>``. The job takes the same path as ``/process/file``: the
upload lands in the shared directory, ``gpu`` (form field; default MORAG_OPENAI_GPU) picks
the route with the usual CPU fallback, and the answer waits for the result (at most
MORAG_OPENAI_WAIT seconds; then 504 with the job id, which ``/api/v1/status`` still serves).
Two additions: ``vad_filter`` (skip silence) and the ``X-MoRAG-*`` answer headers.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, Header, Request, UploadFile
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from morag import files, subtitles
from morag.api.deps import (
    AuthFailure,
    IdempotencyHeader,
    IdempotencyKey,
    _matches,
    accept_upload,
    services,
    wait_for_end,
)
from morag.api.errors import ApiError
from morag.api.languages import language_name
from morag.idempotency import Idempotency
from morag.job_record import JobRecord, Result
from morag.jobs import QUEUED, RUNNING, SUCCEEDED
from morag.submission import BadInput, Services, submit
from morag.submission import cancel as cancel_job

DEFAULT_MODEL = "whisper-1"  # OpenAI's name; here: the configured MORAG_WHISPER_MODEL
SPEECH_TYPES = ("audio", "video")

ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
Granularity = Literal["segment", "word"]


# -- OpenAI's bodies -----------------------------------------------------------------------


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(examples=["invalid_request_error"])
    param: str | None = None
    code: str | None = Field(default=None, examples=["invalid_input"])


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


class Usage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: int = Field(ge=0)


class Transcription(BaseModel):
    """``response_format=json``."""

    text: str
    usage: Usage | None = None


class VerboseSegment(BaseModel):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class VerboseWord(BaseModel):
    word: str
    start: float
    end: float


class TranscriptionVerbose(BaseModel):
    """``response_format=verbose_json``; ``words`` with ``timestamp_granularities[]=word``."""

    task: Literal["transcribe", "translate"]
    language: str = Field(description="ISO 639-1 code of the spoken (detected) language")
    duration: float
    text: str
    segments: list[VerboseSegment] | None = None
    words: list[VerboseWord] | None = None
    usage: Usage | None = None


OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIError, "description": text}
    for status, text in {
        400: "invalid request, or audio that cannot be transcribed",
        401: "missing or invalid API key",
        403: "invalid API key",
        413: "upload too large",
        415: "not an audio or video file",
        # Declared so the schema has no FastAPI default here: invalid fields answer 400.
        409: "a request with the same Idempotency-Key is still being submitted",
        422: "not answered by these routes (invalid fields: 400, as OpenAI does)",
        503: "Redis unavailable",
        504: "no result within MORAG_OPENAI_WAIT (the job goes on: X-MoRAG-Task-Id)",
    }.items()
}
ANSWERS: dict[int | str, dict[str, Any]] = {
    **OPENAI_ERRORS,
    200: {
        "description": "json and verbose_json: a JSON object; text, srt, vtt: plain text",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    },
}


# -- authentication ------------------------------------------------------------------------


def bearer_key(authorization: str | None, keys: list[str]) -> None:
    """``Authorization: Bearer <API key>`` (OpenAI's SDKs send nothing else); raises
    AuthFailure. Also used by the ASGI guard, before the upload is read."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise AuthFailure(
            401, "missing API key: send Authorization: Bearer <API key>", "no_api_key"
        )
    if not _matches(given.strip(), keys):
        raise AuthFailure(401, "invalid API key", "invalid_api_key")


def require_bearer(request: Request, authorization: str | None = Header(default=None)) -> None:
    try:
        bearer_key(authorization, services(request).settings.api_key_values())
    except AuthFailure as exc:
        raise ApiError(
            exc.status, exc.detail, exc.code, headers={"WWW-Authenticate": "Bearer"}
        ) from exc


CLIENT_GONE = "cancelled: the client closed the connection before the transcription ended"

router = APIRouter(prefix="/v1/audio", tags=["openai"], dependencies=[Depends(require_bearer)])


# -- the job -------------------------------------------------------------------------------


def _check_model(model: str, svc: Services) -> None:
    accepted = {DEFAULT_MODEL, svc.settings.whisper_model}
    if model not in accepted:
        raise ApiError(
            400,
            f"model {model!r} is not served here: use {' or '.join(sorted(accepted))} "
            "(the fleet runs MORAG_WHISPER_MODEL)",
            "model_not_found",
            param="model",
        )


def _submit(
    svc: Services,
    upload: UploadFile,
    options: dict[str, Any],
    gpu: bool,
    key: IdempotencyHeader | None,
    route: str,
) -> tuple[JobRecord, Idempotency | None]:
    accepted = accept_upload(svc, upload, {})
    if accepted.content_type not in SPEECH_TYPES:
        if accepted.source.file_id:
            files.remove_upload(svc.settings.uploads_dir, accepted.source.file_id)
        raise BadInput(
            415,
            f"{upload.filename or 'the file'} is {accepted.content_type}, not audio or "
            "video: nothing to transcribe",
        )
    src = accepted.source
    idem = key.bind(route, [src.sha256, src.size, src.filename, gpu, options]) if key else None
    record = submit(
        svc,
        kind="process",
        content_type=accepted.content_type,
        source=src,
        options=options,
        gpu=gpu,
        idem=idem,
    )
    return record, idem


def _headers(record: JobRecord) -> dict[str, str]:
    return {
        "X-MoRAG-Task-Id": record.task_id,
        "X-MoRAG-Queue": record.route.queue,
        "X-MoRAG-Route": record.route.code,
    }


def _verbose(result: Result, task: str, granularities: list[str]) -> dict[str, Any]:
    meta = result.metadata
    segments = result.segments or []
    body: dict[str, Any] = {
        "task": task,
        "language": language_name(meta.get("language")),
        "duration": float(meta.get("duration") or 0.0),
        "text": result.content,
        "usage": _usage(meta),
    }
    if "segment" in granularities or not granularities:
        # Decoding details (tokens, scores) are extra members of a segment (segment_details).
        body["segments"] = [
            {
                "id": getattr(s, "id", n),
                "seek": getattr(s, "seek", 0),
                "start": s.start,
                "end": s.end,
                "text": s.text,
                "tokens": getattr(s, "tokens", []),
                "temperature": getattr(s, "temperature", None) or 0.0,
                "avg_logprob": getattr(s, "avg_logprob", 0.0),
                "compression_ratio": getattr(s, "compression_ratio", 0.0),
                "no_speech_prob": getattr(s, "no_speech_prob", 0.0),
            }
            for n, s in enumerate(segments)
        ]
    if "word" in granularities:
        body["words"] = [
            {"word": w.word.strip(), "start": w.start, "end": w.end}
            for s in segments
            for w in s.words or []
        ]
    return body


def _usage(meta: dict[str, Any]) -> dict[str, Any]:
    return {"type": "duration", "seconds": math.ceil(float(meta.get("duration") or 0.0))}


def render(
    result: Result, fmt: str, task: str, granularities: list[str], headers: dict[str, str]
) -> Response | BaseModel:
    if fmt == "text":
        return PlainTextResponse(result.content + "\n", headers=headers)
    if fmt in subtitles.FORMATS:
        media = "text/vtt" if fmt == "vtt" else "text/plain"
        segments = [s.model_dump() for s in result.segments or []]
        return PlainTextResponse(subtitles.render(fmt, segments), media_type=media, headers=headers)
    if fmt == "verbose_json":
        return TranscriptionVerbose.model_validate(_verbose(result, task, granularities))
    return Transcription(text=result.content, usage=_usage(result.metadata))


async def _run(
    *,
    svc: Services,
    file: UploadFile,
    model: str,
    task: str,
    language: str | None,
    prompt: str | None,
    temperature: float | None,
    fmt: str,
    granularities: list[str],
    vad_filter: bool,
    gpu: bool | None,
    response: Response,
    request: Request,
    key: IdempotencyHeader | None,
) -> Any:
    _check_model(model, svc)
    if granularities and fmt != "verbose_json":
        raise ApiError(
            400,
            "timestamp_granularities[] needs response_format=verbose_json",
            "invalid_input",
            param="timestamp_granularities",
        )
    options: dict[str, Any] = {
        "task": task,
        "vad_filter": vad_filter,
        "word_timestamps": "word" in granularities,
        "segment_details": fmt == "verbose_json",
    }
    if language:
        options["language"] = language
    if prompt:
        options["prompt"] = prompt
    if temperature is not None:
        options["temperature"] = temperature
    use_gpu = svc.settings.openai_gpu if gpu is None else gpu
    try:
        record, idem = await run_in_threadpool(
            _submit, svc, file, options, use_gpu, key, f"audio/{task}"
        )
    except BadInput as exc:
        raise ApiError(exc.status, exc.detail, exc.code, param="file") from exc
    final = (
        await wait_for_end(
            svc, record.task_id, svc.settings.openai_wait, stop=request.is_disconnected
        )
        or record
    )
    if final.status in (QUEUED, RUNNING) and await request.is_disconnected():
        # The answer is the only way to the result here: nobody will read it, so the
        # fleet stops working on it (as OpenAI's own endpoint does).
        await run_in_threadpool(cancel_job, svc, final.task_id, CLIENT_GONE)
        if idem is not None:
            # Nobody got this job's answer: a retry with the same key starts it anew.
            await run_in_threadpool(svc.redis.delete, idem.redis_key)
        return Response(status_code=499)  # "client closed request"; no one receives it
    headers = _headers(final)
    if final.status == SUCCEEDED:
        response.headers.update(headers)
        result = final.result or Result(content="")
        return render(result, fmt, task, granularities, headers)
    if final.status in (QUEUED, RUNNING):
        raise ApiError(
            504,
            f"no result within {svc.settings.openai_wait:.0f}s; the job goes on: "
            f"GET /api/v1/status/{final.task_id}",
            "timeout",
            headers=headers,
        )
    raise ApiError(
        400,
        f"transcription failed (job {final.task_id}): {final.error or final.status}",
        "processing_failed",
        param="file",
        headers=headers,
    )


# -- the routes ----------------------------------------------------------------------------

_GPU = Form(
    default=None,
    description="run on a GPU worker when one is alive (default: MORAG_OPENAI_GPU)",
)
_VAD = Form(default=False, description="skip silence (faster-whisper's Silero VAD)")
_FORMAT = Form(default="json", description="json, text, srt, vtt or verbose_json")
_MODEL = Form(description=f"{DEFAULT_MODEL} (or MORAG_WHISPER_MODEL's name)")
_TEMPERATURE = Form(default=None, ge=0, le=1)
_PROMPT = Form(default=None, max_length=2000)


@router.post(
    "/transcriptions",
    response_model=Transcription | TranscriptionVerbose,
    responses=ANSWERS,
    summary="Transcribe audio (OpenAI-compatible)",
)
async def transcriptions(
    response: Response,
    request: Request,
    file: UploadFile = File(..., description="audio or video"),
    model: str = _MODEL,
    language: str | None = Form(default=None, min_length=2, max_length=8),
    prompt: str | None = _PROMPT,
    temperature: float | None = _TEMPERATURE,
    response_format: ResponseFormat = _FORMAT,
    timestamp_granularities: list[Granularity] = Form(
        default=[], alias="timestamp_granularities[]", description="segment and/or word"
    ),
    vad_filter: bool = _VAD,
    gpu: bool | None = _GPU,
    svc: Services = Depends(services),
    key: IdempotencyHeader | None = IdempotencyKey,
) -> Any:
    return await _run(
        svc=svc,
        file=file,
        model=model,
        task="transcribe",
        language=language,
        prompt=prompt,
        temperature=temperature,
        fmt=response_format,
        granularities=list(dict.fromkeys(timestamp_granularities)),
        vad_filter=vad_filter,
        gpu=gpu,
        response=response,
        request=request,
        key=key,
    )


@router.post(
    "/translations",
    response_model=Transcription | TranscriptionVerbose,
    responses=ANSWERS,
    summary="Translate audio into English text (OpenAI-compatible)",
)
async def translations(
    response: Response,
    request: Request,
    file: UploadFile = File(..., description="audio or video"),
    model: str = _MODEL,
    prompt: str | None = _PROMPT,
    temperature: float | None = _TEMPERATURE,
    response_format: ResponseFormat = _FORMAT,
    vad_filter: bool = _VAD,
    gpu: bool | None = _GPU,
    svc: Services = Depends(services),
    key: IdempotencyHeader | None = IdempotencyKey,
) -> Any:
    return await _run(
        svc=svc,
        file=file,
        model=model,
        task="translate",
        language=None,
        prompt=prompt,
        temperature=temperature,
        fmt=response_format,
        granularities=[],
        vad_filter=vad_filter,
        gpu=gpu,
        response=response,
        request=request,
        key=key,
    )
