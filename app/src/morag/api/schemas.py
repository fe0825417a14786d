"""Every request and response body of the HTTP API, as pydantic models.

The routers declare these as ``response_model`` so ``/openapi.json`` (and docs/api.md,
generated from it) describes what the API really answers; schemathesis checks it.

Parameter placement, the same on every route ("one way per parameter"):
- Job parameters (``gpu``, ``options``, ``metadata``, ``webhook_url``) travel in the request
  body: form fields in a multipart upload, members of the JSON object otherwise.
- The query string carries only read modifiers: ``wait`` (long-poll), ``limit``/``offset``
  (paging), ``source`` (what to delete). ``?gpu=`` on ``/process/*`` is still read for old
  clients but is deprecated.
- Lists are paged: ``limit`` (1-500, default 100) and ``offset``; the answer holds the
  page and ``total``.

The job and its parts (``Job``, ``Route``, ``Attempt``, ``Result``, ...) are the models the
job store keeps (``morag.job_record``); the stored record extends ``Job`` with bookkeeping.
Models that mirror stored records allow extra members so a new field in a record never
turns an answer into a 500.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

# The job's own models, one definition for the store, the workers and this contract;
# re-exported here (``as``) with the rest of the contract.
from morag.job_record import Attempt as Attempt
from morag.job_record import Job as Job
from morag.job_record import JobStatus as JobStatus
from morag.job_record import Open as Open
from morag.job_record import Result as Result
from morag.job_record import Route as Route
from morag.job_record import Segment as Segment
from morag.job_record import Webhook as Webhook
from morag.job_record import Word as Word

# -- shared pieces -------------------------------------------------------------------------


class ErrorBody(BaseModel):
    """Every error of the native API. ``code`` is stable and machine-readable."""

    detail: str = Field(description="for people")
    code: str = Field(
        description="unauthorized, forbidden, not_found, conflict, too_large, "
        "unsupported_type, invalid_input, processing_failed, unavailable, internal_error",
        examples=["invalid_input"],
    )
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="per-field problems of a request that failed validation"
    )


# Error statuses every authenticated route can answer; routers add their own.
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing credentials"},
    403: {"model": ErrorBody, "description": "invalid credentials"},
    422: {"model": ErrorBody, "description": "invalid input"},
    503: {"model": ErrorBody, "description": "a dependency (Redis, the store worker) is down"},
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """COMMON_ERRORS plus the given statuses, all with the ErrorBody model."""
    described = {
        404: "unknown id",
        409: "the job already ended",
        413: "upload too large",
        415: "unsupported content type",
        504: "no answer in time",
    }
    more = {s: {"model": ErrorBody, "description": described.get(s, "error")} for s in statuses}
    return {**COMMON_ERRORS, **more}


# Routes that take an Idempotency-Key (morag.idempotency) may answer 409 besides errors().
KEY_IN_USE: dict[int | str, dict[str, Any]] = {
    409: {
        "model": ErrorBody,
        "description": "a request with the same Idempotency-Key is still being submitted",
    }
}


# -- job options ---------------------------------------------------------------------------

SubtitleFormat = Literal["srt", "vtt"]


class JobOptions(Open):
    """``options``: what the processor should do. The members below are checked here, and a
    near-miss of one (``subtitle``) is refused; other unknown members are passed to the
    processor as they are."""

    content_type: str | None = Field(
        default=None, description="force a processor (audio, video, document, ...)"
    )
    language: str | None = Field(
        default=None,
        min_length=2,
        max_length=8,
        description="spoken language (ISO 639-1); unset: detected (metadata.language)",
    )
    task: Literal["transcribe", "translate"] = Field(
        default="transcribe", description="translate: transcribe into English"
    )
    word_timestamps: bool = Field(default=False, description="segments[].words with times")
    vad_filter: bool = Field(
        default=False, description="skip silence with faster-whisper's bundled Silero VAD"
    )
    subtitles: list[SubtitleFormat] = Field(
        default_factory=list, description="result.subtitles in these formats"
    )
    # openai/whisper's writer options; unset: one cue per segment, as before.
    max_line_width: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        strict=True,  # a JSON number: not true, not "20"
        description="subtitles: wrap cue text into lines of at most this many characters",
    )
    max_line_count: int | None = Field(
        default=None,
        ge=1,
        le=100,
        strict=True,  # a JSON number: not true, not "20"
        description="subtitles: at most this many lines per cue (a segment becomes several "
        "cues); needs max_line_width",
    )
    batched: bool | None = Field(
        default=None,
        strict=True,  # a JSON boolean or null: not "yes", not 1
        description="audio/video: faster-whisper's batched pipeline (cuts at silences with "
        "VAD, decodes several 30 s pieces at once); unset: batched for audio of 30 s or more "
        "on a GPU, 120 s or more on a CPU (metadata.batched, metadata.batch_size say what ran)",
    )
    split: bool | None = Field(
        default=None,
        strict=True,  # a JSON boolean or null: not "yes", not 1
        description="audio/video: cut a long recording at silences into pieces that idle "
        "workers of its queue transcribe in parallel, merged into one transcript; unset: "
        "from MORAG_SPLIT_MIN_SECONDS (default 300 s) when a worker is idle; false: always "
        "whole; true: whatever its length, in pieces of at least 10 s (metadata.split says "
        "what ran)",
    )
    prompt: str | None = Field(default=None, max_length=2000, description="initial prompt")
    temperature: float | None = Field(default=None, ge=0, le=1)
    beam_size: int = Field(default=1, ge=1, le=10)
    ocr_languages: str | None = Field(
        default=None,
        max_length=100,
        pattern=r"^[A-Za-z_]+(\+[A-Za-z_]+)*$",
        description="tesseract languages for images, e.g. eng+deu",
    )

    @field_validator("max_line_count")
    @classmethod
    def _count_needs_width(cls, count: int | None, info: ValidationInfo) -> int | None:
        # Lines come from wrapping at max_line_width: without it a segment is one line.
        # (A width that failed its own check is not in info.data: no second complaint.)
        if count is not None and info.data.get("max_line_width", 0) is None:
            raise ValueError("needs max_line_width (lines are made by wrapping at that width)")
        return count


# -- requests ------------------------------------------------------------------------------

# The schema states what the API checks (urls.check_url): http(s) only. Whether the host is
# public and resolves is decided at submission (422), which no schema can express.
HTTP_URL = Field(
    min_length=1,
    max_length=4096,
    json_schema_extra={"pattern": "^[Hh][Tt][Tt][Pp][Ss]?://", "format": "uri"},
    description="http(s) URL of a public host (or one in MORAG_URL_ALLOWLIST)",
)


class ProcessUrl(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = HTTP_URL
    gpu: bool | None = Field(default=None, description="run on a GPU worker when one is alive")
    options: dict[str, Any] = Field(default_factory=dict, description="see JobOptions")


class IngestUrl(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = HTTP_URL
    gpu: bool = False
    metadata: dict[str, Any] = Field(default_factory=dict, description="stored with the chunks")
    options: dict[str, Any] = Field(default_factory=dict, description="see JobOptions")
    webhook_url: str | None = Field(default=None, max_length=4096)


class BatchItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = HTTP_URL
    options: dict[str, Any] = Field(default_factory=dict, description="see JobOptions")


class IngestBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[BatchItem] = Field(min_length=1, max_length=500)
    gpu: bool = False
    webhook_url: str | None = Field(default=None, max_length=4096)


# A number matches stored integers and floats alike; NaN and infinities are no value (422).
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
FilterValue = str | int | FiniteFloat | bool | list[str] | list[int]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=4000)
    limit: int = Field(default=5, ge=1, le=100)
    filter: dict[str, FilterValue] | None = Field(
        default=None, description="payload member -> value (a list: any of)"
    )


# -- responses -----------------------------------------------------------------------------


class Processed(BaseModel):
    """``/process/*`` when the job ended in time."""

    task_id: str
    route: Route
    result: Result
    processing_time: float = Field(description="seconds, submission to answer")


class StillRunning(BaseModel):
    """``/process/*`` (202) when the job outlasts MORAG_PROCESS_WAIT: poll its status."""

    task_id: str
    route: Route
    status: JobStatus


class Accepted(BaseModel):
    """``/api/v1/ingest/file`` and ``/url`` (202)."""

    task_id: str
    status: JobStatus
    content_type: str
    route: Route
    webhook: Webhook | None = None


class BatchAccepted(BaseModel):
    batch_id: str
    task_ids: list[str]
    routes: list[Route]


class Cancelled(BaseModel):
    task_id: str
    status: JobStatus


class Page(BaseModel):
    total: int = Field(ge=0, description="items in the whole list")
    count: int = Field(ge=0, description="items in this page")
    offset: int = Field(ge=0)
    limit: int = Field(ge=1)


class JobPage(Page):
    jobs: list[Job]


class BatchStatus(BaseModel):
    batch_id: str
    total: int
    counts: dict[str, int] = Field(description="jobs by status")
    task_ids: list[str]


class QueueStats(BaseModel):
    pending: int = Field(ge=0, description="messages waiting")
    consumers: int = Field(ge=0, description="live workers consuming it")
    workers: list[str]


class QueuesAnswer(BaseModel):
    queues: dict[str, QueueStats]


class Worker(Open):
    """A live worker's heartbeat."""

    name: str
    queues: list[str]
    device: str
    busy: bool
    processors: list[str] = Field(default_factory=list)
    consuming: list[str] = Field(default_factory=list)
    gpus: list[dict[str, Any]] = Field(default_factory=list)


class WorkerPage(Page):
    workers: list[Worker]


class SearchHit(Open):
    score: float
    text: str


class SearchAnswer(BaseModel):
    query: str
    count: int
    results: list[SearchHit]


class Deleted(BaseModel):
    source: str
    deleted: int


class Health(BaseModel):
    """``GET /health``."""

    status: Literal["ok"]


class Readiness(BaseModel):
    """``GET /ready``: 200 ready or degraded, 503 not ready; ``checks`` per dependency."""

    status: Literal["ready", "degraded", "not ready"]
    checks: dict[str, str]
