"""Celery tasks of the server's ``morag-store`` queue: storing ingested jobs in the vector
store, search and deletion on behalf of the API, and webhook delivery.

Only the server runs a worker on this queue (``morag worker --queue morag-store``), so GPU
and CPU processing hosts never need the vector store or the embedding model.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx

from morag import files, metrics, store_requests, urls, webhooks
from morag.celery_app import STORE_TASK, celery_app
from morag.job_record import JobRecord
from morag.jobs import CANCELLED, STORE_RETRY
from morag.runtime import get_runtime
from morag.webhooks import body_of, notify_end, signed_headers

log = logging.getLogger("morag.server_tasks")

REPLY_TTL = 120


def reply_key(request_id: str) -> str:
    return f"morag:reply:{request_id}"


def _json_safe(value: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(value, default=str))


def store_record(record: JobRecord, settings: Any, device: str) -> int:
    """Chunk the job's content, embed the chunks and write them; the number of chunks."""
    from morag.vectors import chunking, embeddings, store

    content = record.result.content if record.result else ""
    chunks = chunking.chunk_markdown(content, settings.chunk_size, settings.chunk_overlap)
    produced = record.result.metadata if record.result else {}
    result_meta = {k: v for k, v in produced.items() if k != "stored"}
    metadata = _json_safe({**result_meta, **record.metadata})
    payloads = [
        {
            "text": chunk.text,
            "job_id": record.task_id,
            "source": record.source.label,
            "content_type": record.content_type,
            "chunk_index": chunk.index,
            "section": chunk.section,
            "metadata": metadata,
        }
        for chunk in chunks
    ]
    vectors = embeddings.embed(
        [c.text for c in chunks], model=settings.embedding_model, device=device
    )
    return store.upsert_chunks(settings, record.task_id, vectors, payloads)


@celery_app.task(name=STORE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def store_job(self: Any, task_id: str) -> None:
    import os

    from morag.execution import owner_is_dead, through_outage

    rt = get_runtime()
    worker = self.request.hostname or "unknown"
    owner = f"{worker}/{os.getpid()}"
    # The lease (kept alive by this worker's supervisor) tells the reconciler someone
    # stores the job, and keeps a duplicate store message from storing it twice at once.
    verdict = through_outage(
        rt,
        f"claiming the storing of job {task_id}",
        lambda: rt.store.claim_store(
            task_id, owner, owner_is_dead=lambda holder: owner_is_dead(holder, worker)
        ),
    )
    if verdict != "run":
        log.info("job %s not stored here: %s", task_id, verdict)
        return
    record = rt.store.get(task_id)
    assert record is not None
    try:
        count = store_record(record, rt.settings, rt.device.device)
    except Exception as exc:
        retries = self.request.retries
        error = f"storing failed: {type(exc).__name__}: {exc}"
        if retries < rt.settings.store_retries:
            countdown = rt.settings.store_retry_backoff * (2**retries)
            log.warning("job %s: %s; retry %d in %.1fs", task_id, error, retries + 1, countdown)
            rt.store.store_retry_at(
                task_id,
                owner,
                at=time.time() + countdown + rt.settings.store_resend_after,
                waiting_for=f"{STORE_RETRY} in {countdown:.0f}s ({error})",
            )
            raise self.retry(
                exc=exc, countdown=countdown, max_retries=rt.settings.store_retries
            ) from exc
        log.exception("storing job %s failed for good", task_id)
        through_outage(
            rt, f"recording job {task_id}", lambda: rt.store.finish_store(task_id, error=error)
        )
    else:
        done = through_outage(
            rt,
            f"recording job {task_id}",
            lambda: rt.store.finish_store(task_id, stored_chunks=count),
        )
        now = rt.store.get(task_id)
        if not done and now is not None and now.status == CANCELLED:
            # Cancelled while storing: what was written goes again.
            from morag.vectors import store

            store.delete_where(rt.settings, {"job_id": task_id})
    final = rt.store.get(task_id)
    if final is not None:
        if final.upload_id:
            files.remove_upload(rt.settings.uploads_dir, final.upload_id)
        notify_end(rt.store, final, resend_after=rt.settings.store_resend_after)


@celery_app.task(name="morag.vector_op", acks_late=False)
def vector_op(request_id: str, *ignored: Any) -> None:
    """Search or delete for the API; the answer goes to a Redis list the API waits on.

    What to do is read from the API's request record (store_requests), never from the
    message, which any credential that may push to ``morag-store`` can forge: ``ignored``
    holds what an old-style or forged message says, and it is not used."""
    from morag.vectors import embeddings, store

    rt = get_runtime()
    request = store_requests.take(rt.redis, request_id)
    if request is None:
        log.warning(
            "vector operation %s refused: no request from the API under %s (forged, "
            "replayed or expired message)",
            request_id,
            store_requests.request_key(request_id),
        )
        return
    op, params = request
    try:
        if op == "search":
            vector = embeddings.embed(
                [params["query"]], model=rt.settings.embedding_model, device=rt.device.device
            )[0]
            answer: dict[str, Any] = {
                "results": store.search(
                    rt.settings, vector, int(params["limit"]), params.get("filter")
                )
            }
        elif op == "delete":
            answer = {"deleted": store.delete_where(rt.settings, params["filter"])}
        else:
            answer = {"error": f"unknown operation {op!r}"}
    except Exception as exc:
        log.exception("vector operation %s failed", op)
        answer = {"error": f"{type(exc).__name__}: {exc}"}
    key = reply_key(request_id)
    pipe = rt.redis.pipeline()
    pipe.rpush(key, json.dumps(answer))
    pipe.expire(key, REPLY_TTL)
    pipe.execute()


@celery_app.task(name="morag.deliver_webhook", bind=True, acks_late=True)
def deliver_webhook(self: Any, task_id: str) -> None:
    """POST an ended job's webhook, once: a duplicate message (a redelivery, the
    reconciler's resend) finds the job's delivery mark and sends nothing."""
    import os

    rt = get_runtime()
    owner = f"{self.request.hostname or 'unknown'}/{os.getpid()}"
    hold = rt.settings.store_resend_after
    verdict = webhooks.claim_delivery(rt.redis, task_id, owner, hold=hold)
    if verdict != "send":
        log.info("webhook of job %s not sent here: %s", task_id, verdict)
        return
    record = rt.store.get(task_id)
    if record is None or not record.webhook_url or not record.status.final:
        log.info("webhook of job %s: nothing to send (no ended job with a webhook)", task_id)
        _settle(rt, task_id, webhooks.DROPPED)
        return
    url = record.webhook_url
    body = body_of(record)
    headers = signed_headers(task_id, body, rt.settings)  # Standard Webhooks, fresh timestamp
    try:
        urls.check_url(url, rt.settings.url_allowlist)
    except urls.UrlRefused as exc:
        log.warning("webhook of job %s refused: %s", task_id, exc)
        _settle(rt, task_id, webhooks.REFUSED)
        _count_webhook(rt, "refused")
        return
    try:
        # To the address that was checked (a later DNS answer cannot redirect it).
        resp = urls.post_pinned(
            url, allowlist=rt.settings.url_allowlist, content=body, headers=headers, timeout=10
        )
        if resp.status_code >= 300:
            raise httpx.HTTPStatusError(
                f"HTTP {resp.status_code}", request=resp.request, response=resp
            )
    except httpx.HTTPError as exc:
        retries = self.request.retries
        if retries >= rt.settings.webhook_retries:
            log.warning("webhook of job %s gave up after %d tries: %s", task_id, retries + 1, exc)
            _settle(rt, task_id, webhooks.GAVE_UP)
            _count_webhook(rt, "gave_up")
            return
        _count_webhook(rt, "retrying")
        countdown = rt.settings.webhook_backoff * (2**retries)
        log.info("webhook of job %s failed (%s); retry in %.1fs", task_id, exc, countdown)
        webhooks.release(rt.redis, task_id, retry_at=time.time() + countdown, hold=hold)
        raise self.retry(exc=exc, countdown=countdown, max_retries=None) from exc
    except urls.UrlRefused as exc:  # DNS answered differently at send time
        log.warning("webhook of job %s refused: %s", task_id, exc)
        _settle(rt, task_id, webhooks.REFUSED)
        _count_webhook(rt, "refused")
        return
    _settle(rt, task_id, webhooks.DELIVERED)
    log.info("webhook of job %s delivered: HTTP %d", task_id, resp.status_code)
    _count_webhook(rt, "delivered")


def _settle(rt: Any, task_id: str, mark: str) -> None:
    """Mark the webhook done through a Redis blip: a lost mark would send it again."""
    from morag.execution import through_outage

    through_outage(
        rt,
        f"marking the webhook of job {task_id}",
        lambda: webhooks.settle(rt.redis, task_id, mark),
    )


def _count_webhook(rt: Any, outcome: str) -> None:
    try:
        metrics.webhook_outcome(rt.redis, outcome)
    except Exception:  # a metric must never change what happens to the webhook
        log.exception("could not count the webhook outcome %s", outcome)
