"""The job store: each job's ``JobRecord`` (morag.job_record) kept in Redis, and its transitions.

Every state change is an optimistic transaction (WATCH/MULTI) so the API (cancel), the
worker running the job and the orphan watchdog can never overwrite each other: a job
completes once, and only the attempt that holds the job's lease may complete it.
The metrics a transition feeds (morag.metrics) are incremented in the same transaction, and
so is the webhook outbox entry of a job that ends with a ``webhook_url``: whoever ends the
job (a worker, the time limit, the delivery cap, the API's cancel, the store worker), its
webhook is owed from the moment the end is written (morag.webhooks delivers it).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import redis

from morag import job_events, metrics
from morag.job_record import TERMINAL, Attempt, JobRecord, JobStatus, Result, Route, Source
from morag.redis_client import replicated_transaction

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    JobStatus.queued,
    JobStatus.running,
    JobStatus.succeeded,
    JobStatus.failed,
    JobStatus.cancelled,
)

ACTIVE_SET = "morag:jobs:active"
# Jobs whose message must be (re)sent: task id -> epoch seconds after which a reconciler
# sends it. Written in the same transaction as the record, removed once the send returned.
OUTBOX = "morag:outbox"
# Ended jobs whose webhook is owed: task id -> epoch seconds after which a reconciler
# (morag.supervisor) publishes its delivery message (again). Added in the transaction that
# ends the job; removed by the store worker once the webhook is delivered or given up.
# It holds job ids only: no URL, body or secret.
WEBHOOK_OUTBOX = "morag:outbox:webhooks"

LeaseAction = str | None | bool | Callable[[JobRecord], str | bool | None]
# Queues further commands (metrics) on the transaction that commits the new record.
OnCommit = Callable[[redis.client.Pipeline, JobRecord], None]


def job_key(task_id: str) -> str:
    return f"morag:job:{task_id}"


def lease_key(task_id: str) -> str:
    return f"morag:lease:{task_id}"


def batch_key(batch_id: str) -> str:
    return f"morag:batch:{batch_id}"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_id() -> str:
    return uuid.uuid4().hex


def new_record(
    *,
    kind: str,
    content_type: str,
    source: Source,
    options: dict[str, Any],
    route: Route,
    metadata: dict[str, Any] | None = None,
    webhook_url: str | None = None,
    batch_id: str | None = None,
    task_id: str | None = None,
) -> JobRecord:
    stamp = now_iso()
    return JobRecord(
        task_id=task_id or new_id(),
        kind=kind,
        status=JobStatus.queued,
        content_type=content_type,
        source=source,
        options=options,
        metadata=metadata or {},
        webhook_url=webhook_url,
        batch_id=batch_id,
        route=route,
        queued_at=stamp,
        progress=0.0,
        attempts=[],
        created_at=stamp,
        updated_at=stamp,
    )


class NotReplicated(Exception):
    """A transaction applied on the Redis primary that fewer than ``wanted`` replicas
    acknowledged within ``wait_ms`` (WAIT): a failover now could lose it."""

    def __init__(self, acked: int, wanted: int, wait_ms: int, error: str | None) -> None:
        self.acked, self.wanted, self.wait_ms, self.error = acked, wanted, wait_ms, error
        why = f"WAIT failed: {error}" if error else f"{acked} of {wanted} within {wait_ms} ms"
        super().__init__(f"not acknowledged by enough Redis replicas ({why})")


@dataclass(frozen=True)
class Claim:
    """Outcome of a worker trying to start a delivered job."""

    run: bool
    reason: str
    record: JobRecord | None = None


@dataclass(frozen=True)
class Decline:
    """A worker handed a queued job back; ``repeat``: it had declined this job before."""

    record: JobRecord
    repeat: bool


class JobStore:
    """Synchronous job store; the API calls it from its thread pool, workers directly."""

    def __init__(
        self, client: redis.Redis, *, ttl: int, lease_ttl: float, outbox_grace: float = 30.0
    ) -> None:
        self.r = client
        self.ttl = ttl
        self.lease_ttl_ms = int(lease_ttl * 1000)
        self.outbox_grace = outbox_grace

    # -- plain reads and writes ------------------------------------------------------
    def create(self, record: JobRecord) -> None:
        """Write a new record and its outbox entry in one transaction (MULTI/EXEC)."""
        pipe = self.r.pipeline()
        pipe.set(job_key(record.task_id), record.to_json(), ex=self.ttl)
        pipe.sadd(ACTIVE_SET, record.task_id)
        pipe.zadd(OUTBOX, {record.task_id: time.time() + self.outbox_grace})
        metrics.job_created(pipe, record)
        pipe.execute()

    def create_all(
        self,
        records: list[JobRecord],
        *,
        batch_id: str | None = None,
        reserve: tuple[str, str, int] | None = None,
        replicas: int = 0,
        wait_ms: int = 500,
    ) -> bytes | None:
        """Write new records, their outbox entries and (``batch_id``) the batch record in one
        MULTI/EXEC: all of them or none. ``reserve`` (key, value, ttl seconds) is written in
        the same transaction, only while that key does not exist (it is WATCHed: of two
        concurrent writers one wins); when it exists nothing is written and its value is
        returned (an Idempotency-Key already used). ``replicas``: then WAIT up to
        ``wait_ms`` for that many replicas to acknowledge the transaction; NotReplicated
        (the records stand on the primary) when fewer did."""
        found: dict[str, bytes | None] = {"value": None}

        def txn(pipe: redis.client.Pipeline) -> None:
            if reserve is not None:
                found["value"] = pipe.get(reserve[0])
            pipe.multi()
            if found["value"] is not None:
                return
            for record in records:
                pipe.set(job_key(record.task_id), record.to_json(), ex=self.ttl)
                pipe.sadd(ACTIVE_SET, record.task_id)
                pipe.zadd(OUTBOX, {record.task_id: time.time() + self.outbox_grace})
                metrics.job_created(pipe, record)
            if batch_id is not None:
                ids = [r.task_id for r in records]
                pipe.set(batch_key(batch_id), json.dumps(ids), ex=self.ttl)
            if reserve is not None:
                pipe.set(reserve[0], reserve[1], ex=reserve[2])

        watches = [reserve[0]] if reserve else []
        if replicas <= 0:
            self.r.transaction(txn, *watches)
            return found["value"]
        acked, error = replicated_transaction(
            self.r, txn, *watches, replicas=replicas, timeout_ms=wait_ms
        )
        if found["value"] is None and acked < replicas:
            raise NotReplicated(acked, replicas, wait_ms, error)
        return found["value"]

    def withdraw(
        self,
        task_ids: list[str],
        reason: str,
        *,
        batch_id: str | None = None,
        forget: tuple[str, str] | None = None,
    ) -> bool:
        """Take back new jobs whose submission was refused, all or none, in one MULTI/EXEC:
        each becomes ``failed`` with ``reason`` and leaves the outbox and the active set,
        so no reconciler sends it and a message the broker did take is skipped by the
        claim. The batch record goes too, and ``forget`` (key, value): the Idempotency-Key,
        only while it still holds this submission's value (not a concurrent request's).
        False, and nothing changed, when a worker claimed one of them already: its message
        was delivered, the submission stands, and the outbox sends the others."""
        keys = [job_key(t) for t in task_ids]
        done = {"ok": False}

        def txn(pipe: redis.client.Pipeline) -> None:
            raws = pipe.mget(keys)
            ours = forget is not None and _text(pipe.get(forget[0])) == forget[1]
            records = [JobRecord.from_json(raw) if raw else None for raw in raws]
            # Already withdrawn (a retry after a lost EXEC reply) counts as withdrawn.
            gone = [r is None or (r.status == FAILED and r.error == reason) for r in records]
            done["ok"] = all(
                g or (r.status == QUEUED and not r.attempts)
                for g, r in zip(gone, records, strict=True)
                if r is not None
            )
            pipe.multi()
            if not done["ok"]:
                return
            for task_id, record, ended in zip(task_ids, records, gone, strict=True):
                pipe.zrem(OUTBOX, task_id)
                pipe.srem(ACTIVE_SET, task_id)
                if record is None or ended:
                    continue
                record.status = FAILED
                record.error = reason
                # The client was told the job was refused: no webhook is owed for it.
                record.webhook_url = None
                record.webhook = None
                record.updated_at = now_iso()
                pipe.set(job_key(task_id), record.to_json(), ex=self.ttl)
                metrics.job_ended(pipe, record)
            if batch_id is not None:
                pipe.delete(batch_key(batch_id))
            if forget is not None and ours:
                pipe.delete(forget[0])

        self.r.transaction(txn, *keys, *([forget[0]] if forget else []))
        return done["ok"]

    # -- the outbox: records whose message may not have been sent -------------------------
    def sent(self, task_id: str) -> None:
        """The job's message was handed to the broker: nothing left to reconcile."""
        self.r.zrem(OUTBOX, task_id)

    def outbox_due(self, now: float | None = None, limit: int = 200) -> list[str]:
        """Outbox entries older than the grace: their sender died or the broker refused."""
        raw = self.r.zrangebyscore(OUTBOX, "-inf", now or time.time(), start=0, num=limit)
        return [m.decode() if isinstance(m, bytes) else m for m in raw]

    def outbox_size(self) -> int:
        return int(self.r.zcard(OUTBOX))

    def webhook_published(self, task_id: str, resend_at: float) -> None:
        """The delivery message of an ended job's webhook is published: its next resend is
        at ``resend_at``, if it is still owed (a delivery that finished is not re-added)."""
        self.r.zadd(WEBHOOK_OUTBOX, {task_id: resend_at}, xx=True)

    def webhooks_due(self, now: float | None = None, limit: int = 200) -> list[str]:
        """Ended jobs whose webhook is owed and whose delivery message is due (again)."""
        raw = self.r.zrangebyscore(WEBHOOK_OUTBOX, "-inf", now or time.time(), start=0, num=limit)
        return [m.decode() if isinstance(m, bytes) else m for m in raw]

    def fail_unsent(self, task_id: str, reason: str) -> JobRecord | None:
        """The API could not send a new job's message: end it instead of stranding it."""

        def change(record: JobRecord, holder: str | None) -> JobRecord | None:
            if record.status != QUEUED or record.attempts:
                return None
            record.status = FAILED
            record.error = reason
            return record

        def account(pipe: redis.client.Pipeline, record: JobRecord) -> None:
            pipe.zrem(OUTBOX, task_id)
            metrics.job_ended(pipe, record)

        return self.update(task_id, change, lease=None, on_commit=account)

    def get(self, task_id: str) -> JobRecord | None:
        raw = self.r.get(job_key(task_id))
        return JobRecord.from_json(raw) if raw else None

    def get_many(self, task_ids: list[str]) -> list[JobRecord]:
        if not task_ids:
            return []
        raws = self.r.mget([job_key(t) for t in task_ids])
        return [JobRecord.from_json(raw) for raw in raws if raw]

    def active_ids(self) -> list[str]:
        return sorted(
            m.decode() if isinstance(m, bytes) else m for m in self.r.smembers(ACTIVE_SET)
        )

    def save_batch(self, batch_id: str, task_ids: list[str]) -> None:
        self.r.set(batch_key(batch_id), json.dumps(task_ids), ex=self.ttl)

    def get_batch(self, batch_id: str) -> list[str] | None:
        raw = self.r.get(batch_key(batch_id))
        return json.loads(raw) if raw else None

    def lease_owner(self, task_id: str) -> str | None:
        raw = self.r.get(lease_key(task_id))
        return raw.decode() if isinstance(raw, bytes) else raw

    def refresh_leases(self, owners: dict[str, str]) -> None:
        """Extend the leases this worker holds; take back those that expired while Redis
        was out of reach, as long as the job is still this attempt's (nobody requeued it)."""
        for task_id, owner in owners.items():
            holder = self.lease_owner(task_id)
            if holder == owner:
                self.r.pexpire(lease_key(task_id), self.lease_ttl_ms)
            elif holder is None:
                self._retake_lease(task_id, owner)

    def _retake_lease(self, task_id: str, owner: str) -> None:
        def change(record: JobRecord, holder: str | None) -> JobRecord | None:
            if holder is None and _is_attempt_of(record, owner):
                return record
            return None

        self.update(task_id, change, lease=owner)

    # -- transactional update ----------------------------------------------------------
    def update(
        self,
        task_id: str,
        change: Callable[[JobRecord, str | None], JobRecord | None],
        *,
        lease: LeaseAction = False,
        on_commit: OnCommit | None = None,
    ) -> JobRecord | None:
        """Apply ``change(record, lease_owner)`` atomically.

        ``change`` returns the new record, or None to leave everything as it is.
        ``lease``: False keeps the lease, None deletes it, a string sets it (this owner); a
        callable gets the new record and answers one of those.
        ``on_commit(pipe, new)`` queues more commands in the same transaction (only when
        there is a change), so what it counts is counted exactly once.
        Returns the stored record after the change (or the unchanged one).
        """
        key, lkey = job_key(task_id), lease_key(task_id)
        outcome: dict[str, JobRecord | None] = {"record": None}
        ended = [False]  # this change ended the job: announced once it is written

        def txn(pipe: redis.client.Pipeline) -> None:
            ended[0] = False  # run again after a WATCH conflict
            raw = pipe.get(key)
            owner = pipe.get(lkey)
            if isinstance(owner, bytes):
                owner = owner.decode()
            if not raw:
                outcome["record"] = None
                pipe.multi()
                return
            record = JobRecord.from_json(raw)
            ended_before = record.status in TERMINAL  # ``change`` edits ``record`` in place
            new = change(record, owner)
            outcome["record"] = new if new is not None else record
            pipe.multi()
            if new is None:
                return
            new.updated_at = now_iso()
            pipe.set(key, new.to_json(), ex=self.ttl)
            ended[0] = new.status in TERMINAL and not ended_before
            if new.status in TERMINAL:
                pipe.srem(ACTIVE_SET, task_id)
                if new.webhook_url and not ended_before:
                    # The end and the webhook it owes are one step (the outbox pattern).
                    pipe.zadd(WEBHOOK_OUTBOX, {task_id: time.time() + self.outbox_grace}, nx=True)
            else:
                pipe.sadd(ACTIVE_SET, task_id)
            action = lease(new) if callable(lease) else lease
            if action is None:
                pipe.delete(lkey)
            elif isinstance(action, str):
                pipe.set(lkey, action, px=self.lease_ttl_ms)
            if on_commit is not None:
                on_commit(pipe, new)

        self.r.transaction(txn, key, lkey)
        if ended[0]:
            # After the commit, outside it: a Redis role that refuses this PUBLISH must not
            # abort the end's transaction (morag.job_events).
            job_events.announce_end(self.r, task_id)
        return outcome["record"]

    # -- lifecycle -----------------------------------------------------------------------
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
        """A worker received the job's message: decide whether it runs it.

        Skips jobs that ended already (a late duplicate delivery) or that another live
        attempt holds; counts deliveries and fails the job once the cap is passed.
        ``route``: a new route for the job when it runs (a rescue by a CPU worker).
        """
        verdict: dict[str, Claim] = {}
        seen: dict[str, Any] = {}

        def change(record: JobRecord, holder: str | None) -> JobRecord | None:
            if record.status in TERMINAL:
                verdict["c"] = Claim(False, f"job already {record.status.value}")
                return None
            if record.storing:
                verdict["c"] = Claim(False, "job is being stored")
                return None
            if holder and holder != owner and not owner_is_dead(holder):
                verdict["c"] = Claim(False, f"job is running under {holder}")
                return None
            if holder == owner and _is_attempt_of(record, owner):
                # This very claim committed, but its answer was lost to a Redis blip.
                verdict["c"] = Claim(True, "claimed", record)
                return None
            record.deliveries += 1
            seen["lost"] = _close_open_attempt(record, "worker lost during the job")
            seen["queued_at"] = record.queued_at
            if record.deliveries > max_deliveries:
                record.status = FAILED
                record.error = (
                    f"gave up after {max_deliveries} deliveries: the worker was lost each "
                    "time (the job may crash its worker)"
                )
                verdict["c"] = Claim(False, "delivery cap reached", record)
                return record
            record.status = RUNNING
            record.progress = 0.0
            record.queued_at = None
            record.owner = owner  # whose attempt this is, should its lease lapse
            record.waiting_for = None
            if route is not None:
                record.route = route
            record.attempts.append(
                Attempt.model_validate(
                    {**attempt, "started_at": now_iso(), "finished_at": None, "error": None}
                )
            )
            verdict["c"] = Claim(True, "claimed", record)
            return record

        def account(pipe: redis.client.Pipeline, record: JobRecord) -> None:
            if seen.get("lost"):
                metrics.redelivered(pipe, record)
            if record.status == RUNNING:
                metrics.job_claimed(pipe, record, seen.get("queued_at"))
                if route is not None:
                    metrics.route_decided(pipe, route, record.content_type)
            else:
                metrics.job_ended(pipe, record)

        # The lease is written only when the claim runs; a skip leaves it untouched.
        result = self.update(
            task_id,
            change,
            lease=lambda rec: owner if rec.status == RUNNING else None,
            on_commit=account,
        )
        if result is None:
            return Claim(False, "unknown job")
        return verdict["c"]

    def decline(self, task_id: str, worker: str, *, queue: str) -> Decline | None:
        """``worker`` got the message of a queued job it cannot process (it does not offer
        the job's content type): the job stays queued, says what it waits for, and its
        outbox entry covers the message the caller sends again. None when the job is not
        queued (ended, or running elsewhere): the message is dropped, not sent again."""
        seen = {"repeat": False}

        def change(record: JobRecord, holder: str | None) -> JobRecord | None:
            if record.status != QUEUED:
                return None
            seen["repeat"] = worker in record.declined_by
            if not seen["repeat"]:
                record.declined_by.append(worker)
            record.waiting_for = (
                f"a worker on {queue} that offers {record.content_type} "
                f"({', '.join(record.declined_by)} do not)"
            )
            return record

        def account(pipe: redis.client.Pipeline, record: JobRecord) -> None:
            pipe.zadd(OUTBOX, {task_id: time.time() + self.outbox_grace})

        record = self.update(task_id, change, on_commit=account)
        if record is None or record.status != QUEUED:
            return None
        return Decline(record, seen["repeat"])

    def set_progress(self, task_id: str, owner: str, progress: float) -> None:
        def change(record: JobRecord, holder: str | None) -> JobRecord | None:
            if not _owns(record, holder, owner):
                return None
            record.progress = round(min(max(progress, 0.0), 1.0), 3)
            return record

        # A lease that lapsed during a Redis outage is taken back with the write.
        self.update(task_id, change, lease=owner)

    def set_attempt_device(self, task_id: str, owner: str, device: str) -> None:
        """Write the device the attempt ``owner`` runs on (cuda or cpu, once it is known)."""

        def change(record: JobRecord, holder: str | None) -> JobRecord | None:
            if holder != owner or not record.attempts:
                return None
            record.attempts[-1].device = device
            return record

        self.update(task_id, change)

    def adopt_pieces(self, task_id: str, owner: str, pieces: list[str]) -> list[str] | None:
        """Write the ids of a split job's pieces into it (the API cancels them with it).

        Answers the pieces of an earlier attempt it held (to cancel), or None when the
        attempt ``owner`` no longer runs the job."""
        earlier: list[str] = []
        done = {"ok": False}

        def change(record: JobRecord, holder: str | None) -> JobRecord | None:
            if holder != owner or record.status != RUNNING:
                return None
            earlier[:] = record.pieces
            record.pieces = list(pieces)
            done["ok"] = True
            return record

        self.update(task_id, change)
        return earlier if done["ok"] else None

    def expire(self, task_id: str, seconds: int) -> None:
        """Let a record expire sooner (a split job's pieces, once its job has their result)."""
        self.r.expire(job_key(task_id), seconds)

    def take_back_piece(self, piece_id: str, holder_seen: str | None, reason: str) -> bool:
        """End a piece that is queued, or running under ``holder_seen`` (a lost worker), so
        that its job's worker transcribes it: a late delivery or a late result of it is
        refused (the claim and the finish skip an ended job). False when it moved on."""
        taken = {"ok": False}

        def change(record: JobRecord, holder: str | None) -> JobRecord | None:
            if record.parent_id is None:
                return None  # only a piece of a split job is taken back
            if record.status == QUEUED or (record.status == RUNNING and holder == holder_seen):
                _close_open_attempt(record, reason)
                record.status = CANCELLED
                record.error = reason
                taken["ok"] = True
                return record
            return None

        self.update(piece_id, change, lease=None, on_commit=metrics.job_ended)
        return taken["ok"]

    def finish(
        self,
        task_id: str,
        owner: str,
        *,
        result: Result | Mapping[str, Any] | None = None,
        error: str | None = None,
    ) -> bool:
        """Record the outcome of the attempt ``owner``; False when it no longer owns the job."""
        done = {"ok": False}
        outcome = None if result is None else as_result(result)

        def change(record: JobRecord, holder: str | None) -> JobRecord | None:
            if not _owns(record, holder, owner):
                return None
            _close_open_attempt(record, error)
            record.status = FAILED if error else SUCCEEDED
            record.result = outcome
            record.error = error
            if not error:
                record.progress = 1.0
            done["ok"] = True
            return record

        def account(pipe: redis.client.Pipeline, record: JobRecord) -> None:
            metrics.attempt_ended(pipe, record)
            metrics.job_ended(pipe, record)

        self.update(task_id, change, lease=None, on_commit=account)
        return done["ok"]

    def hand_to_store(
        self,
        task_id: str,
        owner: str,
        *,
        result: Result | Mapping[str, Any],
        store_resend_after: float = 300.0,
    ) -> bool:
        """Processing of an ingest job succeeded: close the attempt, keep the job ``running``
        with ``result.metadata.stored = "pending"`` until the store worker completes it."""
        done = {"ok": False}
        outcome = as_result(result)
        outcome.metadata["stored"] = "pending"

        def change(record: JobRecord, holder: str | None) -> JobRecord | None:
            if not _owns(record, holder, owner):
                return None
            _close_open_attempt(record, None)
            record.result = outcome
            record.storing = True
            record.store_resend_at = time.time() + store_resend_after
            record.progress = 0.99
            record.waiting_for = STORE_WAIT
            done["ok"] = True
            return record

        def account(pipe: redis.client.Pipeline, record: JobRecord) -> None:
            pipe.zadd(OUTBOX, {task_id: time.time() + self.outbox_grace})
            metrics.attempt_ended(pipe, record)

        self.update(task_id, change, lease=None, on_commit=account)
        return done["ok"]

    def claim_store(self, task_id: str, owner: str, *, owner_is_dead: Callable[[str], bool]) -> str:
        """The store worker starts on a handed-over job: "run", or why it does not."""
        verdict = {"v": "unknown job"}

        def change(record: JobRecord, holder: str | None) -> JobRecord | None:
            if record.status != RUNNING or not record.storing:
                verdict["v"] = f"nothing to store (job {record.status.value})"
                return None
            if holder and holder != owner and not owner_is_dead(holder):
                verdict["v"] = f"being stored by {holder}"
                return None
            record.waiting_for = None
            verdict["v"] = "run"
            return record

        self.update(task_id, change, lease=lambda rec: owner)
        return verdict["v"]

    def store_retry_at(self, task_id: str, owner: str, *, at: float, waiting_for: str) -> None:
        """A storing error is retried at ``at``: the reconciler leaves it alone until then."""

        def change(record: JobRecord, holder: str | None) -> JobRecord | None:
            if record.status != RUNNING or not record.storing:
                return None
            record.store_resend_at = max(record.store_resend_at or 0.0, at)
            record.waiting_for = waiting_for
            return record

        self.update(task_id, change, lease=lambda rec: None)

    def store_resent(
        self, task_id: str, *, next_at: float, waiting_for: str | None, resend: bool = True
    ) -> bool:
        """True when the reconciler is to send the store message again (its deadline passed);
        ``resend`` False (no store worker alive) only pushes the deadline to ``next_at``, as
        the message waiting in the queue is taken when one starts. Says why it waits."""
        done = {"ok": False}

        def change(record: JobRecord, holder: str | None) -> JobRecord | None:
            if record.status != RUNNING or not record.storing or holder:
                return None
            due = (record.store_resend_at or 0.0) <= time.time()
            if not due and resend and str(record.waiting_for).startswith(STORE_RETRY):
                return None  # a storing retry is scheduled: the job says so until it runs
            changed = record.waiting_for != waiting_for
            record.waiting_for = waiting_for
            if due or not resend:
                record.store_resend_at = next_at
                changed = changed or due
            done["ok"] = due and resend
            return record if changed else None

        self.update(task_id, change)
        return done["ok"]

    def resend_lost(self, task_id: str, *, queued_for: float) -> bool:
        """A job queued for ``queued_for`` seconds (or that long since it was last resent)
        whose message the caller found gone: back in the outbox, due now, for the outbox
        reconciler to send. True when this call put it there (once per ``queued_for``, however
        many reconcilers look); a duplicate message is skipped by the claim."""
        done = {"ok": False}
        now = time.time()

        def change(record: JobRecord, holder: str | None) -> JobRecord | None:
            if record.status != QUEUED or holder or not waited_queued(record, queued_for, now):
                return None
            record.resent_at = now
            done["ok"] = True
            return record

        def account(pipe: redis.client.Pipeline, record: JobRecord) -> None:
            pipe.zadd(OUTBOX, {task_id: now}, nx=True)

        self.update(task_id, change, on_commit=account)
        return done["ok"]

    def fail_timed_out(self, task_id: str, worker: str, limit: int) -> JobRecord | None:
        """The hard time limit killed the attempt ``worker`` ran: the job ends here, once."""

        def change(record: JobRecord, holder: str | None) -> JobRecord | None:
            if record.status != RUNNING or record.storing:
                return None
            owner = record.owner or ""
            if owner.rpartition("/")[0] != worker or (holder and holder != owner):
                return None
            reason = f"ran out of time: the job ran past MORAG_JOB_TIME_LIMIT ({limit}s)"
            _close_open_attempt(record, reason)
            record.status = FAILED
            record.error = reason
            return record

        def account(pipe: redis.client.Pipeline, record: JobRecord) -> None:
            metrics.attempt_ended(pipe, record)
            metrics.job_ended(pipe, record)

        return self.update(task_id, change, lease=None, on_commit=account)

    def finish_store(
        self, task_id: str, *, stored_chunks: int | None = None, error: str | None = None
    ) -> bool:
        """The store worker's verdict on a job handed over by ``hand_to_store``."""
        done = {"ok": False}

        def change(record: JobRecord, holder: str | None) -> JobRecord | None:
            if record.status != RUNNING or not record.storing:
                return None
            record.storing = False
            record.waiting_for = None
            assert record.result is not None  # set by hand_to_store
            meta = record.result.metadata
            if error:
                record.status = FAILED
                record.error = error
                meta["stored"] = False
            else:
                record.status = SUCCEEDED
                record.progress = 1.0
                meta["stored"] = True
                meta["stored_chunks"] = stored_chunks
            done["ok"] = True
            return record

        self.update(task_id, change, lease=None, on_commit=metrics.job_ended)
        return done["ok"]

    def requeue(
        self,
        task_id: str,
        *,
        route: Route,
        error: str,
        owner: str | None,
        force_cpu: bool = False,
    ) -> JobRecord | None:
        """Put a running job back to ``queued`` on another route (runtime fallback, orphan).

        ``owner`` None means "only if nobody holds the lease" (the watchdog's case); otherwise
        the owner's attempt ends here (its run time is counted).
        """

        def change(record: JobRecord, holder: str | None) -> JobRecord | None:
            # A job handed to the store worker is running without a lease on purpose; the
            # watchdog may have listed it a moment before the hand-over.
            if record.status != RUNNING or holder != owner or record.storing:
                return None
            _close_open_attempt(record, error)
            record.status = QUEUED
            record.queued_at = now_iso()
            record.route = route
            record.owner = None
            record.force_cpu = record.force_cpu or force_cpu
            if force_cpu:
                # A GPU failure is not a lost worker: it does not count against the cap.
                record.deliveries = max(0, record.deliveries - 1)
            return record

        def account(pipe: redis.client.Pipeline, record: JobRecord) -> None:
            # Sent by the caller once committed; a reconciler sends it if the caller dies.
            pipe.zadd(OUTBOX, {task_id: time.time() + self.outbox_grace})
            if owner is None:
                metrics.orphan_requeued(pipe, route)
            else:
                metrics.attempt_ended(pipe, record)
            metrics.route_decided(pipe, route, record.content_type)

        record = self.update(task_id, change, lease=None, on_commit=account)
        if record is None or record.status != QUEUED:
            return None
        return record

    def cancel(self, task_id: str, reason: str = "cancelled by the client") -> JobRecord | None:
        def change(record: JobRecord, holder: str | None) -> JobRecord | None:
            if record.status in TERMINAL:
                return None
            _close_open_attempt(record, "cancelled")
            record.status = CANCELLED
            record.error = reason
            return record

        return self.update(task_id, change, lease=None, on_commit=metrics.job_ended)


STORE_WAIT = "a morag-store worker to chunk, embed and store the result"
STORE_RETRY = "a retry of the storing"  # waiting_for while a storing retry is scheduled


def waited_queued(record: JobRecord, seconds: float, now: float) -> bool:
    """Has ``record`` been queued (or unsent since its last resend) for ``seconds``?"""
    since = metrics.parse_time(record.queued_at or record.created_at) or now
    return now - max(since, record.resent_at or 0.0) >= seconds


def as_result(result: Result | Mapping[str, Any]) -> Result:
    """A processor's output as the stored Result (ValidationError when it is not one)."""
    return result if isinstance(result, Result) else Result.model_validate(dict(result))


def _text(raw: bytes | str | None) -> str | None:
    return raw.decode() if isinstance(raw, bytes) else raw


def _is_attempt_of(record: JobRecord, owner: str) -> bool:
    return (
        record.status == RUNNING
        and not record.storing
        and record.owner == owner
        and record.open_attempt is not None
    )


def _owns(record: JobRecord, holder: str | None, owner: str) -> bool:
    """The attempt ``owner`` may write the job: it holds the lease, or the lease lapsed
    (a Redis outage longer than the lease) and nobody has requeued or taken the job since."""
    if record.status != RUNNING:
        return False
    if holder == owner:
        return True
    return holder is None and _is_attempt_of(record, owner)


def _close_open_attempt(record: JobRecord, error: str | None) -> bool:
    """End the current attempt if it is still open; True when there was one."""
    attempt = record.open_attempt
    if attempt is None:
        return False
    attempt.finished_at = now_iso()
    attempt.error = error
    return True
