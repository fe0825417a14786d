"""The one settings object. Every value comes from the environment (prefix ``MORAG_``)."""

from __future__ import annotations

import ipaddress
import ssl
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

GPU_QUEUE = "gpu-tasks"
CPU_QUEUE = "celery"
STORE_QUEUE = "morag-store"  # server side only: vector storage, search, webhooks
DECLARED_QUEUES = (CPU_QUEUE, GPU_QUEUE, STORE_QUEUE)

Device = Literal["auto", "cpu", "cuda"]


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _qdrant_url_problem(url: str, api_key: bool, ca_file: bool) -> str | None:
    """Why MORAG_QDRANT_URL cannot be used with the other Qdrant settings, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"MORAG_QDRANT_URL must be an http:// or https:// URL with a host, not {url!r}"
    if parts.scheme == "http" and api_key and not _is_loopback(parts.hostname):
        # The key is sent in a header on every request: refused in clear, as Redis and the
        # API are (TLS off loopback).
        return (
            f"MORAG_QDRANT_API_KEY would cross the network in clear: MORAG_QDRANT_URL is "
            f"http:// to {parts.hostname}, not loopback. Use https:// (MORAG_QDRANT_CA_FILE "
            "for a private CA)"
        )
    if parts.scheme == "http" and ca_file:
        return "MORAG_QDRANT_CA_FILE needs an https:// MORAG_QDRANT_URL"
    return None


def parse_host_port(entry: str, variable: str) -> tuple[str, int]:
    """``host:port`` (``[v6 address]:port``) as (host, port); ValueError naming ``variable``."""
    host, sep, port = entry.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    problem = None
    if not sep or not host or not port:
        problem = "is not host:port"
    elif not port.isdigit() or not 0 < int(port) < 65536:
        problem = "has no valid port (1-65535)"
    elif any(c in host for c in "/@?#[] ") or (":" in host) != (bracketed and _is_ip(host)):
        problem = "has no valid host (an IPv6 address goes in brackets: [fd00::7]:26379)"
    if problem:
        raise ValueError(f"{variable}: {entry!r} {problem} (e.g. 10.0.0.5:26379)")
    return host, int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MORAG_", extra="ignore")

    # Connections and secrets
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    # Redis Sentinel (morag.redis_client): host:port of each Sentinel, comma-separated. Set,
    # the primary of redis_sentinel_master is asked of them and redis_url keeps the scheme
    # (rediss: TLS, also to the Sentinels), user, password, database and TLS options, its
    # host and port unused. Empty: redis_url's host, as without Sentinel.
    redis_sentinels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    redis_sentinel_master: str = "morag"
    # The ACL user clients log in to the Sentinels with (empty: none).
    redis_sentinel_username: str = ""
    redis_sentinel_password: SecretStr | None = None
    # A submission is answered 202 only once this many replicas acknowledged its record and
    # outbox entry (WAIT, at most redis_wait_timeout_ms); fewer: 503 and the job is withdrawn.
    # 0: no WAIT (a primary lost right after a 202 may take the job with it).
    redis_min_replicas: int = Field(default=0, ge=0)
    redis_wait_timeout_ms: int = Field(default=500, gt=0)
    # With Sentinel, how long a command keeps being sent again after connection errors and
    # timeouts (each time to the primary the Sentinels name then): longer than a failover
    # (Sentinel's down-after-milliseconds plus the election), so a submission waits for the
    # new primary instead of failing. Without Sentinel a command is not retried.
    redis_failover_seconds: float = Field(default=15.0, ge=0)
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    worker_token: SecretStr | None = None
    # Bearer token Prometheus sends to GET /metrics; unset: /metrics answers 404.
    metrics_token: SecretStr | None = None
    api_url: str = "http://127.0.0.1:8000"
    # Where a GPU/CPU worker writes its own jobs' records: `redis` (its Redis credential) or
    # `api` (the narrow path, morag.job_writes: each change goes to the API, which applies it
    # only to an attempt of this worker's host). With `api` and worker_host set, worker_token
    # is that host's own token (`morag worker-token HOST` derives it from the fleet's).
    job_writes: Literal["redis", "api"] = "redis"
    # The API process takes a turn at the watchdog (morag.watchdog): on where the workers
    # write through the API and no store worker runs (the roles turn it on with job_writes).
    api_watchdog: bool = False
    worker_host: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
    # TLS of the API. The API serves HTTPS with both files set (plain HTTP with neither: fine
    # on loopback only). Its clients (the CLI, workers downloading uploads) verify the
    # certificate against api_ca_file, or the system's trust store when it is unset.
    api_tls_cert_file: Path | None = None
    api_tls_key_file: Path | None = None
    api_ca_file: Path | None = None

    # Files
    shared_dir: Path = Path("/var/lib/morag/shared")
    work_dir: Path = Path("/tmp/morag-work")  # noqa: S108 - scratch for HTTP downloads
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, gt=0)
    url_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)
    url_timeout: float = Field(default=60.0, gt=0)

    # Processing
    device: Device = "auto"
    whisper_model: str = "tiny.en"
    whisper_compute_type: str = "auto"
    whisper_cpu_threads: int = Field(default=0, ge=0)
    # Each pool process loads its Whisper model and runs it once before the worker advertises
    # itself (morag.warmup), so the first job pays no load time; the worker waits at most
    # warmup_timeout seconds for it. false: the first job loads it.
    warmup: bool = True
    warmup_timeout: float = Field(default=300.0, gt=0)
    # Audio at least this long (seconds) is cut at silences into pieces that idle workers of
    # its queue transcribe in parallel (morag.splitting; options.split overrides it per
    # job). 0: never split on this worker.
    split_min_seconds: float = Field(default=300.0, ge=0)
    docling_artifacts_path: Path | None = None  # docling's layout models for PDFs
    ocr_languages: str = "eng"  # tesseract -l value
    web_max_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    # Wall-clock limit of a whole web page fetch, redirects included: MORAG_URL_TIMEOUT
    # bounds each read only, so a server sending a byte at a time could hold a job for hours.
    web_fetch_deadline: float = Field(default=120.0, gt=0)
    # Time limit of each ffmpeg / tesseract run and yt-dlp download (ffprobe: 60 s at most).
    tool_timeout: float = Field(default=1800.0, gt=0)

    # Ingestion: chunking, embeddings, vector store (server side)
    # Ingest jobs are stored by the morag-store worker before they succeed; false: they
    # end after processing with result.metadata.stored = false (decided by the API).
    store_ingested: bool = True
    chunk_size: int = Field(default=1000, ge=100)
    chunk_overlap: int = Field(default=150, ge=0)
    embedding_model: str = "all-MiniLM-L6-v2"
    qdrant_url: str | None = None  # unset: local mode on disk at qdrant_path
    qdrant_api_key: SecretStr | None = None
    # An https:// Qdrant server signed by a private CA: verify its certificate against this
    # file (unset: the system's trust store).
    qdrant_ca_file: Path | None = None
    qdrant_path: Path = Path("/var/lib/morag/qdrant")
    qdrant_collection: str = "morag"
    search_timeout: float = Field(default=30.0, gt=0)

    # Webhooks
    webhook_secret: SecretStr | None = None
    webhook_retries: int = Field(default=5, ge=0)
    webhook_backoff: float = Field(default=2.0, ge=0)

    # Fleet, routing, rescue
    heartbeat_ttl: float = Field(default=15.0, gt=0.5)
    # A worker process stays subscribed to its own Pub/Sub channel while it lives: when it
    # dies its socket closes and Redis drops the subscription, so the API and the rescuing
    # CPU workers, which count subscribers every liveness_interval seconds, notice within
    # that instead of a heartbeat TTL (morag.liveness). false: the heartbeat TTL alone.
    liveness_channel: bool = True
    liveness_interval: float = Field(default=0.25, gt=0)
    rescue_grace: float = Field(default=60.0, ge=0)
    # After Redis was away (a restart, an outage seen by the watchdog) every job lease has
    # lapsed: the watchdog requeues no running job as lost for this long once it is back, so
    # a worker restarted meanwhile (systemd's RestartSec, its start) records the result it
    # kept on disk instead of the job running again.
    outage_grace: float = Field(default=60.0, ge=0)
    gpu_backlog_limit: int = Field(default=100, ge=1)
    fleet_cache_seconds: float = Field(default=1.0, ge=0)

    # Delivery
    job_time_limit: int = Field(default=2 * 3600, gt=0)
    visibility_timeout: int = Field(default=3 * 3600, gt=0)
    max_deliveries: int = Field(default=3, ge=1)
    max_tasks_per_child: int = Field(default=50, ge=1)
    # A job record is written before its message is sent; an outbox entry marks it until
    # the send is confirmed. Past this many seconds a worker's reconciler sends it again
    # (the sender died or the broker refused between the two).
    outbox_grace: float = Field(default=30.0, gt=0)
    # A job handed to morag-store with no store worker on it for this long gets its store
    # message sent again (a store worker killed mid-store leaves its message unacked).
    store_resend_after: float = Field(default=300.0, gt=0)
    # A job queued this long while its queue is empty and no worker runs it lost its
    # message (a worker killed between taking it and claiming the job): sent again.
    lost_message_after: float = Field(default=120.0, gt=0)
    # A storing error (vector store or Redis unreachable) is retried this many times with
    # exponential backoff from store_retry_backoff seconds before the job fails.
    store_retries: int = Field(default=5, ge=0)
    store_retry_backoff: float = Field(default=5.0, ge=0)
    # How long a worker keeps retrying a job's final record write through a Redis outage.
    redis_retry_seconds: float = Field(default=120.0, ge=0)
    # A worker's download of an upload from the API (through the load balancer) retries
    # connection errors and 502/503/504 for this long: an API host lost, or every API waiting
    # out a Redis failover, must not fail the job (docs/ha.md).
    download_retry_seconds: float = Field(default=120.0, ge=0)
    # Celery task events (worker_send_task_events, task_send_sent_event) for Flower or
    # celery-exporter; MoRAG's own metrics do not need them.
    celery_events: bool = False

    # API
    # Slow clients: a connection whose request line and headers are not complete after
    # api_header_timeout seconds is closed; past api_limit_concurrency open connections or
    # running requests a request is answered 503; idle keep-alive connections are closed
    # after api_keepalive_timeout seconds.
    api_header_timeout: float = Field(default=10.0, gt=0)
    api_limit_concurrency: int = Field(default=1024, ge=1)
    api_backlog: int = Field(default=2048, ge=1)
    api_keepalive_timeout: int = Field(default=5, ge=1)
    process_wait: float = Field(default=30.0, ge=0)
    # GET /ready answers within this many seconds (keep it under the load balancer's check
    # timeout); Redis silent that long counts as unavailable (morag.api.readiness).
    ready_timeout: float = Field(default=1.5, gt=0)
    # With Sentinel, Redis unavailable for less than this is /ready `degraded`, not 503: a
    # failover stops every API at once. Unset: redis_failover_seconds with Sentinel (as long
    # as submissions wait for the new primary), 0 without.
    ready_redis_grace: float | None = Field(default=None, ge=0)
    # A request waiting for a job (/process/*, status long-poll, /v1/audio/*) is woken by the
    # job's end announcement (morag.job_events); without one it reads the record again at
    # the latest after this many seconds (a lost announcement, a Redis role without the
    # job end channel).
    job_wait_poll: float = Field(default=0.5, gt=0)
    # /v1/audio/*: OpenAI clients cannot poll a job id, so they wait this long for the text;
    # `gpu` when the request leaves it out (jobs still fall back to CPU workers). Below the
    # openai SDK's own 600 s timeout: a client that gives up first retries, and the job of
    # its dropped connection is cancelled, the work lost.
    openai_wait: float = Field(default=540.0, gt=0)
    openai_gpu: bool = True
    job_ttl: int = Field(default=7 * 24 * 3600, gt=0)
    # How long an Idempotency-Key is remembered: a retry within it returns the first job.
    # Capped at job_ttl (a key never outlives the job it names).
    idempotency_ttl: int = Field(default=24 * 3600, gt=0)
    # Live events of a running job (segments, progress: morag.live_events), a capped Redis
    # Stream per job: kept this long after its last event, at most this many entries.
    live_events_ttl: int = Field(default=3600, gt=0)
    live_events_max: int = Field(default=10_000, ge=100)
    # An SSE stream sends a comment line this often when nothing happens (proxies close
    # idle connections).
    sse_keepalive: float = Field(default=15.0, gt=0)

    # Test hook: lets a job's options ask for a fault (crash, cuda_oom, slow:N). Never in prod.
    fault_injection: bool = False

    @field_validator("api_keys", "url_allowlist", "redis_sentinels", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinel_addresses(cls, value: list[str]) -> list[str]:
        for entry in value:
            parse_host_port(entry, "MORAG_REDIS_SENTINELS")
        return value

    @model_validator(mode="after")
    def _delivery_is_consistent(self) -> Settings:
        # A visibility timeout under the longest job makes Redis hand a running job to a
        # second worker (the first attempt's bug); refuse the combination outright.
        if self.visibility_timeout <= self.job_time_limit:
            raise ValueError(
                f"MORAG_VISIBILITY_TIMEOUT ({self.visibility_timeout}s) must exceed "
                f"MORAG_JOB_TIME_LIMIT ({self.job_time_limit}s), or running jobs are "
                "delivered twice"
            )
        if self.job_writes == "api" and not self.worker_token:
            raise ValueError(
                "MORAG_JOB_WRITES=api needs MORAG_WORKER_TOKEN (the fleet's, or this host's "
                "own with MORAG_WORKER_HOST): the API takes job changes from workers only"
            )
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError("MORAG_CHUNK_OVERLAP must be smaller than MORAG_CHUNK_SIZE")
        if (self.api_tls_cert_file is None) != (self.api_tls_key_file is None):
            raise ValueError(
                "MORAG_API_TLS_CERT_FILE and MORAG_API_TLS_KEY_FILE go together: set both "
                "(HTTPS) or neither (plain HTTP)"
            )
        if self.redis_sentinels:
            scheme = urlsplit(self.redis_url.get_secret_value()).scheme
            if scheme not in ("redis", "rediss"):
                raise ValueError(
                    "MORAG_REDIS_SENTINELS needs a redis:// or rediss:// MORAG_REDIS_URL "
                    f"(its user, password, database and TLS options), not {scheme}://"
                )
        if self.qdrant_url:
            problem = _qdrant_url_problem(
                self.qdrant_url, self.qdrant_api_key is not None, self.qdrant_ca_file is not None
            )
            if problem:
                raise ValueError(problem)
        return self

    @property
    def heartbeat_interval(self) -> float:
        return max(0.2, self.heartbeat_ttl / 3)

    @property
    def uploads_dir(self) -> Path:
        return self.shared_dir / "uploads"

    def worker_headers(self) -> dict[str, str]:
        """How a worker names itself to the API: its token, and with a host token its host
        (morag.job_writes.host_token)."""
        token = self.worker_token.get_secret_value() if self.worker_token else ""
        headers = {"X-Worker-Token": token}
        if self.worker_host:
            headers["X-Worker-Host"] = self.worker_host
        return headers

    def api_tls_verify(self) -> ssl.SSLContext | bool:
        """What an httpx client of the API verifies its certificate with (httpx's verify=)."""
        if self.api_ca_file is None:
            return True
        return ssl.create_default_context(cafile=str(self.api_ca_file))

    def ready_redis_grace_seconds(self) -> float:
        if self.ready_redis_grace is not None:
            return self.ready_redis_grace
        return self.redis_failover_seconds if self.redis_sentinels else 0.0

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """MORAG_REDIS_SENTINELS as (host, port) pairs; empty without Sentinel."""
        return [parse_host_port(e, "MORAG_REDIS_SENTINELS") for e in self.redis_sentinels]

    def api_key_values(self) -> list[str]:
        return [key.get_secret_value() for key in self.api_keys]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
