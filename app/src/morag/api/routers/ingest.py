"""``/api/v1/ingest/*``: background jobs (file, URL, batch) and cancellation."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, File, Form, UploadFile
from starlette.concurrency import run_in_threadpool

from morag import urls
from morag.api.deps import (
    ApiKey,
    IdempotencyHeader,
    IdempotencyKey,
    accept_upload,
    bad_input,
    limit_body,
    services,
)
from morag.api.errors import ApiError
from morag.api.params import check_options
from morag.api.schemas import (
    KEY_IN_USE,
    Accepted,
    BatchAccepted,
    Cancelled,
    IngestBatch,
    IngestUrl,
    errors,
)
from morag.job_record import JobRecord, Source
from morag.jobs import TERMINAL, new_id
from morag.submission import (
    BadInput,
    Services,
    admit,
    parse_json_object,
    prepare,
    submit,
    url_content_type,
)
from morag.submission import cancel as cancel_job

router = APIRouter(
    prefix="/api/v1/ingest",
    tags=["ingest"],
    dependencies=[ApiKey],
    responses=errors(),
)


def _accepted(record: JobRecord) -> Accepted:
    return Accepted(
        task_id=record.task_id,
        status=record.status,
        content_type=record.content_type,
        route=record.route,
        webhook=record.webhook,
    )


@router.post(
    "/file",
    status_code=202,
    response_model=Accepted,
    dependencies=[Depends(limit_body)],
    responses={**errors(413, 415), **KEY_IN_USE},
)
async def ingest_file(
    file: UploadFile = File(...),
    gpu: bool = Form(default=False, description="run on a GPU worker when one is alive"),
    metadata: str | None = Form(default=None, description="JSON object, stored with the chunks"),
    options: str | None = Form(default=None, description="JSON object (see JobOptions)"),
    webhook_url: str | None = Form(default=None, max_length=4096),
    svc: Services = Depends(services),
    key: IdempotencyHeader | None = IdempotencyKey,
) -> Accepted:
    try:
        opts = check_options(parse_json_object(options, "options"))
        meta = parse_json_object(metadata, "metadata")
        accepted = await run_in_threadpool(accept_upload, svc, file, opts)
        source = accepted.source
        # The same request: the same bytes and fields (not the upload's new id).
        same = [source.sha256, source.size, source.filename, gpu, meta, opts, webhook_url]
        record = await run_in_threadpool(
            lambda: submit(
                svc,
                kind="ingest",
                options=opts,
                gpu=gpu,
                metadata=meta,
                webhook_url=webhook_url,
                content_type=accepted.content_type,
                source=source,
                idem=key.bind("ingest/file", same) if key else None,
            )
        )
    except BadInput as exc:
        raise bad_input(exc) from exc
    return _accepted(record)


def _url_job(svc: Services, url: str, options: dict[str, Any]) -> tuple[str, Source]:
    try:
        urls.check_url(url, svc.settings.url_allowlist)
    except urls.UrlRefused as exc:
        raise BadInput(422, f"URL refused ({url}): {exc}") from exc
    return url_content_type(url, check_options(options)), Source.link(url)


@router.post(
    "/url", status_code=202, response_model=Accepted, responses={**errors(413, 415), **KEY_IN_USE}
)
def ingest_url(
    body: IngestUrl,
    svc: Services = Depends(services),
    key: IdempotencyHeader | None = IdempotencyKey,
) -> Accepted:
    try:
        content_type, source = _url_job(svc, body.url, body.options)
        record = submit(
            svc,
            kind="ingest",
            content_type=content_type,
            source=source,
            options=body.options,
            gpu=body.gpu,
            metadata=body.metadata,
            webhook_url=body.webhook_url,
            idem=key.bind("ingest/url", body.model_dump(mode="json")) if key else None,
        )
    except BadInput as exc:
        raise bad_input(exc) from exc
    return _accepted(record)


@router.post(
    "/batch",
    status_code=202,
    response_model=BatchAccepted,
    responses={**errors(413, 415), **KEY_IN_USE},
)
def ingest_batch(
    body: IngestBatch,
    svc: Services = Depends(services),
    key: IdempotencyHeader | None = IdempotencyKey,
) -> BatchAccepted:
    # A batch is accepted whole or not at all: every item is checked and its record built
    # first, then all records and the batch record are written in one MULTI/EXEC and sent;
    # a refusal half-way withdraws them all (morag.submission.admit).
    batch_id = new_id()
    try:
        jobs = [(_url_job(svc, item.url, item.options), item.options) for item in body.items]
        records = [
            prepare(
                svc,
                kind="ingest",
                content_type=ct,
                source=src,
                options=opts,
                gpu=body.gpu,
                webhook_url=body.webhook_url,
                batch_id=batch_id,
            )
            for (ct, src), opts in jobs
        ]
        idem = key.bind("ingest/batch", body.model_dump(mode="json")) if key else None
        admitted = admit(svc, records, batch_id=batch_id, idem=idem)
    except BadInput as exc:
        raise bad_input(exc) from exc
    return BatchAccepted(
        batch_id=admitted.batch_id or batch_id,
        task_ids=[r.task_id for r in admitted.records],
        routes=[r.route for r in admitted.records],
    )


@router.delete("/{task_id}", response_model=Cancelled, responses=errors(404, 409))
def cancel(task_id: str, svc: Services = Depends(services)) -> Cancelled:
    record = svc.store.get(task_id)
    if record is None:
        raise ApiError(404, f"unknown task id {task_id}")
    if record.status in TERMINAL:
        raise ApiError(409, f"job {task_id} already ended: {record.status}", "already_ended")
    cancelled = cancel_job(svc, task_id)
    if cancelled is None:
        raise ApiError(409, f"job {task_id} ended before it could be cancelled", "already_ended")
    return Cancelled(task_id=task_id, status=cancelled.status)
