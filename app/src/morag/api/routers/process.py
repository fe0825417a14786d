"""``/process/*``: run a job and wait for its result (202 with the id if it takes longer).

``gpu`` travels in the body like every job parameter (a form field with the upload, a JSON
member for a URL); the older ``?gpu=`` query parameter is still read, and deprecated.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse
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
    wait_for_end,
)
from morag.api.errors import ApiError
from morag.api.params import check_options, one_gpu_flag
from morag.api.schemas import KEY_IN_USE, Processed, ProcessUrl, StillRunning, errors
from morag.job_record import JobRecord, Source
from morag.jobs import QUEUED, RUNNING, SUCCEEDED
from morag.submission import BadInput, Services, parse_json_object, submit, url_content_type

router = APIRouter(
    prefix="/process",
    tags=["process"],
    dependencies=[ApiKey],
    responses={
        **errors(413, 415),
        **KEY_IN_USE,
        202: {"model": StillRunning, "description": "still running: poll its status"},
    },
)


async def _answer(svc: Services, record: JobRecord, started: float) -> Processed | JSONResponse:
    final = await wait_for_end(svc, record.task_id, svc.settings.process_wait)
    final = final or record
    if final.status == SUCCEEDED and final.result is not None:
        return Processed(
            task_id=final.task_id,
            route=final.route,
            result=final.result,
            processing_time=round(time.monotonic() - started, 3),
        )
    if final.status in (QUEUED, RUNNING):
        body = StillRunning(task_id=final.task_id, route=final.route, status=final.status)
        return JSONResponse(body.model_dump(mode="json"), status_code=202)
    raise ApiError(
        422,
        f"processing failed (job {final.task_id}): {final.error or final.status}",
        "processing_failed",
    )


@router.post("/file", response_model=Processed, dependencies=[Depends(limit_body)])
async def process_file(
    file: UploadFile = File(...),
    options: str | None = Form(default=None, description="JSON object (see JobOptions)"),
    gpu: bool | None = Form(default=None, description="run on a GPU worker when one is alive"),
    gpu_query: bool | None = Query(
        default=None,
        alias="gpu",
        deprecated=True,
        description="deprecated: send gpu as a form field",
    ),
    svc: Services = Depends(services),
    key: IdempotencyHeader | None = IdempotencyKey,
) -> Processed | JSONResponse:
    started = time.monotonic()
    try:
        use_gpu = one_gpu_flag(gpu, gpu_query)
        opts = check_options(parse_json_object(options, "options"))
        accepted = await run_in_threadpool(accept_upload, svc, file, opts)
        src = accepted.source
        same = [src.sha256, src.size, src.filename, use_gpu, opts]
        record = await run_in_threadpool(
            lambda: submit(
                svc,
                kind="process",
                content_type=accepted.content_type,
                source=src,
                options=opts,
                gpu=use_gpu,
                idem=key.bind("process/file", same) if key else None,
            )
        )
    except BadInput as exc:
        raise bad_input(exc) from exc
    return await _answer(svc, record, started)


@router.post("/url", response_model=Processed)
async def process_url(
    body: ProcessUrl,
    gpu_query: bool | None = Query(
        default=None,
        alias="gpu",
        deprecated=True,
        description="deprecated: send gpu in the JSON body",
    ),
    svc: Services = Depends(services),
    key: IdempotencyHeader | None = IdempotencyKey,
) -> Processed | JSONResponse:
    started = time.monotonic()
    try:
        use_gpu = one_gpu_flag(body.gpu, gpu_query)
        opts = check_options(body.options)
        await run_in_threadpool(urls.check_url, body.url, svc.settings.url_allowlist)
        content_type = url_content_type(body.url, opts)
        record = await run_in_threadpool(
            lambda: submit(
                svc,
                kind="process",
                content_type=content_type,
                source=Source.link(body.url),
                options=opts,
                gpu=use_gpu,
                idem=key.bind("process/url", [body.url, use_gpu, opts]) if key else None,
            )
        )
    except urls.UrlRefused as exc:
        raise ApiError(422, f"URL refused: {exc}", "url_refused") from exc
    except BadInput as exc:
        raise bad_input(exc) from exc
    return await _answer(svc, record, started)
