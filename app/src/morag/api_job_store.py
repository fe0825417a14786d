"""A worker's JobStore when ``MORAG_JOB_WRITES=api``: its own attempts' changes go to the API.

Reads stay on Redis. Each change of an attempt (claim, decline, progress, device, finish,
hand-over to the store, fallback requeue, time limit, lease; a split job's pieces; the outbox
entry of a message it sent, the resend time of a webhook it published) is one POST to
``/api/v1/worker/jobs/{task_id}/{op}`` (morag.job_writes), sent as this worker's host. An
API that cannot be reached or answers 5xx raises redis.ConnectionError, so a worker waits it
out exactly as it waits out a Redis outage (morag.execution.through_outage); a refusal (4xx)
raises redis.ResponseError, which is not waited out.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import redis

from morag import files, job_writes
from morag.config import Settings
from morag.job_record import JobRecord, Result, Route
from morag.jobs import Claim, Decline, JobStore, as_result


@dataclass(frozen=True)
class IdentityCheck:
    """What the API said of this worker's credentials before it takes a job: ``refused``
    (a reason no retry fixes: the worker must not start), or ``unreachable`` (an outage,
    waited out like the others), or neither (the API knows this host)."""

    refused: str | None = None
    unreachable: str | None = None


def check_identity(settings: Settings, timeout: float = 10.0) -> IdentityCheck:
    """Ask the API who this worker is (``GET /api/v1/worker/identity``) with the token, host
    and CA every job change will use, so that a wrong token or an untrusted certificate stops
    the worker at its start, not at each job it takes and then cannot record."""
    url = settings.api_url.rstrip("/") + "/api/v1/worker/identity"
    host = settings.worker_host or "(no MORAG_WORKER_HOST: the fleet's token)"
    try:
        resp = httpx.get(
            url,
            headers=settings.worker_headers(),
            verify=settings.api_tls_verify(),
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        if files.tls_refused(exc, ssl.SSLCertVerificationError):
            trust = settings.api_ca_file or "the system's trust store"
            return IdentityCheck(
                refused=f"the API's TLS certificate at {url} is not trusted by {trust}: {exc}; "
                "set MORAG_API_CA_FILE to the CA that signed it (roles/morag_app: "
                "morag_app_api_tls_ca_src)"
            )
        return IdentityCheck(unreachable=f"the API at {url} is unreachable: {exc}")
    if resp.status_code in (401, 403):
        return IdentityCheck(
            refused=f"the API at {url} refuses this worker's token as host {host} "
            f"({resp.status_code}: {_detail(resp)}); MORAG_WORKER_TOKEN must be the output of "
            f"`morag worker-token {settings.worker_host or 'HOST'}` on the API host (roles/"
            "morag_app derives it from morag_app_worker_token and morag_app_worker_host)"
        )
    if resp.status_code == 404:
        return IdentityCheck(
            refused=f"{url} answered 404: MORAG_API_URL does not name a MoRAG API that takes "
            "job changes from workers (an older API?); MORAG_JOB_WRITES=api needs one"
        )
    if resp.status_code >= 400:
        return IdentityCheck(unreachable=f"the API answered {resp.status_code}: {_detail(resp)}")
    return IdentityCheck()


class ApiJobStore(JobStore):
    def __init__(self, client: redis.Redis, settings: Settings, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self._headers = settings.worker_headers()
        self._base = settings.api_url.rstrip("/") + "/api/v1/worker/jobs"
        self._verify = settings.api_tls_verify()
        self._http: httpx.Client | None = None
        self._pid = 0

    def _client(self) -> httpx.Client:
        if self._http is None or self._pid != os.getpid():  # never share one across a fork
            self._http = httpx.Client(
                headers=self._headers, verify=self._verify, timeout=httpx.Timeout(15.0, connect=5.0)
            )
            self._pid = os.getpid()
        return self._http

    def _send(self, task_id: str, op: str, body: Mapping[str, Any]) -> dict[str, Any]:
        url = f"{self._base}/{task_id}/{op}"
        try:
            resp = self._client().post(url, json=body)
        except httpx.HTTPError as exc:
            raise redis.ConnectionError(f"the API at {self._base} is unreachable: {exc}") from exc
        if resp.status_code >= 500:
            raise redis.ConnectionError(f"the API answered {resp.status_code}: {_detail(resp)}")
        if resp.status_code >= 400:
            raise redis.ResponseError(
                f"the API refused {op} of job {task_id}: {resp.status_code} {_detail(resp)}"
            )
        answer: dict[str, Any] = resp.json()
        return answer

    # -- the changes of an attempt, through the API --------------------------------------
    def claim(
        self,
        task_id: str,
        *,
        owner: str,
        attempt: dict[str, Any],
        max_deliveries: int,
        owner_is_dead: Callable[[str], bool],
        route: Route | None = None,
    ) -> Claim:
        # The API cannot see this host's processes: name the holder found dead, if any.
        holder = self.lease_owner(task_id)
        dead = holder if holder and holder != owner and owner_is_dead(holder) else None
        body = {
            "owner": owner,
            "attempt": attempt,
            "max_deliveries": max_deliveries,
            "dead_holder": dead,
            "route": None if route is None else route.model_dump(mode="json"),
        }
        return job_writes.as_claim(self._send(task_id, "claim", body))

    def decline(self, task_id: str, worker: str, *, queue: str) -> Decline | None:
        answer = self._send(task_id, "decline", {"worker": worker, "queue": queue})
        return job_writes.as_decline(answer)

    def set_progress(self, task_id: str, owner: str, progress: float) -> None:
        self._send(task_id, "progress", {"owner": owner, "progress": progress})

    def set_attempt_device(self, task_id: str, owner: str, device: str) -> None:
        self._send(task_id, "device", {"owner": owner, "device": device})

    def finish(
        self,
        task_id: str,
        owner: str,
        *,
        result: Result | Mapping[str, Any] | None = None,
        error: str | None = None,
    ) -> bool:
        outcome = None if result is None else as_result(result).model_dump(mode="json")
        body = {"owner": owner, "result": outcome, "error": error}
        return bool(self._send(task_id, "finish", body).get("ok"))

    def hand_to_store(
        self,
        task_id: str,
        owner: str,
        *,
        result: Result | Mapping[str, Any],
        store_resend_after: float = 300.0,
    ) -> bool:
        body = {
            "owner": owner,
            "result": as_result(result).model_dump(mode="json"),
            "store_resend_after": store_resend_after,
        }
        return bool(self._send(task_id, "hand_to_store", body).get("ok"))

    def requeue(
        self,
        task_id: str,
        *,
        route: Route,
        error: str,
        owner: str | None,
        force_cpu: bool = False,
    ) -> JobRecord | None:
        if owner is None:  # the watchdog's requeue of an orphan: not an attempt of this host
            return super().requeue(task_id, route=route, error=error, owner=None)
        body = {
            "owner": owner,
            "route": route.model_dump(mode="json"),
            "error": error,
            "force_cpu": force_cpu,
        }
        return job_writes.as_record(self._send(task_id, "requeue", body))

    def fail_timed_out(self, task_id: str, worker: str, limit: int) -> JobRecord | None:
        answer = self._send(task_id, "timed_out", {"worker": worker, "limit": limit})
        return job_writes.as_record(answer)

    def refresh_leases(self, owners: dict[str, str]) -> None:
        for task_id, owner in owners.items():
            self._send(task_id, "lease", {"owner": owner})

    def sent(self, task_id: str) -> None:
        self._send(task_id, "sent", {})

    def webhook_published(self, task_id: str, resend_at: float) -> None:
        self._send(task_id, "webhook_published", {"resend_at": resend_at})

    # -- a split job's pieces (morag.split_jobs) ------------------------------------------
    def adopt_pieces(self, task_id: str, owner: str, pieces: list[str]) -> list[str] | None:
        answer = self._send(task_id, "adopt", {"owner": owner, "pieces": pieces})
        earlier = answer.get("earlier")
        return None if earlier is None else [str(pid) for pid in earlier]

    def create_all(self, records: list[JobRecord], **kwargs: Any) -> bytes | None:
        parents = {record.parent_id for record in records}
        if kwargs or len(parents) != 1 or None in parents:
            raise ValueError("a worker creates only the pieces of the job it runs")
        body = {"records": [record.model_dump(mode="json") for record in records]}
        self._send(str(parents.pop()), "create_pieces", body)
        return None

    def cancel(self, task_id: str, reason: str = "cancelled by the client") -> JobRecord | None:
        return job_writes.as_record(self._send(task_id, "cancel_piece", {"reason": reason}))

    def take_back_piece(self, piece_id: str, holder_seen: str | None, reason: str) -> bool:
        body = {"holder_seen": holder_seen, "reason": reason}
        return bool(self._send(piece_id, "take_back", body).get("ok"))

    def expire(self, task_id: str, seconds: int) -> None:
        self._send(task_id, "expire_piece", {"seconds": seconds})


def _detail(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("detail"))
    except ValueError:
        return resp.text[:200]
