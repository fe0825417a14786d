"""The narrow path by which a GPU/CPU worker changes job records: through the API, as a host.

Redis ACLs cannot tell one job id from another, so a worker credential that may write job
records may write any of them. With ``MORAG_JOB_WRITES=api`` a worker sends each change of
its own attempt to the API (``POST /api/v1/worker/jobs/{task_id}/{op}``) as one host, with a
token derived for that host from the fleet's worker token (``host_token``); the API applies
it with its own credential, after checking here that the attempt it names runs on that
host. The JobStore method then checks that the attempt still holds the job (its lease), so
a host can change only the jobs its own attempts run, and only as JobStore allows.

This module is pure: the operations, their arguments and answers, and the checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from morag.job_record import JobRecord, Result, Route
from morag.jobs import Claim, Decline, JobStore

# A worker host's name as it appears in a Celery worker name (``name@host``).
HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
TOKEN_CONTEXT = b"morag worker host token v1\x00"


class WriteRefused(Exception):
    """The caller may not make this change (403): the attempt is not one of its host's."""


def host_token(fleet_token: str, host: str) -> str:
    """The token of one worker host, derived from the fleet's worker token (HMAC-SHA256): a
    host holds only its own, so it cannot act as another host nor derive another's."""
    mac = hmac.new(fleet_token.encode(), TOKEN_CONTEXT + host.encode(), hashlib.sha256)
    return mac.hexdigest()


def host_of(owner: str) -> str:
    """The host of a worker name (``name@host``) or attempt owner (``name@host/pid``)."""
    name = owner.rpartition("/")[0] if "/" in owner else owner
    return name.partition("@")[2]


def check_host(caller: str | None, owner: str) -> None:
    """``caller`` None is the fleet token's holder (a server-side process): any host."""
    if caller is None:
        return
    if host_of(owner) != caller:
        raise WriteRefused(f"{owner!r} is not a worker of host {caller!r}")


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClaimOp(_Op):
    op: Literal["claim"] = "claim"
    owner: str
    attempt: dict[str, Any]
    max_deliveries: int = Field(ge=1)
    # The lease holder the worker found dead (a killed pool child of its own): only a holder
    # of the caller's own worker may be declared so (the API cannot see the host's pids).
    dead_holder: str | None = None
    route: Route | None = None


class DeclineOp(_Op):
    op: Literal["decline"] = "decline"
    worker: str
    queue: str


class ProgressOp(_Op):
    op: Literal["progress"] = "progress"
    owner: str
    progress: float


class DeviceOp(_Op):
    op: Literal["device"] = "device"
    owner: str
    device: Literal["cuda", "cpu"]


class FinishOp(_Op):
    op: Literal["finish"] = "finish"
    owner: str
    result: Result | None = None
    error: str | None = None


class StoreOp(_Op):
    op: Literal["hand_to_store"] = "hand_to_store"
    owner: str
    result: Result
    store_resend_after: float = 300.0


class RequeueOp(_Op):
    op: Literal["requeue"] = "requeue"
    owner: str  # a worker requeues only its own attempt (the watchdog's orphans: not here)
    route: Route
    error: str
    force_cpu: bool = False


class TimedOutOp(_Op):
    op: Literal["timed_out"] = "timed_out"
    worker: str
    limit: int


class LeaseOp(_Op):
    op: Literal["lease"] = "lease"
    owner: str


class SentOp(_Op):
    """The message of a job this host sent back (declined), requeued or handed over is
    sent: its outbox entry goes."""

    op: Literal["sent"] = "sent"


class WebhookOp(_Op):
    """The webhook of a job this host ended is published: its next resend time."""

    op: Literal["webhook_published"] = "webhook_published"
    resend_at: float


class AdoptOp(_Op):
    """A split job's pieces (ids), written into the job its attempt ``owner`` runs."""

    op: Literal["adopt"] = "adopt"
    owner: str
    pieces: list[str] = Field(max_length=10_000)


class PiecesOp(_Op):
    """The pieces' records, once their ids are in their job (the path names the job)."""

    op: Literal["create_pieces"] = "create_pieces"
    records: list[JobRecord] = Field(min_length=1, max_length=10_000)


class CancelPieceOp(_Op):
    op: Literal["cancel_piece"] = "cancel_piece"
    reason: str = Field(max_length=1000)


class TakeBackOp(_Op):
    op: Literal["take_back"] = "take_back"
    holder_seen: str | None = None
    reason: str = Field(max_length=1000)


class ExpirePieceOp(_Op):
    op: Literal["expire_piece"] = "expire_piece"
    seconds: int = Field(ge=1, le=7 * 86400)


_MODELS: tuple[type[_Op], ...] = (
    ClaimOp,
    DeclineOp,
    ProgressOp,
    DeviceOp,
    FinishOp,
    StoreOp,
    RequeueOp,
    TimedOutOp,
    LeaseOp,
    SentOp,
    WebhookOp,
    AdoptOp,
    PiecesOp,
    CancelPieceOp,
    TakeBackOp,
    ExpirePieceOp,
)
OPS: dict[str, type[_Op]] = {m.model_fields["op"].default: m for m in _MODELS}
# Changes that name no attempt: checked against the record (a piece of a job this host
# runs, a job this host last ran or declined), not against an owner in the request.
_BY_RECORD = (SentOp, WebhookOp, PiecesOp, CancelPieceOp, TakeBackOp, ExpirePieceOp)


def _record(record: JobRecord | None) -> dict[str, Any] | None:
    return None if record is None else record.model_dump(mode="json")


def _dead_check(op: ClaimOp) -> Callable[[str], bool]:
    worker = op.owner.rpartition("/")[0]

    def dead(holder: str) -> bool:
        return holder == op.dead_holder and holder.rpartition("/")[0] == worker

    return dead


def _runs_pieces_of(store: JobStore, caller: str, parent_id: str, piece_ids: list[str]) -> None:
    """The job ``parent_id`` runs on ``caller`` (its lease) and lists every piece."""
    parent = store.get(parent_id)
    holder = store.lease_owner(parent_id)
    if parent is None or holder is None or host_of(holder) != caller:
        raise WriteRefused(f"job {parent_id} is not running on host {caller!r}")
    if not set(piece_ids) <= set(parent.pieces):
        raise WriteRefused(f"not every record is a piece of job {parent_id}")


def _check_piece(store: JobStore, caller: str, piece_id: str) -> None:
    piece = store.get(piece_id)
    if piece is None or piece.parent_id is None:
        raise WriteRefused(f"job {piece_id} is not a piece of a split job")
    _runs_pieces_of(store, caller, piece.parent_id, [piece_id])


def _check_sent(store: JobStore, caller: str, task_id: str) -> None:
    record = store.get(task_id)
    if record is None:
        return  # nothing left to send it for: removing the entry changes nothing
    if record.parent_id is not None:
        with contextlib.suppress(WriteRefused):  # else: the piece's own attempt, below
            _runs_pieces_of(store, caller, record.parent_id, [task_id])
            return
    last = record.attempts[-1].worker if record.attempts else ""
    if host_of(last) == caller or any(host_of(w) == caller for w in record.declined_by):
        return
    raise WriteRefused(f"job {task_id} was not sent by host {caller!r}")


def piece_problem(record: JobRecord, parent_id: str) -> str | None:
    """Why ``record`` is not a new piece of job ``parent_id`` as morag.split_jobs writes one
    (a queued job that processes an upload, owing nothing to anyone), or None."""
    if record.parent_id != parent_id:
        return "it names another job"
    if record.status.value != "queued" or record.attempts or record.owner or record.pieces:
        return "it is not new"
    if record.kind != "process" or record.source.type != "file" or record.source.url:
        return "it does not process an upload"
    if record.webhook_url or record.webhook or record.store or record.model_extra:
        return "it carries a webhook, a store step or unknown fields"
    return None


def _check_by_record(store: JobStore, caller: str, task_id: str, op: _Op) -> None:
    if isinstance(op, (SentOp, WebhookOp)):
        _check_sent(store, caller, task_id)
    elif isinstance(op, PiecesOp):
        for record in op.records:
            problem = piece_problem(record, task_id)
            if problem:
                raise WriteRefused(
                    f"{record.task_id} is not a new piece of job {task_id}: {problem}"
                )
        _runs_pieces_of(store, caller, task_id, [r.task_id for r in op.records])
    else:
        _check_piece(store, caller, task_id)


def apply(store: JobStore, caller: str | None, task_id: str, op: _Op) -> dict[str, Any]:
    """Check ``op`` against the calling host and apply it; the JSON answer."""
    if isinstance(op, _BY_RECORD):
        if caller is not None:
            _check_by_record(store, caller, task_id, op)
        return _apply_by_record(store, task_id, op)
    owner = getattr(op, "owner", None) or getattr(op, "worker", "")
    check_host(caller, owner)
    if isinstance(op, ClaimOp):
        claim = store.claim(
            task_id,
            owner=op.owner,
            attempt=op.attempt,
            max_deliveries=op.max_deliveries,
            owner_is_dead=_dead_check(op),
            route=op.route,
        )
        return {"run": claim.run, "reason": claim.reason, "record": _record(claim.record)}
    if isinstance(op, DeclineOp):
        declined = store.decline(task_id, op.worker, queue=op.queue)
        if declined is None:
            return {"record": None, "repeat": False}
        return {"record": _record(declined.record), "repeat": declined.repeat}
    if isinstance(op, ProgressOp):
        store.set_progress(task_id, op.owner, op.progress)
        return {}
    if isinstance(op, DeviceOp):
        store.set_attempt_device(task_id, op.owner, op.device)
        return {}
    if isinstance(op, FinishOp):
        return {"ok": store.finish(task_id, op.owner, result=op.result, error=op.error)}
    if isinstance(op, StoreOp):
        done = store.hand_to_store(
            task_id, op.owner, result=op.result, store_resend_after=op.store_resend_after
        )
        return {"ok": done}
    if isinstance(op, RequeueOp):
        record = store.requeue(
            task_id, route=op.route, error=op.error, owner=op.owner, force_cpu=op.force_cpu
        )
        return {"record": _record(record)}
    if isinstance(op, TimedOutOp):
        return {"record": _record(store.fail_timed_out(task_id, op.worker, op.limit))}
    if isinstance(op, LeaseOp):
        store.refresh_leases({task_id: op.owner})
        return {}
    if isinstance(op, AdoptOp):
        return {"earlier": store.adopt_pieces(task_id, op.owner, op.pieces)}
    raise WriteRefused(f"unknown operation {type(op).__name__}")


def _apply_by_record(store: JobStore, task_id: str, op: _Op) -> dict[str, Any]:
    if isinstance(op, SentOp):
        store.sent(task_id)
        return {}
    if isinstance(op, WebhookOp):
        store.webhook_published(task_id, op.resend_at)
        return {}
    if isinstance(op, PiecesOp):
        store.create_all(op.records)
        return {}
    if isinstance(op, CancelPieceOp):
        return {"record": _record(store.cancel(task_id, op.reason))}
    if isinstance(op, TakeBackOp):
        return {"ok": store.take_back_piece(task_id, op.holder_seen, op.reason)}
    if isinstance(op, ExpirePieceOp):
        store.expire(task_id, op.seconds)
        return {}
    raise WriteRefused(f"unknown operation {type(op).__name__}")


def parse(name: str, body: dict[str, Any]) -> _Op:
    """The operation ``name`` with its arguments (pydantic's ValidationError when wrong)."""
    model = OPS.get(name)
    if model is None:
        raise KeyError(name)
    return model.model_validate({**body, "op": name})


def as_claim(answer: dict[str, Any]) -> Claim:
    raw = answer.get("record")
    record = None if raw is None else JobRecord.model_validate(raw)
    return Claim(bool(answer["run"]), str(answer["reason"]), record)


def as_decline(answer: dict[str, Any]) -> Decline | None:
    raw = answer.get("record")
    if raw is None:
        return None
    return Decline(JobRecord.model_validate(raw), bool(answer.get("repeat")))


def as_record(answer: dict[str, Any]) -> JobRecord | None:
    raw = answer.get("record")
    return None if raw is None else JobRecord.model_validate(raw)
