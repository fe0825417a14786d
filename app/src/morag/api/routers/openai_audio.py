"""``/v1/audio/transcriptions`` and ``/v1/audio/translations``: OpenAI's transcription API
on the fleet, for the ``openai`` SDK and every tool built on it.

The request fields and the answers are OpenAI's (``response_format`` json, text, srt, vtt,
verbose_json; ``timestamp_granularities[]`` segment, word); the API key travels as
``Authorization: Bearer <key>``. The job takes the same path as ``/process/file``: the
upload lands in the shared directory, ``gpu`` (form field; default MORAG_OPENAI_GPU) picks
the route with the usual CPU fallback, and the answer waits for the result (at most
MORAG_OPENAI_WAIT seconds; then 504 with the job id, which ``/api/v1/status`` still serves).
Two additions: ``vad_filter`` (skip silence) and the ``X-MoRAG-*`` answer headers.
``stream=true`` (transcriptions, json or text) answers Server-Sent Events as the worker
transcribes, in OpenAI's shape (``morag.api.live``); it waits for news, not for the end.

An answer whose job goes on (the 504, or a Redis failure while waiting) carries
``x-should-retry: false``: the SDKs retry any 5xx (the Python SDK twice), and each retry
would start another job. ``GET /v1/models`` lists the served model (what speaches and Open
WebUI ask first). What these routes cannot do is refused before a job is queued, with the
``param`` (``language`` the model does not speak, ``include[]``, ``chunking_strategy``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import redis
from fastapi import APIRouter, Depends, File, Form, Request, Security, UploadFile
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from morag import files, subtitles
from morag.api import live
from morag.api.deps import (
    OPENAI_BEARER_SCHEME,
    AuthFailure,
    IdempotencyHeader,
    IdempotencyKey,
    _matches,
    accept_upload,
    bearer_header,
    services,
    wait_for_end,
)
from morag.api.errors import ApiError
from morag.api.languages import language_name, language_problem
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
        400: "invalid request: a field, a file that is not audio or cannot be decoded, "
        "an unsupported language, include[] or chunking_strategy",
        401: "missing or invalid API key (code invalid_api_key)",
        403: "invalid API key",
        404: "no such model",
        413: "upload too large",
        # Declared so the schema has no FastAPI default here: invalid fields answer 400.
        409: "a request with the same Idempotency-Key is still being submitted",
        422: "not answered by these routes (invalid fields: 400, as OpenAI does)",
        503: "Redis unavailable (x-should-retry: false when a job was already queued)",
        504: "no result within MORAG_OPENAI_WAIT (the job goes on: X-MoRAG-Task-Id; "
        "x-should-retry: false, so the SDKs do not start another)",
    }.items()
}
# Transcription routes; 404 is /v1/models/{model}'s alone.
ANSWERS: dict[int | str, dict[str, Any]] = {
    **{status: answer for status, answer in OPENAI_ERRORS.items() if status != 404},
    200: {
        "description": "json and verbose_json: a JSON object; text, srt, vtt: plain text",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    },
}
# The transcription route also streams (stream=true): OpenAI's Server-Sent Events.
STREAM_ANSWER = {
    "description": "json and verbose_json: a JSON object; text, srt, vtt: plain text; "
    "stream=true: Server-Sent Events (`transcript.text.delta` as segments are transcribed, "
    "then `transcript.text.done` with the whole text; an `error` event if the job fails)",
    "content": {
        "text/plain": {"schema": {"type": "string"}},
        "text/event-stream": {"schema": {"type": "string"}},
    },
}
STREAM_FORMATS = ("json", "text")  # the stream's shape is the same for both


# -- authentication ------------------------------------------------------------------------


def bearer_key(authorization: str | None, keys: list[str]) -> None:
    """``Authorization: Bearer <API key>`` (OpenAI's SDKs send nothing else); raises
    AuthFailure. Also used by the ASGI guard, before the upload is read."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        # OpenAI's code for every refused key: clients test it to tell "fix your key".
        raise AuthFailure(
            401, "missing API key: send Authorization: Bearer <API key>", "invalid_api_key"
        )
    if not _matches(given.strip(), keys):
        raise AuthFailure(401, "invalid API key", "invalid_api_key")


def require_bearer(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Security(OPENAI_BEARER_SCHEME),
) -> None:
    try:
        bearer_key(bearer_header(credentials), services(request).settings.api_key_values())
    except AuthFailure as exc:
        raise ApiError(
            exc.status, exc.detail, exc.code, headers={"WWW-Authenticate": "Bearer"}
        ) from exc


CLIENT_GONE = "cancelled: the client closed the connection before the transcription ended"
# OpenAI's SDKs obey this (non-standard) header before their own retry rules.
NO_RETRY = {"x-should-retry": "false"}

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_bearer)])


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


def _check_language(language: str, svc: Services) -> str:
    problem = language_problem(language, svc.settings.whisper_model)
    if problem is not None:
        raise ApiError(400, problem, "unsupported_language", param="language")
    return language.lower()


# Form fields of OpenAI's API this service does not implement, refused rather than
# ignored (a client would get an answer without what it asked for). The SDK sends lists
# as ``include[]`` and objects as ``chunking_strategy[type]``.
UNSUPPORTED_FIELDS = {
    "include": "include[] (logprobs) is not supported: Whisper models return no logprobs",
    "chunking_strategy": "chunking_strategy is not supported: use vad_filter=true to skip silence",
}


async def _refuse_unsupported(request: Request) -> None:
    form = await request.form()  # parsed already for the route's fields: no second read
    for name in form:
        base = name.split("[", 1)[0]
        if base in UNSUPPORTED_FIELDS:
            raise ApiError(400, UNSUPPORTED_FIELDS[base], "unsupported_parameter", param=base)


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
            400,
            f"{upload.filename or 'the file'} is {accepted.content_type}, not audio or "
            "video: nothing to transcribe",
            "unsupported_type",
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
    stream: bool = False,
) -> Any:
    _check_model(model, svc)
    await _refuse_unsupported(request)
    if language:
        language = _check_language(language, svc)
    if stream and fmt not in STREAM_FORMATS:
        raise ApiError(
            400,
            f"stream=true streams text: response_format must be json or text, not {fmt}",
            "invalid_input",
            param="response_format",
        )
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
    if stream:
        events = live.transcript_events(
            svc,
            record.task_id,
            client_gone=CLIENT_GONE,
            forget=idem.redis_key if idem is not None else None,
        )
        return StreamingResponse(
            events,
            media_type="text/event-stream",
            # No caching or proxy buffering: each event is worth sending at once.
            headers={**_headers(record), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        final = (
            await wait_for_end(
                svc, record.task_id, svc.settings.openai_wait, stop=request.is_disconnected
            )
            or record
        )
    except redis.RedisError as exc:
        # The job is queued: a retry would queue another one.
        raise ApiError(
            503,
            f"Redis unavailable ({type(exc).__name__}) while waiting; the job goes on: "
            f"GET /api/v1/status/{record.task_id}",
            "unavailable",
            headers={**_headers(record), **NO_RETRY},
        ) from exc
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
            headers={**headers, **NO_RETRY},
        )
    raise ApiError(
        400,
        f"transcription failed (job {final.task_id}): {final.error or final.status}",
        "processing_failed",
        param="file",
        headers={**headers, **NO_RETRY},
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
    "/audio/transcriptions",
    response_model=Transcription | TranscriptionVerbose,
    responses={**ANSWERS, 200: STREAM_ANSWER},
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
    stream: bool = Form(
        default=False,
        description="Server-Sent Events as the worker transcribes (json or text format)",
    ),
    svc: Services = Depends(services),
    key: IdempotencyHeader | None = IdempotencyKey,
) -> Any:
    return await _run(
        svc=svc,
        file=file,
        model=model,
        task="transcribe",
        stream=stream,
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
    "/audio/translations",
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


# -- models --------------------------------------------------------------------------------


class Model(BaseModel):
    """OpenAI's model object."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default=0, description="not tracked: 0")
    owned_by: str = "morag"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


def served_models(svc: Services) -> list[Model]:
    """What ``model`` accepts: OpenAI's name and MORAG_WHISPER_MODEL's, one model."""
    names = dict.fromkeys([DEFAULT_MODEL, svc.settings.whisper_model])
    return [Model(id=name) for name in names]


@router.get(
    "/models",
    response_model=ModelList,
    responses={s: OPENAI_ERRORS[s] for s in (401, 503)},
    summary="The served transcription model (OpenAI-compatible)",
)
async def list_models(svc: Services = Depends(services)) -> ModelList:
    return ModelList(data=served_models(svc))


@router.get(
    "/models/{model:path}",
    response_model=Model,
    responses={s: OPENAI_ERRORS[s] for s in (401, 404, 422, 503)},
    summary="One served model (OpenAI-compatible)",
)
async def retrieve_model(model: str, svc: Services = Depends(services)) -> Model:
    for served in served_models(svc):
        if served.id == model:
            return served
    raise ApiError(404, f"model {model!r} is not served here", "model_not_found", param="model")
