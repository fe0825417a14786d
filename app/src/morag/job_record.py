"""The job's types: what is stored in Redis (``JobRecord``) and what clients see (``Job``).

One set of pydantic models serves the job store (``morag.jobs``), the routing core, the
workers and the HTTP API (``morag.api.schemas`` re-exports them), so a field means the same
thing everywhere and no module reads a job through string keys. ``JobRecord`` extends the
public ``Job`` with the bookkeeping clients never see.

Stored structures allow members they do not know (``extra="allow"``): during a rolling
update an older worker reads, changes and writes back a record written by a newer API
without dropping what it does not understand.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


# A str enum: JSON holds the plain strings, and ``status == "queued"`` still holds.
class JobStatus(str, Enum):
    """A job's state. ``succeeded``, ``failed`` and ``cancelled`` are final."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    def __str__(self) -> str:  # "queued", not "JobStatus.queued", in logs and labels
        return str(self.value)

    @property
    def final(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})


class Open(BaseModel):
    """A stored structure: known members typed, new members passed through."""

    model_config = ConfigDict(extra="allow")


class Route(Open):
    """Where a job was sent and why. ``code`` is stable and machine-readable:
    not_requested, gpu_worker, no_gpu_worker, no_capable_gpu, backlog, gpu_failure,
    worker_lost, rescued. ``reason`` is for people."""

    queue: str = Field(examples=["gpu-tasks"])
    gpu_requested: bool
    code: str = Field(examples=["gpu_worker"])
    reason: str

    @model_validator(mode="before")
    @classmethod
    def _older_records(cls, data: Any) -> Any:
        # Records written before route codes existed are read as code "unknown".
        if isinstance(data, dict) and "code" not in data:
            return {**data, "code": "unknown"}
        return data


class Attempt(Open):
    """One run of the job on one worker."""

    queue: str
    worker: str
    device: str = Field(description="cpu or cuda")
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None

    @property
    def open(self) -> bool:
        return self.finished_at is None


class Word(Open):
    start: float
    end: float
    word: str
    probability: float | None = None


class Segment(Open):
    start: float = Field(description="seconds")
    end: float = Field(description="seconds")
    text: str
    words: list[Word] | None = Field(
        default=None, description="with options.word_timestamps = true"
    )


class Result(Open):
    """What a processor produced. Audio, video and YouTube add ``segments`` and
    ``metadata.device``, ``metadata.model``, ``metadata.duration``, ``metadata.language``;
    ``subtitles`` holds the formats asked for in ``options.subtitles``."""

    content: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    segments: list[Segment] | None = None
    subtitles: dict[str, str] | None = Field(
        default=None, description="format (srt, vtt) -> subtitle file text"
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="what a client should know about a result that still succeeded, "
        "e.g. no speech found in the audio (silence is not an error, but not a transcript)",
    )


class Source(Open):
    """What the job processes: an upload in the shared directory, or a URL."""

    type: Literal["file", "url"]
    url: str | None = None  # type url
    file_id: str | None = None  # type file: the upload's id (never a client's path)
    sha256: str | None = None
    size: int | None = None
    filename: str | None = None  # the client's name for it, for people only

    @classmethod
    def upload(cls, *, file_id: str, sha256: str, size: int, filename: str) -> Source:
        return cls(type="file", file_id=file_id, sha256=sha256, size=size, filename=filename)

    @classmethod
    def link(cls, url: str) -> Source:
        return cls(type="url", url=url)

    @property
    def label(self) -> str:
        """How the source is named in stored chunks and logs."""
        if self.type == "url":
            return str(self.url)
        return str(self.filename or self.file_id)


class Webhook(BaseModel):
    url: str
    signed: bool = Field(description="deliveries carry Standard Webhooks signatures")
    note: str | None = Field(default=None, description="why they are not signed")


class Job(BaseModel):
    """A job as clients see it."""

    task_id: str
    status: JobStatus
    content_type: str
    route: Route
    progress: float = Field(ge=0, le=1)
    attempts: list[Attempt]
    result: Result | None = None
    error: str | None = None
    created_at: str
    updated_at: str
    batch_id: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    waiting_for: str | None = Field(
        default=None, description="what a job that is not moving waits for (e.g. a store worker)"
    )
    webhook: Webhook | None = Field(
        default=None, description="the job's webhook, and whether its deliveries are signed"
    )


class JobRecord(Job):
    """The stored job: the public fields plus what the store, workers and watchdog keep."""

    model_config = ConfigDict(extra="allow")

    kind: str = "process"  # "process" (answer only) or "ingest"
    source: Source
    options: dict[str, Any] = Field(default_factory=dict)
    webhook_url: str | None = None
    store: bool = False  # the result goes to the morag-store worker before the job ends
    queued_at: str | None = None  # when it last entered `queued` (None once claimed)
    progress: float = Field(default=0.0, ge=0, le=1)
    deliveries: int = 0
    force_cpu: bool = False  # a GPU failed it: every further attempt runs on the CPU
    owner: str | None = None  # "worker/pid" of the current attempt, should its lease lapse
    storing: bool = False  # handed to the store worker
    store_resend_at: float | None = None  # epoch seconds: when the store message is resent
    # Epoch seconds: when a reconciler last sent the message of this queued job again,
    # having found its queue empty and nobody running it (morag.supervisor).
    resent_at: float | None = None
    # Workers that got the job's message but do not offer its content type (a broken model,
    # a missing extra): the message went back to the queue for another worker.
    declined_by: list[str] = Field(default_factory=list)
    # A long recording split across workers (morag.split_jobs): a piece names its job, the
    # job lists its current attempt's pieces (cancelled with it).
    parent_id: str | None = None
    pieces: list[str] = Field(default_factory=list)

    def public(self) -> Job:
        """What clients see (internal bookkeeping stays out). The fields were validated when
        the record was read: no second validation of a long transcript."""
        return Job.model_construct(**{name: getattr(self, name) for name in Job.model_fields})

    @property
    def upload_id(self) -> str | None:
        """The shared directory's upload this job reads, if it reads one."""
        return self.source.file_id if self.source.type == "file" else None

    @property
    def open_attempt(self) -> Attempt | None:
        """The attempt still running, if the last one has not finished."""
        if self.attempts and self.attempts[-1].open:
            return self.attempts[-1]
        return None

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, raw: str | bytes) -> JobRecord:
        return cls.model_validate_json(raw)
